"""The audit log in the database (audit_log.sql), as records: pages of entries, the
chain's head, and one set-based check of a stretch of the chain."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.kernel.db import Conn, load_queries, one
from services.retention.queries import Db, params, record

Q = load_queries(Path(__file__).with_name("audit_log.sql"))


@dataclass(frozen=True)
class AuditEvent:
    sequence: int
    occur_time: dt.datetime
    principal: str
    role: str
    action: str
    outcome: str
    error_reason: str
    case_id: uuid.UUID | None
    grant_id: uuid.UUID | None
    resource_type: str
    resource_id: str
    details: Any
    """jsonb, as asyncpg returns it (its text)."""
    hash: bytes
    previous_hash: bytes


@dataclass(frozen=True)
class AuditFilter:
    """ListAuditEvents' filters, in list_audit_events' order; None matches everything."""

    start: dt.datetime | None
    end: dt.datetime | None
    principal: str | None
    action: str | None
    case_id: uuid.UUID | None


@dataclass(frozen=True)
class ChainHead:
    """The newest entry, and the checkpoint audit expiry left (0 and the genesis hash
    until anything expired)."""

    last_sequence: int
    last_hash: bytes
    checkpoint_sequence: int
    checkpoint_hash: bytes


@dataclass(frozen=True)
class Anchor:
    """What the first entry checked must link to: the entry before the range, or the
    checkpoint."""

    sequence: int
    hash: bytes
    is_checkpoint: bool


@dataclass(frozen=True)
class ChainCheck:
    """verify_chain's answer for (anchor, end]."""

    broken_sequence: int | None
    problem: str | None
    """'gap', 'link', 'checkpoint' or 'modified'; None when nothing is broken."""
    verified: int
    """Entries that verified before the first broken one."""
    last_good_hash: bytes | None
    max_sequence: int | None
    """The highest sequence present in the range; None when it holds none."""


async def page(
    db: Db, where: AuditFilter, after_sequence: int | None, limit: int
) -> list[AuditEvent]:
    """Up to `limit` entries after `after_sequence`, in chain order."""
    rows = await db.fetch(Q["list_audit_events"], *params(where), after_sequence, limit)
    return [record(AuditEvent, r) for r in rows]


async def head(conn: Conn) -> ChainHead:
    return record(ChainHead, one(await conn.fetchrow(Q["chain_head"])))


async def hash_at(conn: Conn, sequence: int) -> bytes | None:
    found = await conn.fetchval(Q["audit_hash_at"], sequence)
    return None if found is None else bytes(found)


async def check(conn: Conn, anchor: Anchor, end: int) -> ChainCheck:
    """Recompute and link every entry in (anchor, end], in the database."""
    row = one(
        await conn.fetchrow(
            Q["verify_chain"], anchor.sequence, anchor.hash, end, anchor.is_checkpoint
        )
    )
    return record(ChainCheck, row)
