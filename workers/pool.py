"""The worker pool: a trio program reaching Postgres through trio-asyncio.

Today the pool only proves itself alive (a heartbeat row per worker, readable by
operators); the ingest, expiry, trace and outbox jobs arrive with their issues and
run as tasks in the same nursery. Database calls cross the trio/asyncio bridge,
which costs a few times a plain call, so every job must be coarse: one
set-based statement per batch, never one call per row.
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

from services.core import db
from services.core import logging as sc_logging
from services.core.config import Settings

log = structlog.get_logger()

HEARTBEAT_SECONDS = 5.0

_BEAT = """
INSERT INTO worker_heartbeats (worker_id, host, pid, start_time, beat_time)
VALUES ($1, $2, $3, $4, now())
ON CONFLICT (worker_id) DO UPDATE SET beat_time = now()
"""


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
                await self._execute(_BEAT, self.worker_id, host, os.getpid(), self.start_time)
                self.beats += 1
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                # The database may restart under us; the pool reconnects on the next beat.
                log.warning("worker_heartbeat_failed", error_type=type(exc).__name__)
            if first:
                first = False
                task_status.started()
            await trio.sleep(HEARTBEAT_SECONDS)

    async def deregister(self) -> None:
        with trio.move_on_after(5) as scope:
            scope.shield = True  # cancellation must not skip the goodbye
            try:
                await self._execute(
                    "DELETE FROM worker_heartbeats WHERE worker_id = $1", self.worker_id
                )
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                log.warning("worker_deregister_failed")


async def run(settings: Settings) -> None:
    async with trio_asyncio.open_loop():
        pool = await trio_asyncio.aio_as_trio(db.create_pool)(settings, db.SERVICE_ROLES["worker"])
        workers = WorkerPool(settings, pool)
        try:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async with trio.open_nursery() as nursery:
                    await nursery.start(workers.heartbeat)
                    log.info("workers_started", worker_id=workers.worker_id)
                    async for signum in signals:
                        log.info("workers_stopping", signal=signal.Signals(signum).name)
                        nursery.cancel_scope.cancel()
                        break
        finally:
            await workers.deregister()
            with trio.CancelScope(shield=True):
                await trio_asyncio.aio_as_trio(pool.close)()
            log.info("workers_stopped", worker_id=workers.worker_id, beats=workers.beats)


def main() -> None:
    settings = Settings.from_env()
    sc_logging.configure(settings.log_level, settings.log_format, process="workers")
    trio.run(run, settings)
