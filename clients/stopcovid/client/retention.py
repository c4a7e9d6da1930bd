"""Clients of `stopcovid.retention.v1.RetentionService`:
retention policies, deletion reports, grievances, data-subject requests, audit log."""

from __future__ import annotations

from typing import TYPE_CHECKING

from stopcovid.client._aio import AsyncClient
from stopcovid.client._sync import SyncClient
from stopcovid.retention.v1 import retention_service_pb2
from stopcovid.retention.v1.retention_service_pb2_grpc import RetentionServiceStub

if TYPE_CHECKING:
    from stopcovid.retention.v1.retention_service_pb2_grpc import RetentionServiceAsyncStub

__all__ = ["AsyncRetentionClient", "RetentionClient"]

_SERVICE = retention_service_pb2.DESCRIPTOR.services_by_name["RetentionService"]


class RetentionClient(SyncClient, service=_SERVICE, stub=RetentionServiceStub):
    """Blocking client of RetentionService: `client.rpc.<Rpc>(request)`.

    Use as a context manager, or call `close()`, to release the channel.
    """

    rpc: RetentionServiceStub


class AsyncRetentionClient(AsyncClient, service=_SERVICE, stub=RetentionServiceStub):
    """asyncio client of RetentionService: `await client.rpc.<Rpc>(request)`.

    Use with `async with`, or await `close()`, to release the channel.
    """

    rpc: RetentionServiceAsyncStub
