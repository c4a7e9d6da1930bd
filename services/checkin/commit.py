"""Group commit: scans from every open stream of this server share one COPY into
the inbox and one commit, a few milliseconds apart.

A commit per scan costs a round trip and an fsync each (~1.5k rows/s here); one
COPY of thousands of rows costs about the same as one of a few. So `submit()`
parks the caller's rows; a commit starts when `max_rows` are waiting or when the
oldest has waited `interval`, and up to `max_concurrent` commits overlap, so the
next group fills while the previous one is written. `submit()` returns once its
rows are committed (durable, with synchronous_commit on): only then may the
caller acknowledge them.

If Postgres fails, a commit is retried (the inbox is at-least-once: rows the
workers see twice are stored once) until `retry_for` has passed; then every
caller in the group gets `CommitFailed` and must not acknowledge.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import Any

import asyncpg
import structlog

log = structlog.get_logger()

INBOX_COLUMNS = (
    "day",
    "venue_id",
    "device_id",
    "sequence",
    "scan_time",
    "direction",
    "outcome",
    "decision_id",
    "day_key_id",
    "person_ref",
    "person_enc",
    "receive_time",
)

Row = tuple[Any, ...]

_DB_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncio.TimeoutError)


class CommitFailed(Exception):
    """The rows were not committed (or it is unknown): do not acknowledge them."""


class GroupCommitter:
    def __init__(
        self,
        pool: asyncpg.Pool,
        interval_s: float,
        max_rows: int,
        max_concurrent: int = 2,
        retry_for_s: float = 10.0,
    ) -> None:
        self._pool = pool
        self._interval = interval_s
        self._max_rows = max(1, max_rows)
        self._slots = asyncio.Semaphore(max(1, max_concurrent))
        self._retry_for = retry_for_s
        self._rows: list[Row] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._first_at = 0.0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._flushes: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="group-commit")

    async def close(self) -> None:
        """Commit what is waiting, then stop."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._rows:
            self._launch()
        if self._flushes:
            await asyncio.gather(*self._flushes, return_exceptions=True)

    async def submit(self, rows: Sequence[Row]) -> None:
        """Return when `rows` are committed; raise CommitFailed if they may not be."""
        if not rows:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not self._rows:
            self._first_at = time.monotonic()
        self._rows.extend(rows)
        self._waiters.append(future)
        self._wake.set()
        await future

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._rows:
                if len(self._rows) < self._max_rows:
                    delay = self._first_at + self._interval - time.monotonic()
                    if delay > 0:
                        # Wake early if the group fills up meanwhile.
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._wake.wait(), delay)
                        self._wake.clear()
                        continue
                await self._slots.acquire()
                if not self._rows:  # a concurrent close() took them
                    self._slots.release()
                    break
                self._launch(acquired=True)

    def _launch(self, acquired: bool = False) -> None:
        rows, self._rows = self._rows, []
        waiters, self._waiters = self._waiters, []
        task = asyncio.create_task(self._flush(rows, waiters, acquired))
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _flush(
        self, rows: list[Row], waiters: list[asyncio.Future[None]], held: bool
    ) -> None:
        try:
            await self._commit(rows)
        except _DB_ERRORS as exc:
            log.error("group_commit_failed", rows=len(rows), error_type=type(exc).__name__)
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(CommitFailed(type(exc).__name__))
        else:
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        finally:
            if held:
                self._slots.release()

    async def _commit(self, rows: list[Row]) -> None:
        deadline = time.monotonic() + self._retry_for
        pause = 0.05
        while True:
            try:
                async with self._pool.acquire(timeout=self._retry_for) as conn:
                    # Outside a transaction block: COPY commits on its own.
                    await conn.copy_records_to_table(
                        "scan_inbox", records=rows, columns=INBOX_COLUMNS
                    )
                return
            except _DB_ERRORS as exc:
                if time.monotonic() + pause > deadline:
                    raise
                log.warning("group_commit_retry", rows=len(rows), error_type=type(exc).__name__)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 1.0)
