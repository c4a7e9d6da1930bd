"""The typed clients against a small real gRPC server over mutual TLS (no Stop COVID servers).

A throwaway CA, server and client certificate are made here with the platform's CA code;
the server implements just enough of VenueService (plus a bidi echo service built from a
descriptor at run time) to exercise deadlines, retries, error unpacking and stream error
conversion.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import grpc.aio
import pytest
import stopcovid.client as clients
from google.protobuf import any_pb2, descriptor, descriptor_pb2, descriptor_pool
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from stopcovid.client import (
    AsyncVenueClient,
    ClientConfig,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    RetryPolicy,
    StopCovidError,
    Unavailable,
    VenueClient,
)
from stopcovid.client._aio import AsyncClient
from stopcovid.client._sync import SyncClient
from stopcovid.venue.v1 import venue_service_pb2 as pb
from stopcovid.venue.v1 import venue_service_pb2_grpc as pb_grpc

from services.kernel.pki import Authority, Purpose

DOMAIN = "stopcovid.gov.kh"
FAST_RETRY = RetryPolicy(max_attempts=4, initial_backoff=0.01, max_backoff=0.05, jitter=0.5)


# --- certificates -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Pki:
    ca: bytes
    server_cert: bytes
    server_key: bytes
    client_cert: bytes
    client_key: bytes


@pytest.fixture(scope="module")
def pki() -> Pki:
    root = Authority.create_root("test root CA")
    server = root.create_issuing(Purpose.SERVERS).issue_server(["localhost", "127.0.0.1"])
    client = root.create_issuing(Purpose.STAFF).issue_client(
        "test-principal", "ROLE_VENUE_OPERATOR"
    )
    return Pki(
        root.certificate_pem,
        server.chain_pem,
        server.private_key_pem,
        client.chain_pem,
        client.private_key_pem,
    )


# --- the server ---------------------------------------------------------------------------


def _abort(
    context: grpc.ServicerContext,
    code: grpc.StatusCode,
    message: str,
    reason: str,
    violations: Iterable[tuple[str, str]] = (),
) -> None:
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message)
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata={"k": "v"}))
    status.details.append(info)
    pairs = list(violations)
    if pairs:
        bad = error_details_pb2.BadRequest()
        for field, description in pairs:
            bad.field_violations.add(field=field, description=description)
        detail = any_pb2.Any()
        detail.Pack(bad)
        status.details.append(detail)
    context.abort_with_status(rpc_status.to_status(status))


class Venues(pb_grpc.VenueServiceServicer):
    """Counts attempts per (RPC, key) so tests can see retries from the server's side."""

    def __init__(self) -> None:
        self.attempts: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()

    def _count(self, rpc: str, key: str) -> int:
        with self._lock:
            self.attempts[rpc, key] += 1
            return self.attempts[rpc, key]

    def GetVenue(
        self, request: pb.GetVenueRequest, context: grpc.ServicerContext
    ) -> pb.GetVenueResponse:
        attempt = self._count("GetVenue", request.venue_id)
        kind = request.venue_id.split("-")[0]
        if kind == "missing":
            _abort(context, grpc.StatusCode.NOT_FOUND, "venue not found", "VENUE_NOT_FOUND")
        if kind == "flaky" and attempt <= 2:
            context.abort(grpc.StatusCode.UNAVAILABLE, "try again")
        if kind == "down":
            context.abort(grpc.StatusCode.UNAVAILABLE, "down")
        if kind == "slow":
            end = time.monotonic() + 3
            while context.is_active() and time.monotonic() < end:
                time.sleep(0.01)
        return pb.GetVenueResponse(venue=pb.Venue(venue_id=request.venue_id))

    def CreateVenue(
        self, request: pb.CreateVenueRequest, context: grpc.ServicerContext
    ) -> pb.CreateVenueResponse:
        self._count("CreateVenue", request.request_id)
        context.abort(grpc.StatusCode.UNAVAILABLE, "down")
        raise AssertionError("unreachable")

    def UpdateVenue(
        self, request: pb.UpdateVenueRequest, context: grpc.ServicerContext
    ) -> pb.UpdateVenueResponse:
        _abort(
            context,
            grpc.StatusCode.INVALID_ARGUMENT,
            "bad venue",
            "FIELD_INVALID",
            [("venue.capacity", "must be positive")],
        )
        raise AssertionError("unreachable")


