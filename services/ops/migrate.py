"""Database bootstrap and migrations.

`bootstrap` runs with an administrative connection (the embedded cluster's
superuser, or a DBA's role with CREATEROLE and CREATEDB): it creates the
per-service roles and the database, owned by the migrator role. `migrate` then
runs as the migrator and applies the numbered files in `services/sql/migrations`
in order, each in its own transaction, recording a checksum so an edited,
already-applied migration is refused instead of silently diverging. Both are
idempotent; concurrent runs serialize on an advisory lock.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import structlog

from services.kernel.db import ALL_ROLES, MIGRATOR

log = structlog.get_logger()

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "sql" / "migrations"
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_LOCK_KEY = 0x5C0_51D  # any constant; only migrations take it


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    found: list[Migration] = []
    for path in sorted(directory.glob("*.sql")):
        match = _FILE.match(path.name)
        if not match:
            raise ValueError(f"migration file name must look like 0001_name.sql: {path.name}")
        found.append(Migration(int(match[1]), match[2], path.read_text()))
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise ValueError(f"migrations must be numbered 1..n without gaps, found {versions}")
    return found


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def bootstrap(
    admin: asyncpg.Connection, database: str, passwords: dict[str, str] | None = None
) -> None:
    """Create the roles (setting passwords where given) and the database."""
    passwords = passwords or {}
    for role in ALL_ROLES:
        exists = await admin.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role)
        if not exists:
            await admin.execute(f"CREATE ROLE {_quote_ident(role)} LOGIN")
            log.info("db_role_created", role=role)
        if role in passwords:
            # Passwords cannot be bind parameters in utility statements; the literal
            # is escaped by Postgres' own quote_literal.
            literal = await admin.fetchval("SELECT quote_literal($1)", passwords[role])
            await admin.execute(f"ALTER ROLE {_quote_ident(role)} PASSWORD {literal}")
    exists = await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database)
    if not exists:
        await admin.execute(
            f"CREATE DATABASE {_quote_ident(database)} OWNER {_quote_ident(MIGRATOR)}"
        )
        log.info("db_created", database=database)
    await admin.execute(f"REVOKE ALL ON DATABASE {_quote_ident(database)} FROM PUBLIC")
    for role in ALL_ROLES:
        await admin.execute(
            f"GRANT CONNECT ON DATABASE {_quote_ident(database)} TO {_quote_ident(role)}"
        )


async def migrate(conn: asyncpg.Connection, directory: Path = MIGRATIONS_DIR) -> list[int]:
    """Apply pending migrations as the connected (migrator) role; return versions applied."""
    applied_now: list[int] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        await conn.execute(
            """
            CREATE TABLE IF NOT EXISTS schema_migrations (
                version    integer PRIMARY KEY,
                name       text NOT NULL,
                checksum   text NOT NULL,
                apply_time timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        done = {
            r["version"]: r["checksum"]
            for r in await conn.fetch("SELECT version, checksum FROM schema_migrations")
        }
        for m in migrations(directory):
            if m.version in done:
                if done[m.version] != m.checksum:
                    raise RuntimeError(
                        f"migration {m.version:04d}_{m.name} was edited after it was applied; "
                        "add a new migration instead"
                    )
                continue
            async with conn.transaction():
                await conn.execute(m.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    m.version,
                    m.name,
                    m.checksum,
                )
            applied_now.append(m.version)
            log.info("migration_applied", version=m.version, name=m.name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    return applied_now
