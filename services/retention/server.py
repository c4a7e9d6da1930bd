"""The RetentionService process.

The API is complete in the protos; the RPCs are implemented by later issues and
until then answer UNIMPLEMENTED (after authentication and the role check, so the
access rules already hold).
"""

from typing import Any

import asyncpg
from stopcovid.retention.v1 import retention_service_pb2, retention_service_pb2_grpc

from services.core.config import Settings
from services.core.rpc import unimplemented
from services.core.server import ServiceSpec


def _servicer(pool: asyncpg.Pool, settings: Settings) -> Any:
    return unimplemented(retention_service_pb2_grpc.RetentionServiceServicer)


SPEC = ServiceSpec(
    name="retention",
    descriptor=retention_service_pb2.DESCRIPTOR.services_by_name["RetentionService"],
    add_to_server=retention_service_pb2_grpc.add_RetentionServiceServicer_to_server,
    make_servicer=_servicer,
)
