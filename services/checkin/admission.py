"""Backpressure: when the workers fall behind, admit scans only as fast as the inbox
drains, so the inbox (and every queue in front of it) stays bounded.

A delay per batch cannot do this: with hundreds of batches in flight over many
streams, any fixed delay still admits far more than the workers move (the first
benchmark let the inbox reach 940k rows with a 200k limit). So the server measures
what really matters, the rate at which rows leave the inbox (its smallest id moves
up as workers take rows in id order), and while the inbox is above its limit,
admits rows at

    drain rate x limit / lag

with a token bucket. Below the drain rate the lag shrinks; with N CheckIn servers
each admitting that much, the inbox settles near N x limit instead of growing.
Acks slow down with the admissions, device windows fill, and devices wait: that is
the only way memory stays flat on both sides.
"""

from __future__ import annotations

import asyncio
import time

_MIN_RATE = 500.0  # rows/s always admitted, so a stalled estimate never locks everyone out
_EWMA = 0.3


class Admission:
    def __init__(self, lag_limit: int) -> None:
        self.lag_limit = max(1, lag_limit)
        self.lag = 0
        self.drain_rate = 0.0  # rows/s leaving the inbox, smoothed
        self._last: tuple[float, int] | None = None  # (monotonic time, smallest inbox id)
        self._tokens = 0.0
        self._refilled = time.monotonic()
        self._lock = asyncio.Lock()
        self.waited_s = 0.0

    def observe(self, lag: int, smallest_id: int | None, now: float | None = None) -> None:
        """Feed one reading of the inbox: rows in it, and its smallest id (None: empty)."""
        now = time.monotonic() if now is None else now
        self.lag = lag
        if smallest_id is None:
            self._last = None
            return
        if self._last is not None:
            then, before = self._last
            if now > then:
                rate = max(0, smallest_id - before) / (now - then)
                self.drain_rate = (
                    rate if self.drain_rate == 0 else (_EWMA * rate + (1 - _EWMA) * self.drain_rate)
                )
        self._last = (now, smallest_id)

    @property
    def lagging(self) -> bool:
        return self.lag > self.lag_limit

    @property
    def rate(self) -> float:
        """Rows/s admitted now; infinite while the inbox is within its limit."""
        if not self.lagging:
            return float("inf")
        return max(_MIN_RATE, self.drain_rate * self.lag_limit / self.lag)

    def expected_wait(self, rows: int) -> float:
        rate = self.rate
        return 0.0 if rate == float("inf") else rows / rate

    async def admit(self, rows: int) -> float:
        """Wait until `rows` may be committed; return the seconds waited."""
        if not self.lagging or rows == 0:
            return 0.0
        started = time.monotonic()
        async with self._lock:  # first come, first served
            while True:
                rate = self.rate
                now = time.monotonic()
                if rate == float("inf"):
                    break
                # At most half a second of tokens saved up: no burst after a lull.
                self._tokens = min(rate / 2, self._tokens + (now - self._refilled) * rate)
                self._refilled = now
                if self._tokens >= rows or self._tokens >= rate / 2:
                    self._tokens -= rows
                    break
                await asyncio.sleep(min(0.25, (rows - self._tokens) / rate))
        waited = time.monotonic() - started
        self.waited_s += waited
        return waited
