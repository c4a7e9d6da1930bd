"""Run one service as an async gRPC server: mutual TLS, the auth/error interceptor
with its chain check and revocation list, health and reflection, a database pool
under the service's own role, and a graceful stop (health NOT_SERVING, finish
in-flight RPCs, close the pool).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import asyncpg
import grpc
import structlog
from cryptography import x509
from google.protobuf import descriptor as _descriptor
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from services.kernel import auth, db, keystores, metrics, pagination, pki, tracing
from services.kernel import logging as sc_logging
from services.kernel.config import Settings
from services.kernel.grpc_metrics import MetricsInterceptor
from services.kernel.grpc_tracing import TracingInterceptor
from services.kernel.interceptor import Gate, ServerInterceptor
from services.kernel.revocation import Revocations
from services.kernel.rpc import unimplemented

log = structlog.get_logger()


@dataclass(frozen=True)
class ServiceSpec:
    """What a service process serves."""

    name: str
    descriptor: _descriptor.ServiceDescriptor
    add_to_server: Callable[[Any, grpc.aio.Server], None]
    make_servicer: Callable[[asyncpg.Pool, Settings], Any]


def generated_spec(
    name: str,
    pb2: ModuleType,
    pb2_grpc: ModuleType,
    service: str,
    make_servicer: Callable[[asyncpg.Pool, Settings], Any] | None = None,
) -> ServiceSpec:
    """The spec of `service` from its generated modules. Without `make_servicer`, the
    generated base servicer answers every RPC UNIMPLEMENTED (after the role check)."""
    base = getattr(pb2_grpc, f"{service}Servicer")
    return ServiceSpec(
        name=name,
        descriptor=pb2.DESCRIPTOR.services_by_name[service],
        add_to_server=getattr(pb2_grpc, f"add_{service}Servicer_to_server"),
        make_servicer=make_servicer or (lambda pool, settings: unimplemented(base)),
    )


@dataclass(frozen=True)
class TlsMaterial:
    ca_pem: bytes
    """The root CA certificate."""
    cert_pem: bytes
    """The server's certificate and its issuing CA's."""
    key_pem: bytes
    issuers_pem: bytes
    """The issuing CAs whose client certificates are accepted (auth.Issuers)."""

    @classmethod
    def from_settings(cls, settings: Settings) -> TlsMaterial:
        ca, cert, key = settings.tls_paths
        return cls(
            ca_pem=ca.read_bytes(),
            cert_pem=cert.read_bytes(),
            key_pem=key.read_bytes(),
            issuers_pem=settings.tls_issuers_path.read_bytes(),
        )

    def issuers(self) -> auth.Issuers:
        root = x509.load_pem_x509_certificate(self.ca_pem)
        return auth.Issuers(root, pki.load_certificates(self.issuers_pem))

    def expiries(self) -> dict[str, float]:
        """When each certificate a server relies on expires (Unix time), by a bounded
        name: its own, the root, and each issuing CA by its common name."""
        found = {
            "server": pki.load_certificates(self.cert_pem)[0],
            "root": x509.load_pem_x509_certificate(self.ca_pem),
        }
        for issuer in pki.load_certificates(self.issuers_pem):
            names = issuer.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
            name = str(names[0].value) if names else str(issuer.serial_number)
            found[f"issuer:{name}"] = issuer
        return {name: cert.not_valid_after_utc.timestamp() for name, cert in found.items()}


class _ReflectionPool:
    """The default descriptor pool, plus lookups of method symbols.

    The C++/upb pool cannot find the file of a method (`pkg.Service.Method`), which
    is what `grpcurl describe pkg.Service.Method` asks for; the file that declares
    the service declares the method too.
    """

    def __init__(self) -> None:
        self._pool = descriptor_pool.Default()

    def FindFileContainingSymbol(self, symbol: str) -> Any:
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            service, _, method = symbol.rpartition(".")
            found = self._pool.FindServiceByName(service) if service else None
            if found is None or method not in found.methods_by_name:
                raise
            return found.file

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


async def _hook(servicer: Any, name: str, *args: Any) -> None:
    """Servicers with background work (the CheckIn server's group commit, caches and
    streams) define async `start()`, `drain(grace)` and `close()`; others need none."""
    hook = getattr(servicer, name, None)
    if hook is not None:
        await hook(*args)


class RunningServer:
    def __init__(
        self,
        spec: ServiceSpec,
        server: grpc.aio.Server,
        health: health_aio.HealthServicer,
        pool: asyncpg.Pool,
        port: int,
        *,
        servicer: Any = None,
        revocations: Revocations | None = None,
    ) -> None:
        self.spec = spec
        self.server = server
        self.health = health
        self.pool = pool
        self.port = port
        self.servicer = servicer
        self.revocations = revocations

    async def stop(self, grace: float) -> None:
        # Tell load balancers first, let long-lived streams end cleanly (acking what
        # is durable), then let the remaining in-flight calls finish.
        await self.health.enter_graceful_shutdown()
        await _hook(self.servicer, "drain", grace)
        await self.server.stop(grace)
        await _hook(self.servicer, "close")
        if self.revocations is not None:
            await self.revocations.close()
        await self.pool.close()
        log.info("server_stopped", service=self.spec.name)


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """The gRPC limits of every server, in one place (config.py documents each
    setting): message sizes, connections, calls per connection, connection idle
    time and age, the keepalive policy, and the size of a call's metadata.

    Python gRPC offers no memory quota of its own (the core's resource quota is not
    reachable from Python); what a caller can make a server hold is bounded by
    these limits, `maximum_concurrent_rpcs`, and each handler's own bounds (a
    stream's window and unsent-ack budget in the CheckIn server)."""
    ms = 1000
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_metadata_size", _MAX_METADATA_BYTES),
        # Beyond it a new connection is closed at accept, before its handshake.
        ("grpc.max_allowed_incoming_connections", settings.grpc_max_connections),
        ("grpc.max_concurrent_streams", settings.grpc_max_streams_per_connection),
        ("grpc.max_connection_idle_ms", int(settings.grpc_max_connection_idle_s * ms)),
        # The server pings quiet connections, so a peer that vanished is found and
        # its calls end; devices on flaky networks ping to keep NAT state, within
        # reason: faster than every 10 s, twice, and the connection is closed.
        ("grpc.keepalive_time_ms", int(settings.grpc_keepalive_s * ms)),
        ("grpc.keepalive_timeout_ms", 20 * ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10 * ms),
        ("grpc.http2.max_ping_strikes", 2),
        # What a caller may send before the handler reads it: a fixed window per
        # call, not one BDP probing grows to megabytes, so a handler that stops
        # reading (a CheckIn stream at its held-bytes bound) holds the caller back
        # at this many bytes. Only uploads to the server are paced by it.
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", settings.grpc_stream_window_bytes),
        # TLS records of at most 4 KB: the frame protector's buffer per connection
        # is that size instead of 16 KB (measured: 5 KB less per idle connection).
        ("grpc.tsi.max_frame_size", _TLS_FRAME_BYTES),
        *_connection_age(settings),
    ]


