"""The Exposure server's queries (queries.sql) as typed functions: values in by
name, records out (services/domain/exposure/records.py).

Each function runs one named statement on a connection, or on the pool for a
read outside a transaction. The list queries are read a page at a time by `page`,
each described by its `Keyset`.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import asyncpg

from services.domain.exposure.records import (
    AccessRequest,
    Case,
    ExportRow,
    Grant,
    Notification,
    Record,
    RiskStatus,
    Trace,
    TraceContact,
)
from services.exposure.statements import Statement, compiled
from services.kernel import pagination
from services.kernel.db import Conn, load_queries

Q = compiled(load_queries(Path(__file__).with_name("queries.sql")))

Db = Conn | asyncpg.Pool
"""A connection (in a transaction) or the pool (one statement on its own)."""

R = TypeVar("R", bound=Record)


@dataclass(frozen=True)
class Keyset(Generic[R]):
    """A list query read a page at a time, ordered by a time and a tie-breaking id
    (the fields `time` and `id` of its records)."""

    statement: Statement
    record: type[R]
    time: str
    id: str

    def key(self, row: R) -> list[str]:
        """The page-token key of a row."""
        return [getattr(row, self.time).isoformat(), str(getattr(row, self.id))]


CASES = Keyset(Q["list_cases"], Case, "report_time", "case_id")
"""Newest report first; filters: start, end (the report time)."""
ACCESS_REQUESTS = Keyset(
    Q["list_access_requests"], AccessRequest, "create_time", "access_request_id"
)
"""Oldest first (the approvers' work order); filters: state, case_id."""
TRACES = Keyset(Q["list_traces"], Trace, "create_time", "trace_id")
"""Newest first; filters: case_id, state."""
NOTIFICATIONS = Keyset(Q["list_notifications"], Notification, "create_time", "notification_id")
"""Oldest first; filters: trace_id, state."""


def _plain(value: Any) -> Any:
    """A filter's value as a page token's fingerprint holds it."""
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return None if value is None else str(value)


async def page(
    db: Db, keyset: Keyset[R], token: str, size: int, filters: dict[str, Any]
) -> tuple[list[R], str]:
    """A page of up to `size` rows matching `filters` (the query's parameters; a
    None matches every row), after the row the page token names; and the next
    page's token, "" after the last. A token of other filters is INVALID_PAGE_TOKEN."""
    fingerprint = {name: _plain(value) for name, value in filters.items()}
    after_time, after_id = pagination.time_and_id(token, fingerprint)
    statement = keyset.statement
    values = {**filters, "after_time": after_time, "after_id": after_id, "limit": size + 1}
    found = [keyset.record.of(r) for r in await db.fetch(statement.sql, *statement.args(values))]
    return pagination.page(found, size, fingerprint, keyset.key)


async def _row(db: Db, name: str, record: type[R], **values: Any) -> R | None:
    statement = Q[name]
    found = await db.fetchrow(statement.sql, *statement.args(values))
    return None if found is None else record.of(found)


async def _one(db: Db, name: str, record: type[R], **values: Any) -> R:
    """The row a statement must return (RETURNING, a row known to exist)."""
    found = await _row(db, name, record, **values)
    if found is None:
        raise RuntimeError(f"query {name} returned no row")
    return found


async def _rows(db: Db, name: str, record: type[R], **values: Any) -> list[R]:
    statement = Q[name]
    return [record.of(r) for r in await db.fetch(statement.sql, *statement.args(values))]


async def _value(db: Db, name: str, **values: Any) -> Any:
    statement = Q[name]
    return await db.fetchval(statement.sql, *statement.args(values))


async def _count(db: Db, name: str, **values: Any) -> int:
    """How many rows a statement returned (or changed)."""
    statement = Q[name]
    return len(await db.fetch(statement.sql, *statement.args(values)))


async def lock_key(conn: Conn, key: str) -> None:
    await _value(conn, "lock_key", key=key)


# -- cases ---------------------------------------------------------------------------


async def case_by_request(db: Db, request_owner: str, request_id: uuid.UUID) -> Case | None:
    return await _row(
        db, "case_by_request", Case, request_owner=request_owner, request_id=request_id
    )


async def get_case(db: Db, case_id: uuid.UUID) -> Case | None:
    return await _row(db, "get_case", Case, case_id=case_id)


async def overlapping_case(
    conn: Conn, person_index: bytes, start: dt.datetime, end: dt.datetime
) -> uuid.UUID | None:
    """The person's latest case whose infectious window overlaps [start, end)."""
    found: uuid.UUID | None = await _value(
        conn, "overlapping_case", person_index=person_index, window_start=start, window_end=end
    )
    return found


async def insert_case(conn: Conn, case: Case, request_owner: str) -> Case:
    return await _one(
        conn, "insert_case", Case, **Case.columns(vars(case)), request_owner=request_owner
    )


async def raise_risk_to_case(
    conn: Conn, person_id: uuid.UUID, exposure_time: dt.datetime, expire_time: dt.datetime
) -> bool:
    """Whether the person's status changed to a confirmed case's HIGH."""
    changed = await _value(
        conn,
        "raise_risk_to_case",
        person_id=person_id,
        exposure_time=exposure_time,
        expire_time=expire_time,
    )
    return changed is not None


# -- access requests and grants ------------------------------------------------------


async def access_request_by_request(
    db: Db, request_owner: str, request_id: uuid.UUID
) -> AccessRequest | None:
    return await _row(
        db,
        "access_request_by_request",
        AccessRequest,
        request_owner=request_owner,
        request_id=request_id,
    )


async def get_access_request(db: Db, access_request_id: uuid.UUID) -> AccessRequest | None:
    return await _row(db, "get_access_request", AccessRequest, access_request_id=access_request_id)


async def lock_access_request(conn: Conn, access_request_id: uuid.UUID) -> AccessRequest | None:
    """The request, locked for its decision (without its grant)."""
    return await _row(
        conn, "lock_access_request", AccessRequest, access_request_id=access_request_id
    )


async def open_access_of_case(conn: Conn, case_id: uuid.UUID) -> uuid.UUID | None:
    """The case's pending request, or the request of its active grant."""
    found: uuid.UUID | None = await _value(conn, "open_access_of_case", case_id=case_id)
    return found


async def insert_access_request(
    conn: Conn,
    *,
    access_request_id: uuid.UUID,
    case_id: uuid.UUID,
    outbreak_reference: str,
    justification: str,
    window: tuple[dt.datetime, dt.datetime],
    requester: str,
    request_id: uuid.UUID | None,
    request_owner: str,
) -> None:
    await _value(
        conn,
        "insert_access_request",
        access_request_id=access_request_id,
        case_id=case_id,
        outbreak_reference=outbreak_reference,
        justification=justification,
        window_start=window[0],
        window_end=window[1],
        requester=requester,
        request_id=request_id,
        request_owner=request_owner,
    )


async def decide_access_request(
    conn: Conn, access_request_id: uuid.UUID, state: str, decider: str, comment: str
) -> None:
    """Approve or deny a request that must still be pending."""
    decided = await _value(
        conn,
        "decide_access_request",
        access_request_id=access_request_id,
        state=state,
        decider=decider,
        comment=comment,
    )
    if decided is None:
        raise RuntimeError("decide_access_request: the request was not pending")


async def insert_grant(
    conn: Conn, access_request_id: uuid.UUID, duration: dt.timedelta
) -> uuid.UUID:
    """The grant of an approved request: its case and window, from now for `duration`."""
    grant_id: uuid.UUID = await _value(
        conn,
        "insert_grant",
        grant_id=uuid.uuid4(),
        access_request_id=access_request_id,
        duration=duration,
    )
    return grant_id


async def lock_grant(conn: Conn, grant_id: uuid.UUID) -> Grant | None:
    return await _row(conn, "lock_grant", Grant, grant_id=grant_id)


async def revoke_grant(conn: Conn, grant_id: uuid.UUID, revoker: str, reason: str) -> Grant:
    """Revoke a grant that must not be revoked yet."""
    return await _one(
        conn, "revoke_grant", Grant, grant_id=grant_id, revoker=revoker, reason=reason
    )


async def cancel_traces_of_grant(conn: Conn, grant_id: uuid.UUID) -> int:
    """Cancel the grant's queued and running traces; how many."""
    return await _count(conn, "cancel_traces_of_grant", grant_id=grant_id)


async def cancel_notifications_of_grant(conn: Conn, grant_id: uuid.UUID) -> int:
    """Cancel the grant's queued messages; how many."""
    return await _count(conn, "cancel_notifications_of_grant", grant_id=grant_id)


# -- traces and contacts -------------------------------------------------------------


async def trace_by_request(db: Db, request_owner: str, request_id: uuid.UUID) -> Trace | None:
    return await _row(
        db, "trace_by_request", Trace, request_owner=request_owner, request_id=request_id
    )


async def get_trace(db: Db, trace_id: uuid.UUID) -> Trace | None:
    return await _row(db, "get_trace", Trace, trace_id=trace_id)


async def active_trace_of_grant(conn: Conn, grant_id: uuid.UUID) -> Trace | None:
    """The grant's queued or running trace."""
    return await _row(conn, "active_trace_of_grant", Trace, grant_id=grant_id)


async def insert_trace(
    conn: Conn,
    grant_id: uuid.UUID,
    starter: str,
    request_id: uuid.UUID | None,
    request_owner: str,
) -> Trace | None:
    """A queued trace of the grant's case and window; None when the grant already
    has a queued or running one, or `request_owner` used `request_id`."""
    return await _row(
        conn,
        "insert_trace",
        Trace,
        trace_id=uuid.uuid4(),
        grant_id=grant_id,
        starter=starter,
        request_id=request_id,
        request_owner=request_owner,
    )


async def wake_trace_workers(conn: Conn, trace_id: uuid.UUID) -> None:
    """Tell the trace workers at commit."""
    await _value(conn, "wake_trace_workers", trace_id=str(trace_id))


@dataclass(frozen=True)
class ContactKey:
    """Where a page of contacts starts: after this (rank, row), or at the start."""

    rank: int | None = None
    row: int | None = None


async def list_trace_contacts(
    conn: Conn, trace_id: uuid.UUID, min_rank: int, after: ContactKey, limit: int
) -> list[TraceContact]:
    """Highest risk first, then row order; at `min_rank` or above."""
    return await _rows(
        conn,
        "list_trace_contacts",
        TraceContact,
        trace_id=trace_id,
        min_rank=min_rank,
        after_rank=after.rank,
        after_row=after.row,
        limit=limit,
    )


async def count_export_rows(conn: Conn, trace_id: uuid.UUID, min_rank: int) -> int:
    count: int = await _value(conn, "count_export_rows", trace_id=trace_id, min_rank=min_rank)
    return count


async def export_rows(
    conn: Conn, trace_id: uuid.UUID, min_rank: int, prefetch: int
) -> AsyncIterator[ExportRow]:
    """The export's rows through a cursor, `prefetch` at a time (in a transaction)."""
    statement = Q["export_rows"]
    args = statement.args({"trace_id": trace_id, "min_rank": min_rank})
    async for row in conn.cursor(statement.sql, *args, prefetch=prefetch):
        yield ExportRow.of(row)


# -- risk status ---------------------------------------------------------------------


async def get_risk_status(conn: Conn, person_id: uuid.UUID) -> RiskStatus | None:
    return await _row(conn, "get_risk_status", RiskStatus, person_id=person_id)


async def clear_risk_status(conn: Conn, person_id: uuid.UUID, reason: str) -> RiskStatus:
    """Back to none, for `reason` (a risk.CLEAR_REASONS name)."""
    return await _one(conn, "clear_risk_status", RiskStatus, person_id=person_id, reason=reason)
