"""The ExposureService process: cases, access requests and grants, traces, risk
levels, notifications and the contacts' export (services/exposure/service.py)."""

from stopcovid.exposure.v1 import exposure_service_pb2, exposure_service_pb2_grpc

from services.exposure.service import ExposureService
from services.kernel.server import generated_spec

SPEC = generated_spec(
    "exposure",
    exposure_service_pb2,
    exposure_service_pb2_grpc,
    "ExposureService",
    ExposureService,
)
