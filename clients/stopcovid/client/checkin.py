"""Clients of `stopcovid.checkin.v1.CheckInService`:
device scan streams, check-ins, enrollment, entry decisions."""

from __future__ import annotations

from typing import TYPE_CHECKING

from stopcovid.checkin.v1 import checkin_service_pb2
from stopcovid.checkin.v1.checkin_service_pb2_grpc import CheckInServiceStub
from stopcovid.client._aio import AsyncClient
from stopcovid.client._sync import SyncClient

if TYPE_CHECKING:
    from stopcovid.checkin.v1.checkin_service_pb2_grpc import CheckInServiceAsyncStub

__all__ = ["AsyncCheckInClient", "CheckInClient"]

_SERVICE = checkin_service_pb2.DESCRIPTOR.services_by_name["CheckInService"]


class CheckInClient(SyncClient, service=_SERVICE, stub=CheckInServiceStub):
    """Blocking client of CheckInService: `client.rpc.<Rpc>(request)`.

    Use as a context manager, or call `close()`, to release the channel.
    """

    rpc: CheckInServiceStub


class AsyncCheckInClient(AsyncClient, service=_SERVICE, stub=CheckInServiceStub):
    """asyncio client of CheckInService: `await client.rpc.<Rpc>(request)`.

    Use with `async with`, or await `close()`, to release the channel.
    """

    rpc: CheckInServiceAsyncStub
