"""Database access shared by every process: per-service roles, pools, named queries.

Each process connects as its own role (`stopcovid_<service>`, and
`stopcovid_pki` for the certificate commands) with only the privileges it needs.
SQL lives in `.sql` files with named blocks:

    -- name: get_venue
    -- Returns one venue by id.
    SELECT ...;

loaded once into a dict and called by name.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from services.kernel.config import Settings

MIGRATOR = "stopcovid_migrator"
SERVICE_ROLES = {
    "checkin": "stopcovid_checkin",
    "venue": "stopcovid_venue",
    "exposure": "stopcovid_exposure",
    "retention": "stopcovid_retention",
    "worker": "stopcovid_worker",
}
PKI_OPERATOR = "stopcovid_pki"
"""The role of `stopcovid certs`: it records revocations (and audits them), nothing else."""
ALL_ROLES = (MIGRATOR, *SERVICE_ROLES.values(), PKI_OPERATOR)

# A plain connection or one borrowed from a pool; queries work the same on both.
Conn = asyncpg.Connection | PoolConnectionProxy


def one(row: asyncpg.Record | None) -> asyncpg.Record:
    """The row a statement that must return one (RETURNING, or a locked read) returned."""
    if row is None:
        raise RuntimeError("statement returned no row")
    return row


_NAME = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)


def load_queries(path: Path) -> dict[str, str]:
    """Parse `-- name: x` blocks of a .sql file into {name: sql}."""
    text = path.read_text()
    parts = _NAME.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in queries:
            raise ValueError(f"{path.name}: query {name!r} defined twice")
        queries[name] = body.strip()
    return queries


def password_path(settings: Settings, role: str) -> Path:
    return settings.secrets_dir / f"db-{role}.password"


def role_password(settings: Settings, role: str) -> str | None:
    """The role's password: STOPCOVID_DB_PASSWORD_<ROLE> or the secrets file; None
    lets libpq mechanisms (~/.pgpass, certificates) supply it."""
    env = os.environ.get(f"STOPCOVID_DB_PASSWORD_{role.upper()}")
    if env:
        return env
    path = password_path(settings, role)
    return path.read_text().strip() if path.exists() else None


@dataclass(frozen=True)
class ConnectArgs:
    dsn: str
    user: str
    password: str | None
    database: str

    def kwargs(self) -> dict[str, Any]:
        return {
            "dsn": self.dsn,
            "user": self.user,
            "password": self.password,
            "database": self.database,
        }


def connect_args(settings: Settings, role: str) -> ConnectArgs:
    if settings.database_url is None:
        raise RuntimeError("no database configured: set STOPCOVID_DATABASE_URL or run `up`")
    return ConnectArgs(
        dsn=settings.database_url,
        user=role,
        password=role_password(settings, role),
        database=settings.database_name,
    )


async def create_pool(settings: Settings, role: str) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        **connect_args(settings, role).kwargs(),
        min_size=settings.db_pool_min,
        max_size=settings.db_pool_max,
        # Every statement is bounded so one stuck query cannot hold a server hostage.
        server_settings={"application_name": role, "statement_timeout": "30s"},
    )
    assert pool is not None
    return pool
