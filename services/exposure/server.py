"""The ExposureService process.

The API is complete in the protos; its RPCs are implemented by the exposure issue and
until then answer UNIMPLEMENTED, after authentication and the role check, so the
access rules already hold.
"""

from stopcovid.exposure.v1 import exposure_service_pb2, exposure_service_pb2_grpc

from services.core.server import generated_spec

SPEC = generated_spec(
    "exposure", exposure_service_pb2, exposure_service_pb2_grpc, "ExposureService"
)
