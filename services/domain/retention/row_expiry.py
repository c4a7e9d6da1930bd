"""Expiry of the classes that go row by row, each in one set-based statement:

- notifications: sent, failed or cancelled longer ago than the period (by
  finish_time), deleted;
- inactive_enrollments: people whose last_activity_time (last check-in or token
  issued; the enrollment time until something touches it) is older than the
  period are deleted and recorded in erased_people, so their tokens are refused;
- grievances (counted from resolution; open ones stay) and audit_events (a prefix
  of the hash chain, with a checkpoint kept so the chain still verifies): deleted
  by SECURITY DEFINER functions of migration 0005.

Each class has an expirer (`ExtraExpirer`) in `_EXTRA`: its deletion, audit record
and report commit in one transaction.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from services.domain.retention.run_context import Deletion, Q, RunContext
from services.kernel.db import Conn, one

log = structlog.get_logger()


@dataclass
class ExtraDeletion:
    """What an expirer deleted (or, in a dry run, would delete)."""

    row_count: int
    data_start: dt.datetime | None = None
    data_end: dt.datetime | None = None


ExtraExpirer = Callable[[Conn, str, dt.datetime, bool], Awaitable[ExtraDeletion]]
"""`await expire(conn, data_class, cutoff, dry_run)` deletes the rows of
`data_class` whose own time (a grievance's resolution, an audit event's time) is
at or before `cutoff` (now minus the period) and says how many, with their time
span. `conn` is inside a transaction that run_expiry opened and commits: the
expirer runs only set-based SQL on it and neither commits nor audits; run_expiry
then records the audit event and the deletion report in the same transaction.
With `dry_run` true it only counts. It must be safe to run again (deleting
nothing more)."""

_EXTRA: dict[str, ExtraExpirer] = {}

REGISTRABLE = ("grievances", "audit_events")


def register_extra(data_class: str, expirer: ExtraExpirer) -> None:
    """Give `data_class` (grievances, audit_events) its expirer. Register at import
    of a module both the Retention server and the workers import (services/domain)."""
    if data_class not in REGISTRABLE:
        raise ValueError(f"{data_class!r} is expired by run_expiry itself")
    _EXTRA[data_class] = expirer


def _spanned(count: str, delete: str) -> ExtraExpirer:
    """An expirer whose two queries return the rows' count and time span."""

    async def expire(
        conn: Conn, data_class: str, cutoff: dt.datetime, dry_run: bool
    ) -> ExtraDeletion:
        row = one(await conn.fetchrow(Q[count if dry_run else delete], cutoff))
        return ExtraDeletion(row["row_count"], row["data_start"], row["data_end"])

    return expire


def _sql_expirer(delete: str, count: str) -> ExtraExpirer:
    """An expirer calling one of the SECURITY DEFINER functions of migration 0005.
    Their rows' span is not returned, so a report names the cutoff as its end."""

    async def expire(
        conn: Conn, data_class: str, cutoff: dt.datetime, dry_run: bool
    ) -> ExtraDeletion:
        rows = await conn.fetchval(Q[count if dry_run else delete], cutoff)
        return ExtraDeletion(int(rows or 0), None, cutoff)

    return expire


async def expire(run: RunContext, data_class: str) -> None:
    """Run the class's expirer in a transaction of its own with its audit record
    ("delete_<class>") and report; nothing when it deleted nothing."""
    expirer = _EXTRA.get(data_class)
    if expirer is None:
        return
    period = run.policies[data_class]
    async with run.conn.transaction():
        found = await expirer(run.conn, data_class, run.cutoff(data_class), run.dry_run)
        if not found.row_count:
            return
        if not run.dry_run:
            await run.audit(
                f"delete_{data_class}", data_class, data_class, {"row_count": found.row_count}
            )
        await run.report(
            Deletion(data_class, period, found.row_count, found.data_start, found.data_end)
        )
    if not run.dry_run:
        log.info("expiry_rows", data_class=data_class, rows=found.row_count)


_EXTRA["notifications"] = _spanned("count_notifications", "delete_notifications")
_EXTRA["inactive_enrollments"] = _spanned("count_inactive_people", "delete_inactive_people")
register_extra("audit_events", _sql_expirer("expire_audit", "count_audit"))
register_extra("grievances", _sql_expirer("expire_grievances", "count_grievances"))
