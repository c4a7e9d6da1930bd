"""The four servers for a test: in-process on port 0, driven by an event loop in a
thread and reached through the typed clients like any caller; the PKI they trust;
and the environment a supervisor (`up`) gives one started as a process."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from services.kernel import pki as pki_
from services.kernel.config import Settings
from services.kernel.pki import write_issued
from services.kernel.server import RunningServer, ServiceSpec, TlsMaterial, start_server
from services.ops.harness import child_env
from services.ops.setup import DevelopmentPki


@dataclass(frozen=True)
class Pki:
    """The session's development PKI (a root; the devices, staff and servers CAs) and
    the directory of its certificates, one per principal."""

    dir: Path
    cas: DevelopmentPki

    def files(self, principal: str) -> tuple[Path, Path, Path]:
        return self.dir / "ca.pem", self.dir / f"{principal}.pem", self.dir / f"{principal}.key"

    def credentials(self, principal: str) -> grpc.ChannelCredentials:
        """Mutual TLS as `principal`, from its files, for a raw grpc channel."""
        ca, cert, key = self.files(principal)
        return grpc.ssl_channel_credentials(ca.read_bytes(), key.read_bytes(), cert.read_bytes())

    def issue(self, principal: str, role: str, organization: str | None = None) -> pki_.Issued:
        """A certificate from the CA of the role: devices or staff."""
        return self.cas.issue_client(principal, role, organization)

    def write(self, stem: str, issued: pki_.Issued) -> str:
        """Store a certificate for `stem` (chain and key); return the stem."""
        write_issued(self.dir, stem, issued)
        return stem


class ServerThread:
    """Real grpc.aio servers on loopback, driven by an event loop in a thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.running: dict[str, RunningServer] = {}

    def call(self, coro: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout=60)

    def start(self, spec: ServiceSpec, settings: Settings, tls: TlsMaterial) -> int:
        server: RunningServer = self.call(start_server(spec, settings, tls, port=0))
        self.running[spec.name] = server
        return server.port

    def close(self) -> None:
        for server in self.running.values():
            self.call(server.stop(0.5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@dataclass(frozen=True)
class Servers:
    """Where a test's servers listen, the settings they run with and their PKI."""

    ports: dict[str, int]
    settings: Settings
    pki: Pki
    servicers: dict[str, Any] = field(default_factory=dict)
    """Each in-process server's servicer, for tests that watch a server's own state."""

    def target(self, service: str) -> str:
        return f"localhost:{self.ports[service]}"


def all_specs() -> list[ServiceSpec]:
    from services.checkin.server import SPEC as checkin
    from services.exposure.server import SPEC as exposure
    from services.retention.server import SPEC as retention
    from services.venue.server import SPEC as venue

    return [checkin, venue, exposure, retention]


@contextmanager
def running_servers(settings: Settings, pki: Pki) -> Iterator[Servers]:
    """The four servers on `settings`' database until the block ends."""
    tls = TlsMaterial.from_settings(settings)
    runner = ServerThread()
    try:
        ports = {spec.name: runner.start(spec, settings, tls) for spec in all_specs()}
        servicers = {name: server.servicer for name, server in runner.running.items()}
        yield Servers(ports, settings, pki, servicers)
    finally:
        runner.close()


def process_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment a supervisor (`up`, the process harness) gives a service or
    worker process, logging JSON."""
    return child_env(settings, **{"STOPCOVID_LOG_FORMAT": "json", **extra})
