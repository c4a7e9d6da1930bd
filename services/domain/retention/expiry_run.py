"""One expiry run: delete what is past its retention period, destroy its keys, and
leave a deletion report per class. Shared by the Retention server (RunExpiry, on
demand) and the workers (on a schedule, through trio-asyncio: `run_expiry` is one
coarse call across the bridge).

Runs are serialized cluster-wide by an advisory lock: an on-demand run that meets
a scheduled one waits for it, then finds only what is left. A run reads the
policies once, after taking the lock, and works class by class (in DataClass
order); each class commits on its own (deletions, audit records and its report
together). The classes and their bounds are in periods.py; each class's step is
in a module of its own, which says how it deletes and why that is crash safe:

- check_ins, and the entry_decisions among them: check_in_expiry.py (whole day
  partitions, after their day keys);
- case_records: case_expiry.py (after their case keys);
- notifications, inactive_enrollments, grievances, audit_events: row_expiry.py
  (one statement each; `register_extra` is the hook for the last two).

Every run that is not a dry run also deletes EnrollPerson's code challenges past
their own expire time (minutes, not a period of days, so not a data class).

This module is the run's public face: the names below are what the Retention
server, the workers, the benchmark and the tests use.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence

import asyncpg
import structlog

from services.domain.retention import audit_actions, case_expiry, check_in_expiry, row_expiry
from services.domain.retention.check_in_expiry import SEAL_AFTER, last_expired_day, midnight
from services.domain.retention.periods import CLASSES, ClassBounds
from services.domain.retention.row_expiry import (
    _EXTRA,
    ExtraDeletion,
    ExtraExpirer,
    register_extra,
)
from services.domain.retention.run_context import (
    ON_DEMAND,
    SCHEDULED,
    Deletion,
    ExpiryRun,
    Q,
    RunContext,
)
from services.kernel.auth import Principal
from services.kernel.keys import KeyStore

__all__ = [
    "CLASSES",
    "ON_DEMAND",
    "RUN_EXPIRY_METHOD",
    "SCHEDULED",
    "SEAL_AFTER",
    "_EXTRA",
    "ClassBounds",
    "Deletion",
    "ExpiryRun",
    "ExtraDeletion",
    "ExtraExpirer",
    "Q",
    "last_expired_day",
    "midnight",
    "register_extra",
    "run_expiry",
]

log = structlog.get_logger()

RUN_EXPIRY_METHOD = audit_actions.RUN_EXPIRY

Step = Callable[[RunContext, str], Awaitable[None]]

# entry_decisions have no step: they go with their check-in day (check_in_expiry.py).
STEPS: dict[str, Step] = {
    "check_ins": check_in_expiry.expire,
    "case_records": case_expiry.expire,
    "inactive_enrollments": row_expiry.expire,
    "notifications": row_expiry.expire,
    "grievances": row_expiry.expire,
    "audit_events": row_expiry.expire,
}


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
            context = RunContext(conn, keystore, now, run, requester, policies, wanted)
            for data_class in wanted:
                step = STEPS.get(data_class)
                if step is not None:
                    await step(context, data_class)
            if not dry_run:
                challenges = await conn.fetchval(Q["delete_expired_challenges"], now)
                if challenges:
                    log.info("expiry_rows", data_class="enrollment_challenges", rows=challenges)
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
