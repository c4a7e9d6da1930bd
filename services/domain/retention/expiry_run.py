"""One expiry run: delete what is past its retention period, destroy its keys, and
leave a deletion report per class. Shared by the Retention server (RunExpiry, on
demand) and the workers (on a schedule, through trio-asyncio: `run_expiry` is one
coarse call across the bridge).

Runs are serialized cluster-wide by an advisory lock: an on-demand run that meets
a scheduled one waits for it, then finds only what is left. A run reads the
policies once, after taking the lock, and works class by class; each class
commits on its own (deletions, audit records and its report together).

The classes, by their names in `retention_policies` (DataClass without prefix):

- check_ins: every day partition of `checkins` whose whole UTC day is older than
  the period is DETACHed in the run's transaction and its files DROPped right
  after it commits (whole files; never a row-by-row DELETE of the store), the
  day's inbox rows are deleted, and the day key is destroyed in the key store
  and recorded in day_keys.destroy_time.
- entry_decisions: denials at the door are rows of the check-in store (outcome
  'denied'), so they go with their day, at the check-ins period. When check_ins
  is expired, the denials among the dropped rows get an entry_decisions report of
  their own. A longer entry_decisions period is not honoured today: keeping a
  denial past its day would need it re-encrypted under a key of its own.
- case_records: cases not yet purged whose last report, trace or case record is
  older than the period (and with no trace queued or running) lose their trace
  contacts, case records and encrypted person; their case key is destroyed and
  cases.purge_time set. The case row stays (ids, dates, counts).
- notifications: sent, failed or cancelled longer ago than the period (by
  finish_time), deleted.
- inactive_enrollments: people whose last_activity_time (last check-in or token
  issued; the enrollment time until something touches it) is older than the
  period are deleted and recorded in erased_people.
- grievances (counted from resolution; open ones stay) and audit_events (a prefix
  of the hash chain, with a checkpoint kept so the chain still verifies): deleted
  by SECURITY DEFINER functions of migration 0005, registered at the end of this
  module (`register_extra`).

Crash safety, check-ins and cases alike: the key is destroyed FIRST, then the
rows are deleted and the destruction recorded in one transaction. A crash in
between leaves rows that nobody can read or link any more (the same state an old
backup is in), never the reverse: dropping first and then failing to destroy the
key would leave every backup of the day readable with a key still in the store.
A re-run finds the leftovers (a partition past the period, a day key or case not
recorded destroyed), destroys again (idempotent: the tombstone stays, a missing
file is fine) and deletes what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import structlog

from services.kernel import audit
from services.kernel.auth import Principal
from services.kernel.db import Conn, load_queries
from services.kernel.keys import KeyStore

log = structlog.get_logger()

Q = load_queries(Path(__file__).with_name("expiry_run.sql"))

RUN_EXPIRY_METHOD = "stopcovid.retention.v1.RetentionService/RunExpiry"
SCHEDULED, ON_DEMAND = "scheduled", "on_demand"


@dataclass(frozen=True)
class ClassBounds:
    default_days: int
    min_days: int
    max_days: int


# In DataClass order (enum numbers 1..7); the proto's defaults and bounds. The
# CHECK on retention_policies repeats the bounds.
CLASSES: dict[str, ClassBounds] = {
    "check_ins": ClassBounds(28, 28, 90),
    "case_records": ClassBounds(90, 28, 90),
    "inactive_enrollments": ClassBounds(90, 28, 365),
    "notifications": ClassBounds(28, 28, 90),
    "grievances": ClassBounds(365, 90, 1825),
    "audit_events": ClassBounds(730, 365, 3650),
    "entry_decisions": ClassBounds(28, 28, 90),
}


@dataclass
class ExtraDeletion:
    """What an extra expirer deleted (or, in a dry run, would delete)."""

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


def register_extra(data_class: str, expirer: ExtraExpirer) -> None:
    """Give `data_class` (grievances, audit_events) its expirer. Register at import
    of a module both the Retention server and the workers import (services/domain)."""
    if data_class not in ("grievances", "audit_events"):
        raise ValueError(f"{data_class!r} is expired by run_expiry itself")
    _EXTRA[data_class] = expirer


@dataclass
class Deletion:
    """One class's deletion report (stored unless the run is a dry run)."""

    data_class: str
    period_days: int
    row_count: int
    data_start: dt.datetime | None
    data_end: dt.datetime | None
    destroyed_key_ids: list[str] = field(default_factory=list)
    deletion_report_id: uuid.UUID | None = None
    create_time: dt.datetime | None = None


