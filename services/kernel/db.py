"""Database access shared by every process: per-service roles, pools, named queries,
the errors a database call raises when the database has a bad moment, and rows as
typed records.

Each process connects as its own role (`stopcovid_<service>`, and
`stopcovid_pki` for the certificate commands) with only the privileges it needs.
SQL lives in `.sql` files with named blocks:

    -- name: get_venue
    -- Returns one venue by id.
    SELECT ...;

loaded once into a dict and called by name. A row that crosses into Python code
becomes a dataclass (`record`); rows written set-based go in as one array per
field (`columns`), named in the statement's `unnest(...) AS u (...)` in the
record's field order.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

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


TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes ConnectionError and TimeoutError (asyncio's too)
    asyncpg.PostgresError,  # includes PostgresConnectionError (SQLSTATE class 08)
    asyncpg.InterfaceError,
    # A backend killed while the connection was idle can leave asyncpg's protocol
    # in a state it reports this way; the pool then discards the connection.
    asyncpg.exceptions.InternalClientError,
)
"""What a database call raises when Postgres restarts, fails over, kills a backend or
refuses a statement. Background work (the workers' jobs, a server's cache reloads)
logs the type (`error_fields`), backs off and tries again: one bad moment must not
end the process. An RPC maps only the connection-level ones to UNAVAILABLE
(services/kernel/interceptor.py): a refused statement there is a bug to report."""


def error_fields(exc: BaseException) -> dict[str, str]:
    """The loggable part of a database error: its type and SQLSTATE, never its text
    (a Postgres message can quote a row's values)."""
    fields = {"error_type": type(exc).__name__}
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(sqlstate, str):
        fields["sqlstate"] = sqlstate
    return fields


def one(row: asyncpg.Record | None) -> asyncpg.Record:
    """The row a statement that must return one (RETURNING, or a locked read) returned."""
    if row is None:
        raise RuntimeError("statement returned no row")
    return row


R = TypeVar("R")


def record(kind: type[R], row: asyncpg.Record | Mapping[str, Any]) -> R:
    """`row` as the dataclass `kind`: each field from the column of its name (a
    column the record does not name is left out)."""
    names = [f.name for f in dataclasses.fields(kind)]  # type: ignore[arg-type]
    return kind(**{name: row[name] for name in names})


def columns(kind: type[Any], rows: Iterable[Any]) -> list[list[Any]]:
    """The records `rows` (dataclasses of `kind`) as one list per field, in field
    order: the parameters of a set-based `unnest($n::type[], ...) AS u (...)`."""
    items = list(rows)
    return [[getattr(r, f.name) for r in items] for f in dataclasses.fields(kind)]


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