# A bidi service built from a descriptor at run time: VenueService has no streaming RPC.
def _echo_service() -> descriptor.ServiceDescriptor:
    pool = descriptor_pool.Default()
    try:
        return pool.FindServiceByName("clientstest.v1.EchoService")
    except KeyError:
        pass
    file = descriptor_pb2.FileDescriptorProto(
        name="clientstest/v1/echo.proto",
        package="clientstest.v1",
        dependency=[pb.DESCRIPTOR.name],
        syntax="proto3",
    )
    file.service.add(name="EchoService").method.add(
        name="Echo",
        input_type=".stopcovid.venue.v1.GetVenueRequest",
        output_type=".stopcovid.venue.v1.GetVenueResponse",
        client_streaming=True,
        server_streaming=True,
    )
    pool.Add(file)
    return pool.FindServiceByName("clientstest.v1.EchoService")


ECHO = _echo_service()
ECHO_PATH = "/clientstest.v1.EchoService/Echo"


def _echo(
    requests: Iterator[pb.GetVenueRequest], context: grpc.ServicerContext
) -> Iterator[pb.GetVenueResponse]:
    for request in requests:
        if request.venue_id == "boom":
            _abort(context, grpc.StatusCode.FAILED_PRECONDITION, "revoked", "DEVICE_REVOKED")
        yield pb.GetVenueResponse(venue=pb.Venue(venue_id=request.venue_id))


def _echo_stub(channel: Any) -> SimpleNamespace:
    return SimpleNamespace(
        Echo=channel.stream_stream(
            ECHO_PATH,
            request_serializer=pb.GetVenueRequest.SerializeToString,
            response_deserializer=pb.GetVenueResponse.FromString,
        )
    )


class EchoClient(SyncClient, service=ECHO, stub=_echo_stub):
    rpc: Any


class AsyncEchoClient(AsyncClient, service=ECHO, stub=_echo_stub):
    rpc: Any


@dataclasses.dataclass
class Server:
    target: str
    venues: Venues


@pytest.fixture(scope="module")
def server(pki: Pki) -> Iterator[Server]:
    # The generated base answers UNIMPLEMENTED for the RPCs not overridden here.
    venues = Venues()  # type: ignore[abstract]
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_VenueServiceServicer_to_server(venues, srv)
    srv.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "clientstest.v1.EchoService",
                {
                    "Echo": grpc.stream_stream_rpc_method_handler(
                        _echo,
                        request_deserializer=pb.GetVenueRequest.FromString,
                        response_serializer=pb.GetVenueResponse.SerializeToString,
                    )
                },
            )
        ]
    )
    credentials = grpc.ssl_server_credentials(
        [(pki.server_key, pki.server_cert)],
        root_certificates=pki.ca,
        require_client_auth=True,
    )
    port = srv.add_secure_port("127.0.0.1:0", credentials)
    srv.start()
    yield Server(f"127.0.0.1:{port}", venues)
    srv.stop(None)


@pytest.fixture
def config(pki: Pki, server: Server) -> ClientConfig:
    return ClientConfig(
        target=server.target,
        ca_cert_pem=pki.ca,
        client_cert_pem=pki.client_cert,
        client_key_pem=pki.client_key,
        timeout=2.0,
        retry=FAST_RETRY,
    )


_unique = iter(range(1_000_000))


def key(kind: str) -> str:
    """A venue id the server recognises by its prefix, fresh per call for attempt counting."""
    return f"{kind}-{next(_unique)}"


# --- sync client --------------------------------------------------------------------------


