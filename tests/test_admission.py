"""The admission control that bounds the inbox: pure arithmetic and timing on a
real event loop, no database."""

from __future__ import annotations

import asyncio
import time

from services.checkin.admission import Admission


def test_within_the_limit_everything_is_admitted_at_once() -> None:
    gate = Admission(lag_limit=1000)
    gate.observe(lag=999, smallest_id=1, now=0.0)
    assert not gate.lagging
    assert gate.rate == float("inf")
    assert asyncio.run(gate.admit(10_000)) == 0.0


def test_the_admitted_rate_follows_the_drain_and_falls_with_the_lag() -> None:
    gate = Admission(lag_limit=1000)
    gate.observe(lag=4000, smallest_id=10_000, now=0.0)
    gate.observe(lag=4000, smallest_id=30_000, now=1.0)  # 20k rows/s leave the inbox
    assert gate.drain_rate == 20_000
    assert gate.rate == 20_000 * 1000 / 4000  # lag 4x the limit: a quarter of the drain
    gate.observe(lag=2000, smallest_id=50_000, now=2.0)
    assert gate.rate == 20_000 * 1000 / 2000
    # Workers stalled: the rate falls to the floor, never to zero.
    for second in range(3, 30):
        gate.observe(lag=2000, smallest_id=50_000, now=float(second))
    assert gate.rate == 500.0


def test_admission_waits_in_proportion_while_lagging() -> None:
    gate = Admission(lag_limit=100)
    gate.observe(lag=200, smallest_id=0, now=0.0)
    gate.observe(lag=200, smallest_id=4000, now=1.0)  # drain 4000/s -> admit 2000/s

    async def three_batches() -> float:
        started = time.monotonic()
        for _ in range(3):
            await gate.admit(1000)
        return time.monotonic() - started

    took = asyncio.run(three_batches())
    # 3000 rows at 2000 rows/s, less the bucket's first half second: a second at
    # least (only a lower bound: a busy machine may always take longer).
    assert took >= 0.9
    assert gate.waited_s >= 0.9
