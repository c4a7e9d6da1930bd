"""The RetentionService process."""

from stopcovid.retention.v1 import retention_service_pb2, retention_service_pb2_grpc

from services.kernel.server import generated_spec
from services.retention.service import RetentionService

SPEC = generated_spec(
    "retention",
    retention_service_pb2,
    retention_service_pb2_grpc,
    "RetentionService",
    RetentionService,
)