def _connection_age(settings: Settings) -> list[tuple[str, int]]:
    """The server's side of rebalancing: a connection this old is asked to go away
    (a client then reconnects and its balancer may pick another server); 0: never."""
    if settings.grpc_max_connection_age_s <= 0:
        return []
    return [
        ("grpc.max_connection_age_ms", round(settings.grpc_max_connection_age_s * 1000)),
        (
            "grpc.max_connection_age_grace_ms",
            round(settings.grpc_max_connection_age_grace_s * 1000),
        ),
    ]


# Certificates travel in the TLS handshake, not in metadata: what a caller sends
# there is a few short headers (deadline, user agent, a request id).
_MAX_METADATA_BYTES = 16 * 1024
_TLS_FRAME_BYTES = 4096


async def start_server(
    spec: ServiceSpec,
    settings: Settings,
    tls: TlsMaterial,
    port: int | None = None,
    pool: asyncpg.Pool | None = None,
) -> RunningServer:
    issuers = tls.issuers()  # before anything starts: a bad bundle stops the server here
    role = db.SERVICE_ROLES[spec.name]
    # The installation's key store, whichever backend: page tokens must open on
    # every server of the service, on every host.
    page_keys = keystores.open_for(settings, role)
    try:
        pagination.use_key(page_keys.page_token_key())
    finally:
        page_keys.close()
    if pool is None:
        pool = await db.create_pool(settings, role)
    revocations = Revocations(pool, settings, role)
    await revocations.start()
    table = auth.role_table([spec.descriptor])
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if settings.metrics:
        # Outermost, so it counts every call with the status its caller got.
        interceptors.append(MetricsInterceptor([spec.descriptor]))
        for name, expires in tls.expiries().items():
            metrics.CERTIFICATE_EXPIRY.labels(certificate=name).set(expires)
    if tracing.enabled:
        interceptors.append(TracingInterceptor())
    interceptors.append(ServerInterceptor(table, Gate(issuers, revocations, pool)))
    server = grpc.aio.server(
        interceptors=interceptors,
        options=server_options(settings),
        maximum_concurrent_rpcs=settings.grpc_max_concurrent_rpcs,
    )
    servicer = spec.make_servicer(pool, settings)
    await _hook(servicer, "start")
    spec.add_to_server(servicer, server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [
            spec.descriptor.full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
        pool=_ReflectionPool(),
    )
    credentials = grpc.ssl_server_credentials(
        [(tls.key_pem, tls.cert_pem)],
        root_certificates=tls.ca_pem,
        # Python gRPC offers "require" or "do not request": require, so a caller
        # without a platform certificate is refused at the handshake.
        require_client_auth=True,
    )
    bound = server.add_secure_port(
        f"{settings.bind_host}:{settings.ports[spec.name] if port is None else port}", credentials
    )
    await server.start()
    await health.set(spec.descriptor.full_name, health_pb2.HealthCheckResponse.SERVING)
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    log.info("server_started", service=spec.name, host=settings.bind_host, port=bound)
    return RunningServer(
        spec, server, health, pool, bound, servicer=servicer, revocations=revocations
    )


async def _serve_until_signalled(spec: ServiceSpec, settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    running = await start_server(spec, settings, TlsMaterial.from_settings(settings))
    # Before the port file: a supervisor that sees the server ready finds its metrics.
    metrics.serve(settings.metrics_host, settings.metrics_ports[spec.name], spec.name)
    port_file = os.environ.get("STOPCOVID_PORT_FILE")
    if port_file:
        # Lets a supervisor that asked for port 0 learn the real one.
        # Written whole, then renamed, so a reader never sees a partial file.
        partial = Path(port_file + ".partial")
        partial.write_text(str(running.port))  # noqa: ASYNC240 (once, tiny)
        partial.replace(port_file)  # noqa: ASYNC240
    await stop.wait()
    log.info("server_stopping", service=spec.name, grace_seconds=settings.grace_seconds)
    await running.stop(settings.grace_seconds)


def main(spec: ServiceSpec) -> None:
    """Entry point of a service process."""
    settings = Settings.from_env()
    sc_logging.configure(settings.log_level, settings.log_format, process=spec.name)
    metrics.configure(settings.metrics, spec.name)
    tracing.configure(settings.tracing, spec.name)
    asyncio.run(_serve_until_signalled(spec, settings))
