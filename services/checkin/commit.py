"""Group commit: scans from every open stream of this server share one COPY into
the check-in store and one commit, a few milliseconds apart.

A commit per scan costs a round trip and an fsync each (~1.5k rows/s here); one
COPY of thousands of rows costs about the same as one of a few. So `submit()`
parks the caller's rows; a commit starts when `max_rows` are waiting or when the
oldest has waited `interval`, and up to `max_concurrent` commits overlap, so the
next group fills while the previous one is written. `submit()` returns once its
rows are committed (durable, with synchronous_commit on): only then may the
caller acknowledge them.

Rows decided by a device's writer carry the device's epoch (migration 0006).
Each commit is one transaction that first takes a share lock of the epochs of
the devices in its group, and writes only the rows whose epoch is still
current: a device that another stream took over meanwhile gets `Superseded`
and its rows are not written, so a stream that lost its device can never
commit behind the back of the one that took it.

New scans go straight into the store (migration 0011): the writer's ledger
knows they are new, so they cannot collide with its key. A group the store
refuses (a day without a partition yet; a key taken, which would be a bug the
store's key catches) goes to the inbox instead, which the workers move into the
store, dropping what is there already.

If Postgres fails, a commit is retried until `retry_for` has passed, asking
first whether the attempt that lost its connection committed after all; then
every caller in the group gets `CommitFailed` and must not acknowledge. The
answer is the attempt's mark (migration 0012: a random token it wrote in its own
transaction), once its transaction id is no longer in progress: the id alone
would do on one server, but after a failover the promoted standby may have given
an id it never saw to a transaction of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import asyncpg
import structlog
from opentelemetry import trace
from opentelemetry.trace import Link, NonRecordingSpan, Span, SpanContext

from services.checkin import copyrows
from services.domain.checkins.inbox import COLUMNS
from services.kernel import metrics, tracing
from services.kernel.db import TRANSIENT_ERRORS, Conn, load_queries

log = structlog.get_logger()

STORE, INBOX = "checkins", "scan_inbox"
_PRUNE_EVERY_S = 60.0

Q = load_queries(Path(__file__).with_name("queries.sql"))


_COMMIT_SECONDS = metrics.COMMIT_SECONDS
_COMMIT_ROWS = metrics.COMMIT_ROWS


class CommitFailed(Exception):
    """The rows were not committed (or it is unknown): do not acknowledge them."""


class Superseded(Exception):
    """The device has a newer writer: these rows were not written by this commit.
    (An earlier attempt of a retried commit may have written them: the device will
    learn so as DUPLICATE when it resends.)"""


class _Waiter:
    __slots__ = ("count", "device_id", "epoch", "future", "rows", "trace")

    def __init__(
        self,
        rows: Sequence[bytes],
        device_id: uuid.UUID | None,
        epoch: int | None,
        future: asyncio.Future[None],
        trace: SpanContext | None = None,
    ) -> None:
        self.rows = b"".join(rows)
        """The caller's rows, encoded for COPY (copyrows.py), as one chunk."""
        self.count = len(rows)
        self.device_id = device_id
        self.epoch = epoch
        self.future = future
        self.trace = trace
        """The span of the batch these rows are from, when tracing is on."""


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
        self._count = 0
        self._waiters: list[_Waiter] = []
        self._first_at = 0.0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._flushes: set[asyncio.Task[None]] = set()
        self._next_prune = time.monotonic() + _PRUNE_EVERY_S

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="group-commit")

    async def _prune(self, conn: Conn) -> None:
        """Remove settled commit marks now and then (outside any commit's transaction,
        so that two servers pruning at once never hold up a group)."""
        now = time.monotonic()
        if now < self._next_prune:
            return
        self._next_prune = now + _PRUNE_EVERY_S
        await conn.execute(Q["prune_commit_marks"])

    async def close(self) -> None:
        """Commit what is waiting, then stop."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._waiters:
            self._launch(everything=True)
        if self._flushes:
            await asyncio.gather(*self._flushes, return_exceptions=True)

    async def submit(
        self,
        rows: Sequence[bytes],
        device_id: uuid.UUID | None = None,
        epoch: int | None = None,
        trace: SpanContext | None = None,
    ) -> None:
        """Return when `rows` are committed; raise CommitFailed if they may not be, and
        Superseded if `device_id` no longer has `epoch` (rows decided by the device's
        writer must give both; self check-ins give neither)."""
        if not rows:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not self._waiters:
            self._first_at = time.monotonic()
        self._waiters.append(_Waiter(rows, device_id, epoch, future, trace))
        self._count += len(rows)
        self._wake.set()
        await future

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._waiters:
                if self._count < self._max_rows:
                    delay = self._first_at + self._interval - time.monotonic()
                    if delay > 0:
                        # Wake early if the group fills up meanwhile.
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._wake.wait(), delay)
                        self._wake.clear()
                        continue
                await self._slots.acquire()
                if not self._waiters:  # a concurrent close() took them
                    self._slots.release()
                    break
                self._launch(acquired=True)

    def _launch(self, acquired: bool = False, everything: bool = False) -> None:
        """Start a commit of the oldest waiters, up to `max_rows` rows (whole callers;
        all of them with `everything`). Taking more would make a group of everything
        that piled up while both slots were busy: one COPY of the whole in-flight
        window taking seconds, every ack in one burst, then silence (measured:
        160,000-row commits of 1 to 2 s at full load)."""
        if everything:
            waiters, self._waiters, self._count = self._waiters, [], 0
        else:
            taken = 0
            count = 0
            for waiter in self._waiters:
                taken += 1
                count += waiter.count
                if count >= self._max_rows:
                    break
            waiters, self._waiters = self._waiters[:taken], self._waiters[taken:]
            self._count -= count
            if self._waiters:
                # The rest waits from now: the first of them was due already.
                self._first_at = time.monotonic() - self._interval
        task = asyncio.create_task(self._flush(waiters, acquired))
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _flush(self, waiters: list[_Waiter], held: bool) -> None:
        started = time.perf_counter()
        span = _commit_span(waiters) if tracing.enabled else None
        try:
            superseded = await self._commit(waiters)
        except _FAILED as exc:
            rows = sum(w.count for w in waiters)
            metrics.COMMIT_FAILURES.inc()
            log.error("group_commit_failed", rows=rows, error_type=type(exc).__name__)
            for waiter in waiters:
                if not waiter.future.done():
                    waiter.future.set_exception(CommitFailed(type(exc).__name__))
        else:
            if metrics.enabled:
                _COMMIT_SECONDS.observe(time.perf_counter() - started)
                _COMMIT_ROWS.observe(sum(w.count for w in waiters))
            for waiter in waiters:
                if waiter.future.done():
                    continue
                if (waiter.device_id, waiter.epoch) in superseded:
                    waiter.future.set_exception(Superseded())
                else:
                    waiter.future.set_result(None)
        finally:
            if held:
                self._slots.release()
            if span is not None:
                span.end()

    async def _commit(self, waiters: list[_Waiter]) -> set[tuple[uuid.UUID | None, int | None]]:
        """Write the rows of the waiters whose device epoch holds, in one transaction;
        return the (device, epoch) pairs that did not hold.

        Into the store first; into the inbox if the store refuses the group (no
        partition for a row's day yet, or a key that is taken: then the workers
        move it, dropping what is stored already). A transient failure is retried;
        if the connection was lost while committing, the earlier attempt's outcome
        is asked for by its mark (see outcome), so a committed group is never
        written twice and an uncommitted one never taken for durable."""
        pairs: list[tuple[uuid.UUID | None, int | None]] = sorted(
            {(w.device_id, w.epoch) for w in waiters if w.device_id is not None},
            key=lambda p: (p[0].bytes if p[0] else b"", p[1] or 0),
        )
        deadline = time.monotonic() + self._retry_for
        pause = 0.05
        table = STORE
        earlier: tuple[int, uuid.UUID, set[tuple[uuid.UUID | None, int | None]]] | None = None
        while True:
            try:
                async with self._pool.acquire(timeout=self._retry_for) as conn:
                    if earlier is not None:
                        if await outcome(conn, earlier[0], earlier[1]) == "committed":
                            return earlier[2]
                        earlier = None
                    await self._prune(conn)
                    token = uuid.uuid4()
                    async with conn.transaction():
                        xid = int(await conn.fetchval(Q["mark_commit"], token))
                        held: set[tuple[uuid.UUID | None, int | None]] = set()
                        if pairs:
                            found = await conn.fetch(
                                Q["hold_epochs"], [p[0] for p in pairs], [p[1] for p in pairs]
                            )
                            held = {(r["device_id"], r["epoch"]) for r in found}
                        superseded = set(pairs) - held
                        earlier = (xid, token, superseded)
                        chunks = [
                            w.rows
                            for w in waiters
                            if w.device_id is None or (w.device_id, w.epoch) in held
                        ]
                        if chunks:
                            await copy_rows(conn, table, chunks)
                return superseded
            except (asyncpg.CheckViolationError, asyncpg.UniqueViolationError) as exc:
                # Refused by the store's partitioning or key: the transaction was
                # rolled back by the error itself; the inbox takes any row.
                if table != STORE:
                    raise
                metrics.COMMIT_TO_INBOX.inc()
                log.info(
                    "group_commit_to_inbox",
                    rows=sum(w.count for w in waiters),
                    error_type=type(exc).__name__,
                )
                table, earlier = INBOX, None
            except _RETRIED as exc:
                if time.monotonic() + pause > deadline:
                    raise CommitFailed(type(exc).__name__) from exc
                rows_n = sum(w.count for w in waiters)
                log.warning("group_commit_retry", rows=rows_n, error_type=type(exc).__name__)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 1.0)


def _commit_span(waiters: list[_Waiter]) -> Span:
    """The span of one group commit: in the trace of its first traced batch, and
    linked to every batch it carries (one commit serves many)."""
    batches = [w.trace for w in waiters if w.trace is not None]
    parent = trace.set_span_in_context(NonRecordingSpan(batches[0])) if batches else None
    return tracing.tracer().start_span(
        "checkin.group_commit",
        context=parent,
        links=[Link(b) for b in batches],
        attributes={
            "stopcovid.rows": sum(w.count for w in waiters),
            "stopcovid.callers": len(waiters),
        },
    )


class StillCommitting(Exception):
    """An earlier attempt's transaction is still in progress: ask again shortly."""