def test_sync_ok_and_context_manager(config: ClientConfig) -> None:
    with VenueClient(config) as client:
        response = client.rpc.GetVenue(pb.GetVenueRequest(venue_id="ok-1"))
        assert response.venue.venue_id == "ok-1"
        response, call = client.rpc.GetVenue.with_call(pb.GetVenueRequest(venue_id="ok-2"))
        assert response.venue.venue_id == "ok-2"
        assert call.code() == grpc.StatusCode.OK
    with pytest.raises(ValueError, match="closed channel"):
        client.rpc.GetVenue(pb.GetVenueRequest(venue_id="ok-3"))


def test_sync_error_details_unpacked(config: ClientConfig) -> None:
    with VenueClient(config) as client:
        with pytest.raises(NotFound) as caught:
            client.rpc.GetVenue(pb.GetVenueRequest(venue_id=key("missing")))
        with pytest.raises(InvalidArgument) as invalid:
            client.rpc.UpdateVenue(pb.UpdateVenueRequest())
    err = caught.value
    assert isinstance(err, StopCovidError)
    assert err.code == grpc.StatusCode.NOT_FOUND
    assert (err.message, err.reason, err.domain) == ("venue not found", "VENUE_NOT_FOUND", DOMAIN)
    assert err.metadata == {"k": "v"}
    assert err.status is not None
    assert isinstance(err.__cause__, grpc.RpcError)
    assert str(err) == "NOT_FOUND: venue not found [VENUE_NOT_FOUND]"
    assert invalid.value.reason == "FIELD_INVALID"
    assert invalid.value.field_violations == [("venue.capacity", "must be positive")]


def test_sync_idempotent_call_retried_on_unavailable(config: ClientConfig, server: Server) -> None:
    venue_id = key("flaky")
    with VenueClient(config) as client:
        response = client.rpc.GetVenue(pb.GetVenueRequest(venue_id=venue_id))
    assert response.venue.venue_id == venue_id
    assert server.venues.attempts["GetVenue", venue_id] == 3


def test_sync_non_idempotent_call_not_retried(config: ClientConfig, server: Server) -> None:
    request_id = key("create")
    with VenueClient(config) as client, pytest.raises(Unavailable) as caught:
        client.rpc.CreateVenue(pb.CreateVenueRequest(request_id=request_id))
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert server.venues.attempts["CreateVenue", request_id] == 1


def test_sync_retries_stop_at_max_attempts(config: ClientConfig, server: Server) -> None:
    venue_id = key("down")
    with VenueClient(config) as client, pytest.raises(Unavailable):
        client.rpc.GetVenue(pb.GetVenueRequest(venue_id=venue_id))
    assert server.venues.attempts["GetVenue", venue_id] == FAST_RETRY.max_attempts


def test_sync_retries_stay_within_deadline(config: ClientConfig, server: Server) -> None:
    patient = RetryPolicy(max_attempts=1000, initial_backoff=0.02, max_backoff=0.05, jitter=0)
    venue_id = key("down")
    client = VenueClient(dataclasses.replace(config, retry=patient))
    with client, pytest.raises(Unavailable):
        client.rpc.GetVenue(pb.GetVenueRequest(venue_id=venue_id), timeout=0.4)
    # It stopped long before its 1000 attempts: only the 0.4 s deadline ends it.
    assert 2 < server.venues.attempts["GetVenue", venue_id] < 1000


def test_sync_default_deadline(config: ClientConfig) -> None:
    # The slow call takes 3 s: only the configured 0.3 s default (not the
    # library's 10 s) can end it with DEADLINE_EXCEEDED.
    with VenueClient(dataclasses.replace(config, timeout=0.3)) as client:
        with pytest.raises(DeadlineExceeded):
            client.rpc.GetVenue(pb.GetVenueRequest(venue_id=key("slow")))
        # The caller's own timeout wins over the default.
        with pytest.raises(DeadlineExceeded):
            client.rpc.GetVenue(pb.GetVenueRequest(venue_id=key("slow")), timeout=0.05)


def test_sync_future_errors_converted(config: ClientConfig) -> None:
    with VenueClient(config) as client:
        future: Any = client.rpc.GetVenue.future(pb.GetVenueRequest(venue_id=key("missing")))
        with pytest.raises(NotFound):
            future.result()
        assert isinstance(future.exception(), NotFound)


