"""The worker pool: one trio program per process, reaching Postgres through
trio-asyncio, its jobs run by the worker runtime (workers/runtime).

One process runs, in one nursery inside one shutdown cancel scope:

- a heartbeat (a row per worker, readable by operators), every HEARTBEAT_SECONDS;
- the days ahead: partitions and day keys (workers/ingest.py), first, so that
  the first batches find them;
- one LISTEN connection for the channels of all its jobs (stopcovid_inbox,
  stopcovid_trace, stopcovid_notify), waking them;
- ingest (`settings.ingest_workers` tasks) and its summary (workers/ingest.py);
- scheduled expiry (workers/expiry_schedule.py);
- trace jobs (workers/traces.py) and the notification outbox (workers/notify.py);
- the gauges of the database's state (workers/gauges.py), served with every other
  metric of the process on its metrics port (services/kernel/metrics.py).

Database calls cross the trio/asyncio bridge, which costs a few times a plain
call, so every job is coarse: one set-based statement per batch, never one per
row.

SIGTERM or SIGINT stops the process gracefully: batches in flight get
STOP_GRACE_SECONDS to finish (else they are cancelled: a statement rolls back, a
trace is handed back), every other task is cancelled at once, the worker
deregisters and the pool closes. Exit code 0.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import socket
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import structlog
import trio
import trio_asyncio

from services.kernel import channels, db, keystores, metrics, senders, tracing
from services.kernel import logging as sc_logging
from services.kernel.config import Settings
from services.kernel.db import TRANSIENT_ERRORS, error_fields
from services.kernel.keys import KeyStore
from workers import expiry_schedule, gauges, ingest, notify, traces
from workers.runtime.listen import listen
from workers.runtime.loop import STOP_GRACE_SECONDS, Backoff, ClaimLoop, Periodic, Shutdown
from workers.runtime.wakeups import Wakeups

log = structlog.get_logger()

Q = db.load_queries(Path(__file__).with_name("heartbeat.sql"))

HEARTBEAT_SECONDS = 5.0


class Heartbeat:
    """This process's row in worker_heartbeats."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.worker_id = f"worker-{uuid.uuid4().hex[:12]}"
        self.start_time = dt.datetime.now(dt.UTC)
        self.beats = 0

    async def _execute(self, query: str, *args: object) -> None:
        await trio_asyncio.aio_as_trio(self.pool.execute)(query, *args)

    async def beat(self) -> None:
        await self._execute(
            Q["heartbeat"], self.worker_id, socket.gethostname(), os.getpid(), self.start_time
        )
        self.beats += 1
        metrics.HEARTBEAT.set_to_current_time()

    def loop(self, shutdown: Shutdown) -> ClaimLoop[Any]:
        """A beat now and every HEARTBEAT_SECONDS; a failed one (the database may
        restart under us) is tried again after about as long."""
        job = Periodic("worker_heartbeat", self.beat, interval_s=HEARTBEAT_SECONDS)
        return ClaimLoop(
            job, shutdown, backoff=(HEARTBEAT_SECONDS, HEARTBEAT_SECONDS), start_after_first=True
        )

    async def deregister(self) -> None:
        with trio.move_on_after(5) as scope:
            scope.shield = True  # cancellation must not skip the goodbye
            try:
                await self._execute(Q["deregister"], self.worker_id)
            except TRANSIENT_ERRORS as exc:
                log.warning("worker_deregister_failed", **error_fields(exc))


async def _connect(settings: Settings) -> asyncpg.Pool:
    """The worker's pool, waiting for the database if it is not up yet (a worker may
    start while Postgres restarts); SIGTERM meanwhile simply ends the process."""
    backoff = Backoff(first=0.2, cap=5.0)
    while True:
        try:
            pool: asyncpg.Pool = await trio_asyncio.aio_as_trio(db.create_pool)(
                settings, db.SERVICE_ROLES["worker"]
            )
            return pool
        except TRANSIENT_ERRORS as exc:
            pause = backoff.next()
            log.warning("worker_connect_failed", retry_in_s=round(pause, 3), **error_fields(exc))
            await trio.sleep(pause)


async def run(settings: Settings, keystore: KeyStore | None = None) -> None:
    keystore = keystore or keystores.open_for(settings, db.SERVICE_ROLES["worker"])
    async with trio_asyncio.open_loop():
        pool = await _connect(settings)
        heartbeat = Heartbeat(pool)
        shutdown = Shutdown(STOP_GRACE_SECONDS)
        wakeups = Wakeups(channels.WORKER_POOL)
        ingest_job = ingest.IngestJob(settings, pool)
        ingest_loop = ClaimLoop(ingest_job, shutdown, wakeup=wakeups[channels.INBOX])
        outbox = notify.OutboxJob(settings, pool, keystore, senders.make_sender(settings))
        tracer = traces.TraceJob(
            settings, pool, keystore, heartbeat.worker_id, wakeups[channels.OUTBOX]
        )
        expiry = expiry_schedule.expiry_loop(settings, pool, keystore, shutdown)
        ingest_tasks = max(1, settings.ingest_workers)
        # Started in this order, after the heartbeat, the days ahead and LISTEN.
        loops: list[ClaimLoop[Any]] = [
            *([ingest_loop] * ingest_tasks),
            *([] if expiry is None else [expiry]),
            ClaimLoop(tracer, shutdown, wakeup=wakeups[channels.TRACE]),
            # A key missing from the key store, or a bug, must not stop the outbox:
            # the batch is retried after its lease (and given up after its attempts).
            ClaimLoop(outbox, shutdown, wakeup=wakeups[channels.OUTBOX], bugs=(Exception,)),
            *([gauges.gauges_loop(pool, shutdown)] if settings.metrics else []),
        ]
        first = [
            heartbeat.loop(shutdown),
            ingest.days_ahead_loop(settings, pool, keystore, shutdown),
        ]
        try:
            with (
                trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals,
                shutdown.scope,
            ):
                async with trio.open_nursery() as nursery:
                    for loop in first:
                        await nursery.start(loop.run)
                    await nursery.start(listen, settings, wakeups)
                    for loop in loops:
                        await nursery.start(loop.run)
                    nursery.start_soon(ingest.summary_task, ingest_job, ingest_loop.counters)
                    log.info(
                        "workers_started",
                        worker_id=heartbeat.worker_id,
                        ingest_tasks=ingest_tasks,
                        batch_rows=ingest_job.batch_rows,
                    )
                    async for signum in signals:
                        log.info("workers_stopping", signal=signal.Signals(signum).name)
                        shutdown.stop()
                        break
        finally:
            await heartbeat.deregister()
            with trio.move_on_after(STOP_GRACE_SECONDS) as scope:
                scope.shield = True
                await trio_asyncio.aio_as_trio(pool.close)()
            if scope.cancelled_caught:  # a connection that would not close cleanly
                pool.terminate()
            log.info("ingest_summary", **ingest_job.stats.summary(ingest_loop.counters))
            log.info(
                "workers_stopped",
                worker_id=heartbeat.worker_id,
                beats=heartbeat.beats,
                traces=dict(tracer.finished),
                notifications=dict(outbox.counts),
                jobs={loop.job.name: dict(loop.counters) for loop in (*first, *loops)},
            )


def main() -> None:
    settings = Settings.from_env()
    sc_logging.configure(settings.log_level, settings.log_format, process="workers")
    metrics.configure(settings.metrics, "workers")
    tracing.configure(settings.tracing, "workers")
    metrics.serve(settings.metrics_host, settings.metrics_ports["workers"], "workers")
    trio.run(run, settings)
