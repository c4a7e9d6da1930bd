"""Clients of `stopcovid.venue.v1.VenueService`:
venues, devices, venue QR codes and posters."""

from __future__ import annotations

from typing import TYPE_CHECKING

from stopcovid.client._aio import AsyncClient
from stopcovid.client._sync import SyncClient
from stopcovid.venue.v1 import venue_service_pb2
from stopcovid.venue.v1.venue_service_pb2_grpc import VenueServiceStub

if TYPE_CHECKING:
    from stopcovid.venue.v1.venue_service_pb2_grpc import VenueServiceAsyncStub

__all__ = ["AsyncVenueClient", "VenueClient"]

_SERVICE = venue_service_pb2.DESCRIPTOR.services_by_name["VenueService"]


class VenueClient(SyncClient, service=_SERVICE, stub=VenueServiceStub):
    """Blocking client of VenueService: `client.rpc.<Rpc>(request)`.

    Use as a context manager, or call `close()`, to release the channel.
    """

    rpc: VenueServiceStub


class AsyncVenueClient(AsyncClient, service=_SERVICE, stub=VenueServiceStub):
    """asyncio client of VenueService: `await client.rpc.<Rpc>(request)`.

    Use with `async with`, or await `close()`, to release the channel.
    """

    rpc: VenueServiceAsyncStub
