"""Test harness: a real Postgres and real gRPC servers on loopback.

- Postgres: the cluster named by STOPCOVID_DATABASE_URL / PG* when set, else a
  temporary embedded cluster for the session.
- Schema: built once per session into a template database by the same code
  `up` uses (roles, migrations); each test gets `CREATE DATABASE ... TEMPLATE`.
- TLS: the session's development PKI (a root, the devices, staff and servers CAs)
  with one certificate per role, plus hostile ones.
- Servers: the four services in-process on port 0, in a background event loop,
  reached through the typed clients like any caller.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from services.kernel import db
from services.kernel import pki as pki_
from services.kernel.config import Settings
from services.kernel.pki import Authority, Purpose, write_issued
from services.kernel.server import RunningServer, ServiceSpec, TlsMaterial, start_server
from services.ops import pg, setup
from services.ops.setup import DevelopmentPki
from services.venue import typeset
from tests.support import forge


def pytest_configure(config: pytest.Config) -> None:
    """Refuse to run at all where Khmer cannot be shaped: every poster test would
    otherwise pass or fail for the wrong reason, and the Venue server cannot start."""
    try:
        typeset.require_shaping()
    except typeset.ShapingUnavailable as missing:
        raise pytest.UsageError(str(missing)) from None


@dataclass(frozen=True)
class Cluster:
    admin_dsn: str
    base_url: str


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    env = Settings.from_env()
    if env.database_url is not None:
        yield Cluster(env.admin_database_url or env.database_url, env.database_url)
        return
    embedded = pg.EmbeddedPostgres(tmp_path_factory.mktemp("pg"))
    embedded.start()
    try:
        yield Cluster(embedded.superuser_dsn(), f"postgresql://127.0.0.1:{embedded.port}/")
    finally:
        embedded.stop()


@pytest.fixture(scope="session")
def session_settings(tmp_path_factory: pytest.TempPathFactory, cluster: Cluster) -> Settings:
    state = tmp_path_factory.mktemp("state")
    settings = replace(
        Settings.from_env(),
        state_dir=state,
        database_url=cluster.base_url,
        database_name=f"stopcovid_tpl_{secrets.token_hex(4)}",
        ports={"checkin": 0, "venue": 0, "exposure": 0, "retention": 0},
        grace_seconds=1.0,
    )
    setup.ensure_keys(settings)
    return settings


@pytest.fixture(scope="session")
def template_db(session_settings: Settings, cluster: Cluster) -> Iterator[str]:
    passwords = setup.ensure_db_passwords(session_settings)
    asyncio.run(setup.prepare_database(session_settings, cluster.admin_dsn, passwords))
    yield session_settings.database_name
    asyncio.run(_admin(cluster, f'DROP DATABASE IF EXISTS "{session_settings.database_name}"'))


async def _admin(cluster: Cluster, *statements: str) -> None:
    conn = await asyncpg.connect(cluster.admin_dsn)
    try:
        for sql in statements:
            await conn.execute(sql)
    finally:
        await conn.close()


@contextmanager
def fresh_database(
    session_settings: Settings, template_db: str, cluster: Cluster
) -> Iterator[Settings]:
    """Settings pointing at a new database cloned from the migrated template."""
    name = f"stopcovid_t_{uuid.uuid4().hex[:12]}"
    asyncio.run(
        _admin(
            cluster,
            f'CREATE DATABASE "{name}" TEMPLATE "{template_db}" OWNER {db.MIGRATOR}',
            f'REVOKE ALL ON DATABASE "{name}" FROM PUBLIC',
            *(f'GRANT CONNECT ON DATABASE "{name}" TO {role}' for role in db.ALL_ROLES),
        )
    )
    try:
        yield replace(session_settings, database_name=name)
    finally:
        asyncio.run(_admin(cluster, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def settings(session_settings: Settings, template_db: str, cluster: Cluster) -> Iterator[Settings]:
    """A fresh database for this test."""
    with fresh_database(session_settings, template_db, cluster) as fresh:
        yield fresh


@dataclass(frozen=True)
class Pki:
    dir: Path
    cas: DevelopmentPki

    def files(self, principal: str) -> tuple[Path, Path, Path]:
        return self.dir / "ca.pem", self.dir / f"{principal}.pem", self.dir / f"{principal}.key"

    def issue(self, principal: str, role: str) -> pki_.Issued:
        """A certificate from the CA of the role: devices or staff."""
        return self.cas.issue_client(principal, role)

    def write(self, stem: str, issued: pki_.Issued) -> str:
        """Store a certificate for `stem` (chain and key); return the stem."""
        write_issued(self.dir, stem, issued)
        return stem


@pytest.fixture(scope="session")
def pki(session_settings: Settings) -> Pki:
    """Dev certificates for every role, and hostile ones, made with the staff CA's
    key: a client certificate without a role, one with a made-up role, and one from
    a foreign PKI."""
    made = Pki(session_settings.pki_dir, setup.ensure_pki(session_settings))
    made.write("no-role", forge.leaf(made.cas.staff, forge.subject("no-role", "ROLE_UNSPECIFIED")))
    made.write("bogus-role", forge.leaf(made.cas.staff, forge.subject("bogus", "ROLE_SUPERUSER")))
    foreign = Authority.create_root("Some other root CA").create_issuing(Purpose.STAFF)
    made.write("foreign", foreign.issue_client("intruder", "ROLE_AUDITOR"))
    return made


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
    ports: dict[str, int]
    settings: Settings
    pki: Pki

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
    tls = TlsMaterial.from_settings(settings)
    runner = ServerThread()
    try:
        ports = {spec.name: runner.start(spec, settings, tls) for spec in all_specs()}
        yield Servers(ports, settings, pki)
    finally:
        runner.close()


@pytest.fixture
def servers(settings: Settings, pki: Pki) -> Iterator[Servers]:
    """The four servers on a fresh database for this test."""
    with running_servers(settings, pki) as running:
        yield running


@pytest.fixture(scope="module")
def module_servers(
    session_settings: Settings, template_db: str, cluster: Cluster, pki: Pki
) -> Iterator[Servers]:
    """The four servers shared by a module's tests that leave no data behind."""
    with (
        fresh_database(session_settings, template_db, cluster) as fresh,
        running_servers(fresh, pki) as running,
    ):
        yield running


