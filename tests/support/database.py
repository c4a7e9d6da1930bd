"""The test Postgres: the cluster a session uses, a fresh database cloned from the
migrated template for one test, and SQL run as the migrator to inspect state."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import asyncpg

from services.kernel import db
from services.kernel.config import Settings


@dataclass(frozen=True)
class Cluster:
    """The session's Postgres: an administrative DSN and the URL services connect to."""

    admin_dsn: str
    base_url: str


# Runs one query against the test database as the migrator and returns its rows.
Query = Callable[..., list[asyncpg.Record]]


async def admin(cluster: Cluster, *statements: str) -> None:
    """Run `statements` in order as the cluster's administrator."""
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
        admin(
            cluster,
            f'CREATE DATABASE "{name}" TEMPLATE "{template_db}" OWNER {db.MIGRATOR}',
            f'REVOKE ALL ON DATABASE "{name}" FROM PUBLIC',
            *(f'GRANT CONNECT ON DATABASE "{name}" TO {role}' for role in db.ALL_ROLES),
        )
    )
    try:
        # The SMS the servers send (enrollment codes) go to a file of this test's own.
        sms = session_settings.state_dir / f"sms-{name}.jsonl"
        yield replace(session_settings, database_name=name, notify_file_override=sms)
    finally:
        asyncio.run(admin(cluster, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


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
