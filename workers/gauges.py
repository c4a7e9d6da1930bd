"""The worker pool's gauges of the database's state: traces by state, and the
notifications due and how long the oldest has waited (services/kernel/metrics.py).

A periodic job of the worker runtime, every GAUGES_SECONDS: two aggregate
statements, read by every worker process alike (a gauge, not a counter: the
same figure from each is fine; alert on its max).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg
import trio_asyncio

from services.kernel import db, metrics
from workers.runtime.loop import ClaimLoop, Periodic, Shutdown

Q = db.load_queries(Path(__file__).with_name("gauges.sql"))

GAUGES_SECONDS = 15.0

TRACE_STATES = ("queued", "running", "succeeded", "failed", "cancelled")


async def read(pool: asyncpg.Pool) -> None:
    """Read the figures and set the gauges."""
    by_state = await pool.fetch(Q["traces_by_state"])
    due = await pool.fetchrow(Q["notifications_due"])
    counts = {row["state"]: int(row["n"]) for row in by_state}
    for state in {*TRACE_STATES, *counts}:
        metrics.TRACES_BY_STATE.labels(state=state).set(counts.get(state, 0))
    if due is not None:
        metrics.NOTIFICATIONS_DUE.set(int(due["due"]))
        metrics.NOTIFICATION_LAG.set(max(0.0, float(due["oldest_s"] or 0.0)))


def gauges_loop(pool: asyncpg.Pool, shutdown: Shutdown) -> ClaimLoop[Any]:
    async def once() -> None:
        await trio_asyncio.aio_as_trio(read)(pool)

    job = Periodic("metrics_gauges", once, interval_s=GAUGES_SECONDS)
    return ClaimLoop(job, shutdown, backoff=(GAUGES_SECONDS, GAUGES_SECONDS))