def test_sync_without_client_certificate(config: ClientConfig) -> None:
    # gRPC Python servers either require a client certificate (then the handshake fails and
    # the client sees UNAVAILABLE) or never ask for one; either way callers get our type.
    anonymous = dataclasses.replace(config, client_cert_pem=None, client_key_pem=None)
    with VenueClient(anonymous) as client, pytest.raises(Unavailable) as caught:
        client.rpc.CreateVenue(pb.CreateVenueRequest(request_id=key("anonymous")))
    assert isinstance(caught.value.__cause__, grpc.RpcError)


def test_sync_stream_errors_converted(config: ClientConfig) -> None:
    requests = [pb.GetVenueRequest(venue_id=v) for v in ("a", "b", "boom", "c")]
    with EchoClient(config) as client:
        responses = client.rpc.Echo(iter(requests))
        seen = []
        with pytest.raises(FailedPrecondition) as caught:
            for response in responses:
                seen.append(response.venue.venue_id)
    assert seen == ["a", "b"]
    assert caught.value.reason == "DEVICE_REVOKED"
    assert isinstance(caught.value.__cause__, grpc.RpcError)


def test_server_name_override(config: ClientConfig) -> None:
    with VenueClient(dataclasses.replace(config, server_name_override="localhost")) as client:
        assert client.rpc.GetVenue(pb.GetVenueRequest(venue_id="ok-1")).venue.venue_id == "ok-1"
    wrong = dataclasses.replace(config, server_name_override="elsewhere.example", timeout=0.5)
    with VenueClient(wrong) as client, pytest.raises(Unavailable):
        client.rpc.GetVenue(pb.GetVenueRequest(venue_id="ok-1"))


# --- async client -------------------------------------------------------------------------


def run(coro: Callable[[], Any]) -> Any:
    return asyncio.run(coro())


def test_async_ok_errors_and_retries(config: ClientConfig, server: Server) -> None:
    flaky, create = key("flaky"), key("create")

    async def main() -> None:
        async with AsyncVenueClient(config) as client:
            response = await client.rpc.GetVenue(pb.GetVenueRequest(venue_id="ok-1"))
            assert response.venue.venue_id == "ok-1"

            with pytest.raises(NotFound) as caught:
                await client.rpc.GetVenue(pb.GetVenueRequest(venue_id=key("missing")))
            assert (caught.value.reason, caught.value.domain) == ("VENUE_NOT_FOUND", DOMAIN)
            assert isinstance(caught.value.__cause__, grpc.aio.AioRpcError)

            with pytest.raises(InvalidArgument) as invalid:
                await client.rpc.UpdateVenue(pb.UpdateVenueRequest())
            assert invalid.value.field_violations == [("venue.capacity", "must be positive")]

            call = client.rpc.GetVenue(pb.GetVenueRequest(venue_id=flaky))
            assert (await call).venue.venue_id == flaky
            assert await call.code() == grpc.StatusCode.OK

            with pytest.raises(Unavailable):
                await client.rpc.CreateVenue(pb.CreateVenueRequest(request_id=create))

    run(main)
    assert server.venues.attempts["GetVenue", flaky] == 3
    assert server.venues.attempts["CreateVenue", create] == 1


def test_async_default_deadline_and_no_client_certificate(config: ClientConfig) -> None:
    async def main() -> None:
        async with AsyncVenueClient(dataclasses.replace(config, timeout=0.3)) as client:
            with pytest.raises(DeadlineExceeded):  # the call takes 3 s
                await client.rpc.GetVenue(pb.GetVenueRequest(venue_id=key("slow")))
        anonymous = dataclasses.replace(config, client_cert_pem=None, client_key_pem=None)
        async with AsyncVenueClient(anonymous) as client:
            with pytest.raises(Unavailable):
                await client.rpc.CreateVenue(pb.CreateVenueRequest(request_id=key("anonymous")))

    run(main)


