"""The CheckInService process.

The API is complete in the protos; the RPCs are implemented by later issues and
until then answer UNIMPLEMENTED (after authentication and the role check, so the
access rules already hold).
"""

from typing import Any

import asyncpg
from stopcovid.checkin.v1 import checkin_service_pb2, checkin_service_pb2_grpc

from services.core.config import Settings
from services.core.rpc import unimplemented
from services.core.server import ServiceSpec


def _servicer(pool: asyncpg.Pool, settings: Settings) -> Any:
    return unimplemented(checkin_service_pb2_grpc.CheckInServiceServicer)


SPEC = ServiceSpec(
    name="checkin",
    descriptor=checkin_service_pb2.DESCRIPTOR.services_by_name["CheckInService"],
    add_to_server=checkin_service_pb2_grpc.add_CheckInServiceServicer_to_server,
    make_servicer=_servicer,
)
