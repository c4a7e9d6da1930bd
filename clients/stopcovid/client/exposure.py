"""Clients of `stopcovid.exposure.v1.ExposureService`:
cases, access requests, traces, risk levels, notifications."""

from __future__ import annotations

from typing import TYPE_CHECKING

from stopcovid.client._aio import AsyncClient
from stopcovid.client._sync import SyncClient
from stopcovid.exposure.v1 import exposure_service_pb2
from stopcovid.exposure.v1.exposure_service_pb2_grpc import ExposureServiceStub

if TYPE_CHECKING:
    from stopcovid.exposure.v1.exposure_service_pb2_grpc import ExposureServiceAsyncStub

__all__ = ["AsyncExposureClient", "ExposureClient"]

_SERVICE = exposure_service_pb2.DESCRIPTOR.services_by_name["ExposureService"]


class ExposureClient(SyncClient, service=_SERVICE, stub=ExposureServiceStub):
    """Blocking client of ExposureService: `client.rpc.<Rpc>(request)`.

    Use as a context manager, or call `close()`, to release the channel.
    """

    rpc: ExposureServiceStub


class AsyncExposureClient(AsyncClient, service=_SERVICE, stub=ExposureServiceStub):
    """asyncio client of ExposureService: `await client.rpc.<Rpc>(request)`.

    Use with `async with`, or await `close()`, to release the channel.
    """

    rpc: ExposureServiceAsyncStub