async def outcome(conn: Conn, xid: int, token: uuid.UUID) -> str:
    """What became of the group commit with transaction `xid` and mark `token`:
    'committed', 'aborted', or raises StillCommitting. After a failover, a
    transaction the new primary never saw (its id is 'in the future' there) did not
    commit; one whose id it gave to a transaction of its own did not either, and
    its mark says so."""
    try:
        row = await conn.fetchrow(Q["commit_outcome"], xid, token)
    except asyncpg.InvalidParameterValueError:
        return "aborted"
    assert row is not None
    if row["status"] == "in progress":
        raise StillCommitting()
    return "committed" if row["marked"] else "aborted"


async def copy_rows(conn: Conn, table: str, chunks: list[bytes]) -> None:
    """COPY encoded rows (copyrows.py) into the store or the inbox, inside the
    caller's transaction."""
    await conn.copy_to_table(
        table, source=copyrows.stream(chunks), columns=COLUMNS, format="binary"
    )


_RETRIED: tuple[type[BaseException], ...] = (*TRANSIENT_ERRORS, StillCommitting)
"""What a commit attempt may end with and be tried again."""
_FAILED: tuple[type[BaseException], ...] = (*TRANSIENT_ERRORS, CommitFailed)
"""What ends a group's commit for good (its callers must not acknowledge)."""
