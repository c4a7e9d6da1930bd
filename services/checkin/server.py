"""The CheckIn process: enrollment, tokens, and the check-in hot path."""

from stopcovid.checkin.v1 import checkin_service_pb2, checkin_service_pb2_grpc

from services.checkin.service import CheckInService
from services.kernel.server import generated_spec

SPEC = generated_spec(
    "checkin", checkin_service_pb2, checkin_service_pb2_grpc, "CheckInService", CheckInService
)