# Runs one query against the test database as the migrator and returns its rows.
Query = Callable[..., list[asyncpg.Record]]


def wait_for(predicate: Callable[[], bool], timeout: float = 60.0, what: str = "") -> None:
    """Poll `predicate` until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or 'a condition'}")
        time.sleep(0.05)


def make_query(settings: Settings) -> Query:
    """Run SQL against `settings`' database as the migrator (to inspect state)."""

    def run(query: str, *args: Any) -> list[asyncpg.Record]:
        async def go() -> list[asyncpg.Record]:
            conn = await asyncpg.connect(**db.connect_args(settings, db.MIGRATOR).kwargs())
            try:
                return list(await conn.fetch(query, *args))
            finally:
                await conn.close()

        return asyncio.run(go())

    return run


@pytest.fixture
def db_conn(settings: Settings) -> Query:
    """Run SQL against the test database as the migrator (to inspect state)."""
    return make_query(settings)


def process_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment a supervisor (`up`) gives a service or worker process."""
    return {
        **os.environ,
        "STOPCOVID_DATABASE_URL": str(settings.database_url),
        "STOPCOVID_DATABASE_NAME": settings.database_name,
        "STOPCOVID_STATE_DIR": str(settings.state_dir),
        "STOPCOVID_KEYSTORE_DIR": str(settings.keystore_dir),
        "STOPCOVID_LOG_FORMAT": "json",
        **extra,
    }
