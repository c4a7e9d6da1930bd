"""Typed clients of the four Stop COVID services, blocking and asyncio.

    config = ClientConfig.from_pki_dir("localhost:50052", pki_dir, "operator")
    with VenueClient(config) as venues:
        venue = venues.rpc.GetVenue(GetVenueRequest(venue_id=venue_id)).venue

    async with AsyncExposureClient(config) as exposure:
        case = (await exposure.rpc.GetCase(GetCaseRequest(case_id=case_id))).case

Each client's `rpc` is typed as the generated stub (sync or grpc.aio). Calls without a
`timeout` get the config's default deadline; unary calls the proto marks NO_SIDE_EFFECTS or
IDEMPOTENT are retried on UNAVAILABLE within that deadline; every failure is raised as a
`StopCovidError` subclass (one per status code) with the `ErrorInfo` reason unpacked.

Scanner devices use `DeviceClient` over a durable `ScanBuffer` (stopcovid.client.device,
stopcovid.client.buffer). The messages and stubs are `stopcovid.<service>.v1`, generated
from the protos and shipped in the same distribution (stopcovid-client).
"""

from stopcovid.client.buffer import BufferedScan, ScanBuffer
from stopcovid.client.checkin import AsyncCheckInClient, CheckInClient
from stopcovid.client.config import ClientConfig, RetryPolicy
from stopcovid.client.device import BatchAck, DeviceClient, DeviceStats, ReconnectPolicy
from stopcovid.client.errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    StopCovidError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    Unknown,
    from_rpc_error,
)
from stopcovid.client.exposure import AsyncExposureClient, ExposureClient
from stopcovid.client.retention import AsyncRetentionClient, RetentionClient
from stopcovid.client.venue import AsyncVenueClient, VenueClient

__all__ = [
    "Aborted",
    "AlreadyExists",
    "AsyncCheckInClient",
    "AsyncExposureClient",
    "AsyncRetentionClient",
    "AsyncVenueClient",
    "BatchAck",
    "BufferedScan",
    "Cancelled",
    "CheckInClient",
    "ClientConfig",
    "DataLoss",
    "DeadlineExceeded",
    "DeviceClient",
    "DeviceStats",
    "ExposureClient",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ReconnectPolicy",
    "ResourceExhausted",
    "RetentionClient",
    "RetryPolicy",
    "ScanBuffer",
    "StopCovidError",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "VenueClient",
    "from_rpc_error",
]
