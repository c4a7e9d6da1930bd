"""The trace job of the worker pool: services/domain/exposure/trace_job.py,
scheduled in the worker runtime (workers/runtime).

A claim takes the oldest waiting trace; a run takes it through all its steps in
one crossing of the trio/asyncio bridge, then the loop claims again at once
(another may be waiting). Woken by NOTIFY stopcovid_trace, with the poll as
fallback. A run that queued notifications wakes this process's outbox at once.

A stop gives a trace in flight the runtime's grace to finish; when that runs out
the run is cancelled (its transaction rolls back) and the trace handed back at
once, rather than after its lease.
"""

from __future__ import annotations

import time
from collections import Counter

import asyncpg
import structlog
import trio
import trio_asyncio

from services.domain.exposure.trace_job import Claimed, Ended, TraceRunner
from services.kernel import metrics
from services.kernel.config import Settings
from services.kernel.db import TRANSIENT_ERRORS, error_fields
from services.kernel.keys import KeyStore
from workers.runtime.loop import POLL_SECONDS
from workers.runtime.wakeups import Wakeup

log = structlog.get_logger()

REQUEUE_SECONDS = 5.0
"""How long handing a cancelled trace back may take."""


class TraceJob:
    """Claims and runs traces, one at a time per task."""

    name = "trace_claim"

    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        keystore: KeyStore,
        worker_id: str,
        outbox: Wakeup | None = None,
    ) -> None:
        self.runner = TraceRunner.from_settings(pool, keystore, worker_id, settings)
        self.outbox = outbox
        self.poll_s = POLL_SECONDS
        self.finished: Counter[str] = Counter()

    async def claim(self) -> Claimed | None:
        claimed: Claimed | None = await trio_asyncio.aio_as_trio(self.runner.claim)()
        return claimed

    async def run(self, batch: Claimed) -> bool:
        started = time.monotonic()
        try:
            ended: Ended = await trio_asyncio.aio_as_trio(self.runner.run)(batch)
        except trio.Cancelled:
            with trio.move_on_after(REQUEUE_SECONDS) as scope:
                scope.shield = True
                try:
                    await trio_asyncio.aio_as_trio(self.runner.requeue)(batch)
                except TRANSIENT_ERRORS as exc:
                    log.warning("trace_requeue_failed", **error_fields(exc))
            raise
        self.finished[ended.outcome] += 1
        metrics.TRACES.labels(outcome=ended.outcome).inc()
        metrics.TRACE_SECONDS.labels(outcome=ended.outcome).observe(time.monotonic() - started)
        if ended.notified and self.outbox is not None:
            self.outbox.wake()
        return True
