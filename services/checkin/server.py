"""The CheckInService process.

The API is complete in the protos; its RPCs are implemented by the check-in hot path issue and
until then answer UNIMPLEMENTED, after authentication and the role check, so the
access rules already hold.
"""

from stopcovid.checkin.v1 import checkin_service_pb2, checkin_service_pb2_grpc

from services.core.server import generated_spec

SPEC = generated_spec("checkin", checkin_service_pb2, checkin_service_pb2_grpc, "CheckInService")
