"""The ExposureService process.

The API is complete in the protos; the RPCs are implemented by later issues and
until then answer UNIMPLEMENTED (after authentication and the role check, so the
access rules already hold).
"""

from typing import Any

import asyncpg
from stopcovid.exposure.v1 import exposure_service_pb2, exposure_service_pb2_grpc

from services.core.config import Settings
from services.core.rpc import unimplemented
from services.core.server import ServiceSpec


def _servicer(pool: asyncpg.Pool, settings: Settings) -> Any:
    return unimplemented(exposure_service_pb2_grpc.ExposureServiceServicer)


SPEC = ServiceSpec(
    name="exposure",
    descriptor=exposure_service_pb2.DESCRIPTOR.services_by_name["ExposureService"],
    add_to_server=exposure_service_pb2_grpc.add_ExposureServiceServicer_to_server,
    make_servicer=_servicer,
)
