"""The ingest and days-ahead jobs of the worker pool: the steps of
services/domain/checkins/ingest.py, scheduled in the worker runtime
(workers/runtime).

- `IngestJob` claims a batch by moving it: for ingest, claiming is moving (one
  statement in one crossing of the trio/asyncio bridge, two more statements when
  a partition had to be made). A full batch means more is waiting, so its loop
  goes again at once; otherwise it waits for NOTIFY stopcovid_inbox or the poll.
  `settings.ingest_workers` tasks run one loop of it in each process.
- `days_ahead_loop`: the partitions and day keys of the days ahead, at start
  (the pool starts ingest after this first attempt) and every
  MAINTENANCE_SECONDS.
- `IngestStats` and `summary_task`: the process's counts, logged every
  SUMMARY_SECONDS while they move and once at stop (`ingest_summary`).

Every database call crosses the trio/asyncio bridge, which costs several times a
plain call, so a batch is one call, never one per row. Nothing here logs row
contents: only counts, days and the types of errors.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import structlog
import trio
import trio_asyncio

from services.domain.checkins import ingest
from services.domain.checkins.ingest import BatchResult
from services.kernel import metrics
from services.kernel.config import Settings
from services.kernel.keys import KeyStore
from workers.runtime.loop import POLL_SECONDS, ClaimLoop, Count, Periodic, Shutdown

log = structlog.get_logger()

MAINTENANCE_SECONDS = 60.0
"""How often partitions and day keys ahead are checked (they are needed days ahead)."""

SUMMARY_SECONDS = 60.0
"""How often the counters are logged while they move."""


@dataclass
class IngestStats:
    """What the ingest tasks of one process moved (counts only)."""

    claimed: int = 0
    stored: int = 0
    partition_repairs: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def duplicates(self) -> int:
        """Inbox rows dropped because the store already held that scan."""
        return self.claimed - self.stored

    def add(self, result: BatchResult) -> None:
        self.claimed += result.claimed
        self.stored += result.stored
        if result.repair is not None:
            self.partition_repairs += 1

    def summary(self, counters: Counter[Count]) -> dict[str, Any]:
        """With the counters of the ingest loop: its batches and errors."""
        return {
            "claimed": self.claimed,
            "stored": self.stored,
            "duplicates_dropped": self.duplicates,
            "batches": counters["batches"],
            "partition_repairs": self.partition_repairs,
            "errors": counters["errors"],
            "seconds": round(time.monotonic() - self.started, 1),
        }


class IngestJob:
    """Moves inbox rows into the store, `settings.ingest_batch_rows` a batch."""

    name = "ingest_batch"

    def __init__(self, settings: Settings, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.batch_rows = max(1, settings.ingest_batch_rows)
        self.poll_s = POLL_SECONDS
        self.stats = IngestStats()
        for result in ("stored", "duplicate"):
            metrics.INGEST_ROWS.labels(result=result)  # a series at zero from the start

    async def claim(self) -> BatchResult | None:
        result: BatchResult = await trio_asyncio.aio_as_trio(ingest.move_batch)(
            self.pool, self.batch_rows
        )
        return result if result.claimed or result.repair else None

    async def run(self, batch: BatchResult) -> bool:
        self.stats.add(batch)
        metrics.INGEST_ROWS.labels(result="stored").inc(batch.stored)
        metrics.INGEST_ROWS.labels(result="duplicate").inc(batch.claimed - batch.stored)
        if batch.repair is not None:
            log.info(
                "ingest_partitions_created",
                days=[d.isoformat() for d in batch.repair.created],
                inbox_days=batch.repair.inbox_days,
            )
        return batch.claimed >= self.batch_rows


async def summary_task(job: IngestJob, counters: Counter[Count]) -> None:
    """Log the counters every SUMMARY_SECONDS while they move (idle is quiet)."""
    last: tuple[int, int] = (-1, -1)
    while True:
        await trio.sleep(SUMMARY_SECONDS)
        now = (counters["batches"], counters["errors"])
        if now != last:
            log.info("ingest_summary", **job.stats.summary(counters))
            last = now


def days_ahead_loop(
    settings: Settings, pool: asyncpg.Pool, keystore: KeyStore, shutdown: Shutdown
) -> ClaimLoop[Any]:
    """Partitions and day keys ahead, at start and every MAINTENANCE_SECONDS; its
    `run` reports started after the first attempt."""

    async def once() -> None:
        result = await trio_asyncio.aio_as_trio(ingest.ensure_days_ahead)(pool, keystore, settings)
        if result.partitions_created:
            log.info("partitions_created", days=[d.isoformat() for d in result.partitions_created])

    job = Periodic("days_ahead", once, interval_s=MAINTENANCE_SECONDS)
    return ClaimLoop(job, shutdown, backoff=(1.0, MAINTENANCE_SECONDS), start_after_first=True)
