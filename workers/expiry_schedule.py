"""Scheduled expiry: every `settings.expiry_interval_s`, the first time
`settings.expiry_first_delay_s` after start, one expiry run
(services/domain/retention/expiry_run.py) as the worker principal, audited as
"worker.expiry.<step>". A periodic job of the worker runtime (workers/runtime).
The run is asyncio code and crosses the trio/asyncio bridge as one call; inside,
it is a handful of set-based statements and the key store's file operations.

Runs are serialized cluster-wide by an advisory lock, so every worker process
may run this job: the second one to arrive waits, then finds nothing left. A
failed run (the database restarting, the key store unreachable) is logged by
type (`expiry_run_failed`) and retried after a backoff; it never ends the worker
process. An interval of 0 turns the schedule off in this process.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import asyncpg
import structlog
import trio_asyncio

from services.domain.retention import expiry_run
from services.kernel import audit, metrics
from services.kernel.config import Settings
from services.kernel.db import TRANSIENT_ERRORS
from services.kernel.keys import KeyError_, KeyStore
from workers.runtime.loop import ClaimLoop, Periodic, Shutdown

log = structlog.get_logger()

RETRY_FIRST_S, RETRY_CAP_S = 5.0, 300.0


async def run_once(
    pool: asyncpg.Pool, keystore: KeyStore, now: dt.datetime | None = None
) -> expiry_run.ExpiryRun:
    """One scheduled run, all classes, as of `now` (default: the real clock)."""
    run: expiry_run.ExpiryRun = await trio_asyncio.aio_as_trio(expiry_run.run_expiry)(
        pool,
        keystore,
        now=now or dt.datetime.now(dt.UTC),
        classes=None,
        trigger=expiry_run.SCHEDULED,
        requester=audit.WORKER,
        dry_run=False,
    )
    return run


def expiry_loop(
    settings: Settings, pool: asyncpg.Pool, keystore: KeyStore, shutdown: Shutdown
) -> ClaimLoop[Any] | None:
    """The schedule's loop; None (logged) when the interval is 0."""
    interval = settings.expiry_interval_s
    if interval <= 0:
        log.info("expiry_schedule_off")
        return None

    async def once() -> None:
        try:
            run = await run_once(pool, keystore)
        except Exception:
            metrics.EXPIRY_RUNS.labels(result="failed").inc()
            raise
        metrics.EXPIRY_RUNS.labels(result="ok").inc()
        metrics.EXPIRY_LAST_SUCCESS.set_to_current_time()
        for report in run.reports:
            metrics.KEYS_DESTROYED.labels(kind=report.data_class).inc(len(report.destroyed_key_ids))
        log.info(
            "expiry_scheduled_run",
            run_id=str(run.run_id),
            reports={r.data_class: r.row_count for r in run.reports},
        )

    job = Periodic("expiry_run", once, interval_s=interval, first_s=settings.expiry_first_delay_s)
    return ClaimLoop(
        job,
        shutdown,
        backoff=(min(RETRY_FIRST_S, interval), min(RETRY_CAP_S, interval)),
        errors=(*TRANSIENT_ERRORS, KeyError_),
    )