@dataclass
class ExpiryRun:
    run_id: uuid.UUID | None  # None for a dry run
    trigger: str
    requester: str
    dry_run: bool
    reports: list[Deletion] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per step (for the benchmark and the logs)."""


def midnight(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(), dt.UTC)


SEAL_AFTER = dt.timedelta(days=8)
"""A day is counted for its deletion report once this old: past the longest scan age
(at most 7 days, see Settings.max_scan_age_s), so no scan can be added to it."""


def last_expired_day(now: dt.datetime, period_days: int) -> dt.date:
    """The newest UTC day wholly older than the period at `now`: day d goes once
    d + 1 day + period <= now."""
    return (now - dt.timedelta(days=period_days + 1)).date()


class _Run:
    def __init__(
        self,
        conn: Conn,
        keystore: KeyStore,
        *,
        now: dt.datetime,
        run: ExpiryRun,
        principal: Principal,
        policies: dict[str, int],
        wanted: Sequence[str],
    ) -> None:
        self.conn = conn
        self.keystore = keystore
        self.now = now
        self.run = run
        self.principal = principal
        self.policies = policies
        self.wanted = wanted

    def action(self, step: str) -> str:
        return f"worker.expiry.{step}" if self.run.trigger == SCHEDULED else RUN_EXPIRY_METHOD

    async def audit(
        self,
        step: str,
        resource_type: str,
        resource_id: str,
        details: dict[str, Any],
        case_id: uuid.UUID | None = None,
    ) -> None:
        assert self.run.run_id is not None
        await audit.record(
            self.conn,
            self.action(step),
            resource_type,
            resource_id,
            {"step": step, "run_id": str(self.run.run_id), **details},
            case_id=case_id,
            principal=self.principal,
        )

    async def report(self, deletion: Deletion) -> None:
        """Store the report (inside the class's transaction) unless dry run."""
        if not self.run.dry_run:
            row = await self.conn.fetchrow(
                Q["insert_report"],
                uuid.uuid4(),
                self.run.run_id,
                deletion.data_class,
                deletion.period_days,
                deletion.row_count,
                deletion.data_start,
                deletion.data_end,
                deletion.destroyed_key_ids,
                self.run.trigger,
                self.run.requester,
            )
            assert row is not None
            deletion.deletion_report_id = row["deletion_report_id"]
            deletion.create_time = row["create_time"]
        self.run.reports.append(deletion)

    def timed(self, name: str, began: float) -> None:
        self.run.timings[name] = self.run.timings.get(name, 0.0) + time.perf_counter() - began

    # -- check-ins (and the denials among them) ------------------------------------

    async def seal_days(self) -> None:
        """Count the rows of days that can no longer receive scans, once each, so
        that expiring them later reads the count instead of scanning the day."""
        last = (self.now - SEAL_AFTER).date()
        began = time.perf_counter()
        for row in await self.conn.fetch(Q["unsealed_days"], last):
            await self.conn.execute(Q["seal_day"], row["day"])
        self.timed("seal_s", began)

    async def reclaim(self) -> None:
        """Remove the files of expired days' detached partitions: committed expiry
        has already taken them out of the store; this frees the disk, in time
        proportional to their size. Also finishes what a run that died left."""
        began = time.perf_counter()
        await self.conn.fetchval(Q["drop_expired"])
        self.timed("reclaim_s", began)

    async def check_ins(self) -> None:
        if not self.run.dry_run:
            await self.reclaim()
            await self.seal_days()
        period = self.policies["check_ins"]
        last = last_expired_day(self.now, period)
        days: list[dt.date] = [r["day"] for r in await self.conn.fetch(Q["expirable_days"], last)]
        if not days:
            return
        began = time.perf_counter()
        counts = {}
        for day in days:
            row = await self.conn.fetchrow(Q["sealed_count"], day)
            if row is None:
                row = await self.conn.fetchrow(Q["count_day"], day)
            assert row is not None
            counts[day] = (row["row_count"], row["denied_count"])
        self.timed("count_s", began)
        rows = sum(c[0] for c in counts.values())
        denied = sum(c[1] for c in counts.values())
        span = (midnight(days[0]), midnight(days[-1] + dt.timedelta(days=1)))
        if self.run.dry_run:
            await self.report(
                Deletion("check_ins", period, rows, *span, [f"day-{d.isoformat()}" for d in days])
            )
            if denied and "entry_decisions" in self.wanted:
                await self.report(Deletion("entry_decisions", period, denied, *span))
            return
        # Keys first (see the module docstring): from here on the days are unreadable.
        began = time.perf_counter()
        await asyncio.to_thread(_destroy_day_keys, self.keystore, days)
        self.timed("destroy_keys_s", began)
        began = time.perf_counter()
        async with self.conn.transaction():
            inbox = 0
            for day in days:
                row = await self.conn.fetchrow(Q["expire_day"], day)
                assert row is not None
                inbox += row["inbox_rows"]
                await self.audit(
                    "drop_partition",
                    "checkins_day",
                    day.isoformat(),
                    {
                        "row_count": counts[day][0],
                        "denied_count": counts[day][1],
                        "inbox_row_count": row["inbox_rows"],
                        "partition_dropped": row["dropped"],
                    },
                )
            recorded = await self.conn.fetch(Q["record_day_keys_destroyed"], days)
            key_ids = sorted(r["key_id"] for r in recorded)
            for r in sorted(recorded, key=lambda r: r["day"]):
                await self.audit("destroy_day_key", "day_key", r["key_id"], {})
            await self.report(Deletion("check_ins", period, rows + inbox, *span, key_ids))
            if denied and "entry_decisions" in self.wanted:
                await self.report(Deletion("entry_decisions", period, denied, *span))
        self.timed("drop_s", began)
        await self.reclaim()
        log.info(
            "expiry_check_ins",
            days=[d.isoformat() for d in days],
            rows=rows + inbox,
            keys_destroyed=len(key_ids),
        )

    # -- case records ------------------------------------------------------------

    async def case_records(self) -> None:
        period = self.policies["case_records"]
        cutoff = self.now - dt.timedelta(days=period)
        cases = await self.conn.fetch(Q["expirable_cases"], cutoff)
        if not cases:
            return
        ids = [r["case_id"] for r in cases]
        rows = sum(r["contact_count"] + r["record_count"] for r in cases)
        starts = [r["data_start"] for r in cases if r["data_start"] is not None]
        ends = [r["data_end"] for r in cases if r["data_end"] is not None]
        span = (min(starts, default=None), max(ends, default=None))
        key_ids = [f"case-{c}" for c in ids]
        if self.run.dry_run:
            await self.report(Deletion("case_records", period, rows, *span, key_ids))
            return
        began = time.perf_counter()
        await asyncio.to_thread(_destroy_case_keys, self.keystore, ids)
        self.timed("destroy_case_keys_s", began)
        async with self.conn.transaction():
            done = await self.conn.fetchrow(Q["purge_cases"], ids)
            assert done is not None
            for r in cases:
                await self.audit(
                    "purge_case_records",
                    "case",
                    str(r["case_id"]),
                    {"contact_count": r["contact_count"], "record_count": r["record_count"]},
                    case_id=r["case_id"],
                )
                await self.audit(
                    "destroy_case_key",
                    "case_key",
                    f"case-{r['case_id']}",
                    {},
                    case_id=r["case_id"],
                )
            deleted = done["contact_count"] + done["record_count"]
            await self.report(Deletion("case_records", period, deleted, *span, key_ids))
        log.info("expiry_case_records", cases=len(ids), rows=deleted)

    # -- plain row classes ---------------------------------------------------------

    async def _rows(self, data_class: str, count: str, delete: str, step: str) -> None:
        period = self.policies[data_class]
        cutoff = self.now - dt.timedelta(days=period)
        if self.run.dry_run:
            row = await self.conn.fetchrow(Q[count], cutoff)
            assert row is not None
            if row["row_count"]:
                await self.report(
                    Deletion(
                        data_class, period, row["row_count"], row["data_start"], row["data_end"]
                    )
                )
            return
        async with self.conn.transaction():
            row = await self.conn.fetchrow(Q[delete], cutoff)
            assert row is not None
            if not row["row_count"]:
                return
            await self.audit(step, data_class, data_class, {"row_count": row["row_count"]})
            await self.report(
                Deletion(data_class, period, row["row_count"], row["data_start"], row["data_end"])
            )
        log.info("expiry_rows", data_class=data_class, rows=row["row_count"])

    async def notifications(self) -> None:
        await self._rows(
            "notifications", "count_notifications", "delete_notifications", "delete_notifications"
        )

    async def inactive_enrollments(self) -> None:
        await self._rows(
            "inactive_enrollments",
            "count_inactive_people",
            "delete_inactive_people",
            "delete_inactive_enrollments",
        )

    async def registered(self, data_class: str) -> None:
        expirer = _EXTRA.get(data_class)
        if expirer is None:
            return
        period = self.policies[data_class]
        cutoff = self.now - dt.timedelta(days=period)
        async with self.conn.transaction():
            found = await expirer(self.conn, data_class, cutoff, self.run.dry_run)
            if not found.row_count:
                return
            if not self.run.dry_run:
                await self.audit(
                    f"delete_{data_class}", data_class, data_class, {"row_count": found.row_count}
                )
            await self.report(
                Deletion(data_class, period, found.row_count, found.data_start, found.data_end)
            )


def _destroy_day_keys(keystore: KeyStore, days: Sequence[dt.date]) -> None:
    for day in days:
        keystore.destroy_day_key(day)


def _destroy_case_keys(keystore: KeyStore, case_ids: Sequence[uuid.UUID]) -> None:
    for case_id in case_ids:
        keystore.destroy_case_key(case_id)


async def run_expiry(
    pool: asyncpg.Pool,
    keystore: KeyStore,
    *,
    now: dt.datetime,
    classes: Sequence[str] | None = None,
    trigger: str,
    requester: Principal,
    dry_run: bool = False,
) -> ExpiryRun:
    """Expire `classes` (all when None or empty) as of `now` (an aware datetime: the
    real clock, or a test's). `trigger` is SCHEDULED (audited as
    "worker.expiry.<step>") or ON_DEMAND (audited as the RunExpiry method);
    `requester` is who acts (audit.WORKER for the schedule). A dry run deletes,
    destroys and stores nothing and returns the reports it would write."""
    if trigger not in (SCHEDULED, ON_DEMAND):
        raise ValueError(f"unknown expiry trigger {trigger!r}")
    if now.tzinfo is None:
        raise ValueError("now must be an aware datetime")
    unknown = set(classes or ()) - set(CLASSES)
    if unknown:
        raise ValueError(f"unknown data classes {sorted(unknown)}")
    wanted = [c for c in CLASSES if not classes or c in classes]
    run = ExpiryRun(
        run_id=None if dry_run else uuid.uuid4(),
        trigger=trigger,
        requester=requester.name if trigger == ON_DEMAND else "",
        dry_run=dry_run,
    )
    began = time.perf_counter()
    async with pool.acquire() as conn:
        # Waiting for another run may take longer than any one statement may.
        await conn.execute("SET statement_timeout = 0")
        await conn.execute(Q["lock"])
        try:
            run.timings["lock_wait_s"] = time.perf_counter() - began
            await conn.execute("SET statement_timeout = '10min'")
            policies = {r["data_class"]: r["period_days"] for r in await conn.fetch(Q["policies"])}
            work = _Run(
                conn,
                keystore,
                now=now,
                run=run,
                principal=requester,
                policies=policies,
                wanted=wanted,
            )
            for data_class in wanted:
                if data_class == "check_ins":
                    await work.check_ins()
                elif data_class == "case_records":
                    await work.case_records()
                elif data_class == "notifications":
                    await work.notifications()
                elif data_class == "inactive_enrollments":
                    await work.inactive_enrollments()
                elif data_class in ("grievances", "audit_events"):
                    await work.registered(data_class)
                # entry_decisions go with their check-in day (see check_ins).
        finally:
            # A broken connection has lost its lock with its session; the pool
            # discards it, and the error that broke it is the one to see.
            with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                await conn.execute(Q["unlock"])
                await conn.execute("RESET statement_timeout")
    run.timings["total_s"] = time.perf_counter() - began
    log.info(
        "expiry_run",
        run_id=str(run.run_id) if run.run_id else None,
        trigger=trigger,
        dry_run=dry_run,
        reports=len(run.reports),
        seconds=round(run.timings["total_s"], 3),
    )
    return run


def _sql_expirer(delete: str, count: str) -> ExtraExpirer:
    """An expirer calling one of the SECURITY DEFINER functions of migration 0005.
    Their rows' span is not returned, so a report names the cutoff as its end."""

    async def expire(
        conn: Conn, data_class: str, cutoff: dt.datetime, dry_run: bool
    ) -> ExtraDeletion:
        rows = await conn.fetchval(Q[count if dry_run else delete], cutoff)
        return ExtraDeletion(int(rows or 0), None, cutoff)

    return expire


register_extra("audit_events", _sql_expirer("expire_audit", "count_audit"))
register_extra("grievances", _sql_expirer("expire_grievances", "count_grievances"))
