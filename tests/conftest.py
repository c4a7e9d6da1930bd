"""Fixtures of the test harness (and nothing else: the helpers they use, and that
tests import, are in tests/support): a real Postgres and real gRPC servers on loopback.

- Postgres: the cluster named by STOPCOVID_DATABASE_URL / PG* when set, else a
  temporary embedded cluster for the session.
- Schema: built once per session into a template database by the same code
  `up` uses (roles, migrations); each test gets `CREATE DATABASE ... TEMPLATE`.
- TLS: the session's development PKI (a root, the devices, staff and servers CAs)
  with one certificate per role, plus hostile ones.
- HSM: a SoftHSM2 token for the PKCS#11 key store (tests/support/softhsm.py).
- Servers: the four services in-process on port 0, in a background event loop,
  reached through the typed clients like any caller.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Iterator
from dataclasses import replace

import pytest

from services.kernel.config import Settings
from services.kernel.pki import Authority, Purpose
from services.ops import pg, setup
from services.venue import typeset
from tests.support import forge
from tests.support import softhsm as softhsm_support
from tests.support.database import Cluster, Query, admin, fresh_database, make_query
from tests.support.servers import Pki, Servers, running_servers


def pytest_configure(config: pytest.Config) -> None:
    """Refuse to run at all where Khmer cannot be shaped: every poster test would
    otherwise pass or fail for the wrong reason, and the Venue server cannot start."""
    try:
        typeset.require_shaping()
    except typeset.ShapingUnavailable as missing:
        raise pytest.UsageError(str(missing)) from None


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
    asyncio.run(admin(cluster, f'DROP DATABASE IF EXISTS "{session_settings.database_name}"'))


@pytest.fixture
def settings(session_settings: Settings, template_db: str, cluster: Cluster) -> Iterator[Settings]:
    """A fresh database for this test."""
    with fresh_database(session_settings, template_db, cluster) as fresh:
        yield fresh


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


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[softhsm_support.SoftHsm]:
    """A SoftHSM2 token for the session (skips, or under CI fails, without SoftHSM2)."""
    saved = {k: os.environ.get(k) for k in ("SOFTHSM2_CONF", "STOPCOVID_PKCS11_PIN")}
    yield softhsm_support.start(tmp_path_factory.mktemp("softhsm"))
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def db_conn(settings: Settings) -> Query:
    """Run SQL against the test database as the migrator (to inspect state)."""
    return make_query(settings)
