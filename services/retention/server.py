"""The RetentionService process.

The API is complete in the protos; its RPCs are implemented by the retention issue and
until then answer UNIMPLEMENTED, after authentication and the role check, so the
access rules already hold.
"""

from stopcovid.retention.v1 import retention_service_pb2, retention_service_pb2_grpc

from services.core.server import generated_spec

SPEC = generated_spec(
    "retention", retention_service_pb2, retention_service_pb2_grpc, "RetentionService"
)
