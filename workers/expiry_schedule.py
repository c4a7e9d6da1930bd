"""Scheduled expiry: every `settings.expiry_interval_s`, one expiry run
(services/domain/retention/expiry_run.py) as the worker principal, audited as
"worker.expiry.<step>". The run is asyncio code and crosses the trio/asyncio
bridge as one call; inside, it is a handful of set-based statements and the key
store's file operations.

Runs are serialized cluster-wide by an advisory lock, so every worker process
may run this task: the second one to arrive waits, then finds nothing left. A
failed run (the database restarting, the key store unreachable) is logged by
type and retried after a backoff; it never ends the worker process.
"""

from __future__ import annotations

import datetime as dt

import asyncpg
import structlog
import trio
import trio_asyncio

from services.domain.retention import expiry_run
from services.kernel import audit
from services.kernel.config import Settings
from services.kernel.keys import KeyError_, KeyStore
from workers import ingest

log = structlog.get_logger()

RETRY_FIRST_S, RETRY_CAP_S = 5.0, 300.0

_ERRORS: tuple[type[BaseException], ...] = (*ingest.DB_ERRORS, KeyError_)


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


async def expiry_task(
    pool: asyncpg.Pool,
    keystore: KeyStore,
    settings: Settings,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run expiry on the schedule until cancelled; off when the interval is 0."""
    task_status.started()
    if settings.expiry_interval_s <= 0:
        log.info("expiry_schedule_off")
        return
    backoff = ingest.Backoff(first=RETRY_FIRST_S, cap=RETRY_CAP_S)
    await trio.sleep(settings.expiry_first_delay_s)
    while True:
        try:
            run = await run_once(pool, keystore)
        except _ERRORS as exc:
            delay = min(backoff.next(), settings.expiry_interval_s)
            log.warning("expiry_run_failed", retry_in_s=delay, **ingest.error_fields(exc))
        else:
            backoff.reset()
            delay = settings.expiry_interval_s
            log.info(
                "expiry_scheduled_run",
                run_id=str(run.run_id),
                reports={r.data_class: r.row_count for r in run.reports},
            )
        await trio.sleep(delay)
