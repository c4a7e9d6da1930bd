"""The worker pool: a trio program reaching Postgres through trio-asyncio.

One process runs, in one nursery: a heartbeat (a row per worker, readable by
operators), the ingest tasks that move scans from the inbox to the store
(`settings.ingest_workers` of them, plus one LISTEN connection that wakes them),
the maintenance that keeps partitions and day keys ahead, scheduled expiry
(workers/expiry_schedule.py), trace jobs (workers/traces.py), the notification outbox
(workers/notify.py), and one LISTEN connection that wakes the last two. Database
calls cross the trio/asyncio bridge, which costs a few times a plain call, so
every job must be coarse: one set-based statement per batch, never one per row.

SIGTERM or SIGINT stops the process gracefully: batches in flight get a few
seconds to commit (else they are cancelled and roll back), then every task is
cancelled, the worker deregisters and the pool closes. Exit code 0.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import socket
import uuid

import asyncpg
import structlog
import trio
import trio_asyncio

from services.kernel import db
from services.kernel import logging as sc_logging
from services.kernel.config import Settings
from services.kernel.keys import KeyStore, open_keystore
from workers import expiry_schedule, ingest, notify, senders, traces

log = structlog.get_logger()

HEARTBEAT_SECONDS = 5.0


class WorkerPool:
    def __init__(self, settings: Settings, pool: asyncpg.Pool) -> None:
        self.settings = settings
        self.pool = pool
        self.worker_id = f"worker-{uuid.uuid4().hex[:12]}"
        self.start_time = dt.datetime.now(dt.UTC)
        self.beats = 0

    async def _execute(self, query: str, *args: object) -> None:
        await trio_asyncio.aio_as_trio(self.pool.execute)(query, *args)

    async def heartbeat(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        host = socket.gethostname()
        first = True
        while True:
            try:
                await self._execute(
                    ingest.Q["heartbeat"], self.worker_id, host, os.getpid(), self.start_time
                )
                self.beats += 1
            except ingest.DB_ERRORS as exc:
                # The database may restart under us; the pool reconnects on the next beat.
                log.warning("worker_heartbeat_failed", **ingest.error_fields(exc))
            if first:
                first = False
                task_status.started()
            await trio.sleep(HEARTBEAT_SECONDS)

    async def deregister(self) -> None:
        with trio.move_on_after(5) as scope:
            scope.shield = True  # cancellation must not skip the goodbye
            try:
                await self._execute(ingest.Q["deregister"], self.worker_id)
            except ingest.DB_ERRORS as exc:
                log.warning("worker_deregister_failed", **ingest.error_fields(exc))


async def _connect(settings: Settings) -> asyncpg.Pool:
    """The worker's pool, waiting for the database if it is not up yet (a worker may
    start while Postgres restarts); SIGTERM meanwhile simply ends the process."""
    pause = 0.2
    while True:
        try:
            pool: asyncpg.Pool = await trio_asyncio.aio_as_trio(db.create_pool)(
                settings, db.SERVICE_ROLES["worker"]
            )
            return pool
        except ingest.DB_ERRORS as exc:
            log.warning("worker_connect_failed", retry_in_s=pause, **ingest.error_fields(exc))
            await trio.sleep(pause)
            pause = min(pause * 2, 5.0)


async def run(settings: Settings, keystore: KeyStore | None = None) -> None:
    keystore = keystore or open_keystore(settings.keystore_dir, settings.secrets_dir)
    async with trio_asyncio.open_loop():
        pool = await _connect(settings)
        workers = WorkerPool(settings, pool)
        ingestor = ingest.Ingestor(settings, pool)
        # Exposure: trace jobs and the notification outbox (workers/traces.py, notify.py).
        outbox = notify.Outbox(settings, pool, keystore, senders.make_sender(settings))
        tracer = traces.TraceRunner(settings, pool, keystore, workers.worker_id, outbox.wakeup)
        try:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async with trio.open_nursery() as nursery:
                    await nursery.start(workers.heartbeat)
                    # Partitions and day keys first, so the first batches find them.
                    await nursery.start(ingest.maintenance_task, pool, keystore, settings)
                    await nursery.start(ingestor.listen_task)
                    for _ in range(max(1, settings.ingest_workers)):
                        await nursery.start(ingestor.ingest_task)
                    nursery.start_soon(ingestor.summary_task)
                    # Retention: expiry on a schedule (workers/expiry_schedule.py).
                    await nursery.start(expiry_schedule.expiry_task, pool, keystore, settings)
                    await nursery.start(
                        traces.listen_task,
                        settings,
                        {traces.TRACE_CHANNEL: tracer.wakeup, traces.NOTIFY_CHANNEL: outbox.wakeup},
                    )
                    await nursery.start(tracer.trace_task)
                    await nursery.start(outbox.outbox_task)
                    log.info(
                        "workers_started",
                        worker_id=workers.worker_id,
                        ingest_tasks=max(1, settings.ingest_workers),
                        batch_rows=ingestor.batch_rows,
                    )
                    async for signum in signals:
                        log.info("workers_stopping", signal=signal.Signals(signum).name)
                        ingestor.begin_stop()
                        nursery.cancel_scope.cancel()
                        break
        finally:
            await workers.deregister()
            with trio.move_on_after(ingest.STOP_GRACE_SECONDS) as scope:
                scope.shield = True
                await trio_asyncio.aio_as_trio(pool.close)()
            if scope.cancelled_caught:  # a connection that would not close cleanly
                pool.terminate()
            log.info("ingest_summary", **ingestor.stats.summary())
            log.info("workers_stopped", worker_id=workers.worker_id, beats=workers.beats)


def main() -> None:
    settings = Settings.from_env()
    sc_logging.configure(settings.log_level, settings.log_format, process="workers")
    trio.run(run, settings)