def test_async_stream_errors_converted(config: ClientConfig) -> None:
    async def main() -> None:
        async with AsyncEchoClient(config) as client:
            call = client.rpc.Echo()
            await call.write(pb.GetVenueRequest(venue_id="a"))
            assert (await call.read()).venue.venue_id == "a"
            await call.write(pb.GetVenueRequest(venue_id="boom"))
            with pytest.raises(FailedPrecondition) as caught:
                await call.read()
            assert caught.value.reason == "DEVICE_REVOKED"

            requests = [pb.GetVenueRequest(venue_id=v) for v in ("x", "boom")]
            seen = []
            with pytest.raises(FailedPrecondition):
                async for response in client.rpc.Echo(iter(requests)):
                    seen.append(response.venue.venue_id)
            assert seen == ["x"]

    run(main)


# --- pieces without a server --------------------------------------------------------------


def test_aio_error_without_details() -> None:
    err = grpc.aio.AioRpcError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(),
        details="slow down",
    )
    converted = clients.from_rpc_error(err)
    assert type(converted) is clients.ResourceExhausted
    assert (converted.reason, converted.domain, converted.field_violations) == (None, None, [])


def test_every_status_code_has_a_class() -> None:
    for code in grpc.StatusCode:
        if code is grpc.StatusCode.OK:
            continue
        err = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="x")
        converted = clients.from_rpc_error(err)
        assert converted.code is code
        assert type(converted).status_code is code
        assert type(converted) is not StopCovidError


def test_every_service_has_both_clients(config: ClientConfig) -> None:
    from stopcovid.checkin.v1 import checkin_service_pb2
    from stopcovid.exposure.v1 import exposure_service_pb2
    from stopcovid.retention.v1 import retention_service_pb2

    pairs: list[tuple[type[SyncClient], type[AsyncClient], descriptor.ServiceDescriptor]] = [
        (
            clients.VenueClient,
            clients.AsyncVenueClient,
            pb.DESCRIPTOR.services_by_name["VenueService"],
        ),
        (
            clients.CheckInClient,
            clients.AsyncCheckInClient,
            checkin_service_pb2.DESCRIPTOR.services_by_name["CheckInService"],
        ),
        (
            clients.ExposureClient,
            clients.AsyncExposureClient,
            exposure_service_pb2.DESCRIPTOR.services_by_name["ExposureService"],
        ),
        (
            clients.RetentionClient,
            clients.AsyncRetentionClient,
            retention_service_pb2.DESCRIPTOR.services_by_name["RetentionService"],
        ),
    ]

    async def names(cls: type[AsyncClient]) -> set[str]:
        async with cls(config) as client:
            return {n for n in vars(client.rpc) if not n.startswith("_")}

    for sync_cls, async_cls, service in pairs:
        expected = {m.name for m in service.methods}
        with sync_cls(config) as client:
            assert {n for n in vars(client.rpc) if not n.startswith("_")} == expected
        assert asyncio.run(names(async_cls)) == expected


def test_config_files_and_validation(tmp_path: Path, pki: Pki) -> None:
    (tmp_path / "ca.pem").write_bytes(pki.ca)
    (tmp_path / "officer.pem").write_bytes(pki.client_cert)
    (tmp_path / "officer.key").write_bytes(pki.client_key)
    config = ClientConfig.from_pki_dir("localhost:1", tmp_path, "officer")
    assert (config.ca_cert_pem, config.client_cert_pem) == (pki.ca, pki.client_cert)
    assert config.client_key_pem == pki.client_key
    assert "PRIVATE KEY" not in repr(config)
    anonymous = ClientConfig.from_pki_dir("localhost:1", tmp_path, None)
    assert anonymous.client_cert_pem is None
    with pytest.raises(ValueError, match="go together"):
        ClientConfig("localhost:1", pki.ca, client_cert_pem=pki.client_cert)
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=1.0, multiplier=3)
    assert [policy.backoff(n) for n in (1, 2, 3)] == pytest.approx([0.1, 0.3, 0.9])
    assert policy.backoff(4) == 1.0
