"""The ingest job: moves acknowledged scans from the inbox into the check-in store.

The CheckIn servers COPY every acknowledged scan into `scan_inbox`, an append-only
table with no unique index, so that an ack costs one cheap COPY. This job moves
the rows on into `checkins` (partitioned by day, unique on (device, sequence,
day)): one statement per batch claims rows with SKIP LOCKED, deletes them and
inserts them in the same transaction, so any number of tasks and processes can
run it at once, a row is never moved twice, and a worker killed mid-batch loses
nothing (the batch commits whole or not at all).

Every database call crosses the trio/asyncio bridge, which costs several times a
plain call, so a batch is one call (two when a partition had to be created),
never one per row. The job also keeps the partitions and day keys of the coming
days ready (`ensure_days_ahead`), so a batch rarely meets a missing partition.

Nothing here logs row contents: only counts, days, and the types of errors
(a Postgres error message can quote a row's values).
"""

from __future__ import annotations

import datetime as dt
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import structlog
import trio
import trio_asyncio

from services.kernel import channels, db
from services.kernel.config import Settings
from services.kernel.keys import KeyDestroyed, KeyError_, KeyStore

log = structlog.get_logger()

Q = db.load_queries(Path(__file__).with_name("queries.sql"))

INBOX_CHANNEL = channels.INBOX

POLL_SECONDS = 1.0
"""How long an idle task waits for a NOTIFY before looking at the inbox anyway: the
fallback for a notification lost while the listening connection was down."""

MAINTENANCE_SECONDS = 60.0
"""How often partitions and day keys ahead are checked (they are needed days ahead)."""

SUMMARY_SECONDS = 60.0
"""How often the counters are logged while they move."""

LISTEN_CHECK_SECONDS = 10.0
"""How often the listening connection is probed, so a half-open one is replaced."""

STOP_GRACE_SECONDS = 10.0
"""How long a batch in flight at SIGTERM may finish before it is cancelled (and so
rolled back). Statements are bounded by the pool's statement_timeout anyway."""

DB_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes ConnectionError and TimeoutError
    asyncpg.PostgresError,  # includes PostgresConnectionError (SQLSTATE class 08)
    asyncpg.InterfaceError,
    # A backend killed while the connection was idle can leave asyncpg's protocol
    # in a state it reports this way; the pool then discards the connection.
    asyncpg.exceptions.InternalClientError,
)
"""What a database call raises when Postgres restarts, fails over, kills a backend or
refuses a statement. A job logs the type, backs off and tries again: one bad
moment must not end the worker process."""

_LISTEN_ERRORS: tuple[type[BaseException], ...] = (*DB_ERRORS, trio.TooSlowError)


def error_fields(exc: BaseException) -> dict[str, str]:
    """The loggable part of a database error: its type and SQLSTATE, never its text."""
    fields = {"error_type": type(exc).__name__}
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(sqlstate, str):
        fields["sqlstate"] = sqlstate
    return fields


def is_missing_partition(exc: BaseException) -> bool:
    """True when an insert failed because no partition of `checkins` takes the row.

    Postgres reports this as a check violation (23514) without a constraint name;
    the class is checked first so that no other error is mistaken for it."""
    if not isinstance(exc, asyncpg.CheckViolationError):
        return False
    return "no partition of relation" in str(exc.args[0] if exc.args else "")


class Backoff:
    """Exponential backoff with jitter, so workers that lost the database together
    do not all knock on it at the same instant when it returns."""

    def __init__(self, first: float = 0.2, cap: float = 10.0) -> None:
        self.first = first
        self.cap = cap
        self._next = first

    def next(self) -> float:
        delay = self._next
        self._next = min(self.cap, self._next * 2)
        return delay * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not a secret

    def reset(self) -> None:
        self._next = self.first


@dataclass(frozen=True)
class BatchResult:
    claimed: int
    stored: int

    @property
    def duplicates(self) -> int:
        return self.claimed - self.stored


@dataclass
class IngestStats:
    """Counters of one worker process (counts only: they are logged as they are)."""

    claimed: int = 0
    stored: int = 0
    batches: int = 0
    partition_repairs: int = 0
    errors: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def duplicates(self) -> int:
        """Inbox rows dropped because the store already held that scan."""
        return self.claimed - self.stored

    def add(self, result: BatchResult) -> None:
        self.claimed += result.claimed
        self.stored += result.stored
        if result.claimed:
            self.batches += 1

    def summary(self) -> dict[str, Any]:
        return {
            "claimed": self.claimed,
            "stored": self.stored,
            "duplicates_dropped": self.duplicates,
            "batches": self.batches,
            "partition_repairs": self.partition_repairs,
            "errors": self.errors,
            "seconds": round(time.monotonic() - self.started, 1),
        }


class InboxWakeup:
    """Wakes the idle ingest tasks when scans arrive.

    The asyncpg listener calls `notify` from the asyncio side; under trio-asyncio
    that runs on the trio thread inside the trio run, so setting a trio Event
    there is safe. A task takes `current()` before it looks at the inbox and waits
    on it after finding the inbox short, so a notification arriving in between
    is not lost."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def current(self) -> trio.Event:
        return self._event

    def wake(self) -> None:
        event, self._event = self._event, trio.Event()
        event.set()

    def notify(self, _conn: object, _pid: int, _channel: str, _payload: object) -> None:
        """asyncpg listener callback (connection, pid, channel, payload)."""
        self.wake()


class Ingestor:
    """The ingest tasks of one worker process, sharing one pool, counters and wakeup."""

    def __init__(self, settings: Settings, pool: asyncpg.Pool) -> None:
        self.settings = settings
        self.pool = pool
        self.batch_rows = max(1, settings.ingest_batch_rows)
        self.stats = IngestStats()
        self.wakeup = InboxWakeup()
        self._in_flight: set[trio.CancelScope] = set()
        self._stop_deadline = math.inf

    # -- one batch -------------------------------------------------------------

    async def _move(self) -> BatchResult:
        row = db.one(
            await trio_asyncio.aio_as_trio(self.pool.fetchrow)(Q["ingest_batch"], self.batch_rows)
        )
        return BatchResult(claimed=int(row["claimed"]), stored=int(row["stored"]))

    async def repair_partitions(self) -> int:
        """Create the partitions of every day waiting in the inbox; returns how many
        were new. Runs only after an insert met a missing partition."""
        rows = await _ensure_partitions(self.pool, Q["ensure_inbox_partitions"])
        created = [r["day"] for r in rows if r["created"]]
        self.stats.partition_repairs += 1
        log.info(
            "ingest_partitions_created",
            days=[d.isoformat() for d in created],
            inbox_days=len(rows),
        )
        return len(created)

    async def move_batch(self) -> BatchResult:
        """Move one batch (one bridge call); on a missing partition, create the
        inbox's partitions and try once more. The failed attempt rolled back, so
        its rows are still in the inbox for the retry."""
        try:
            result = await self._move()
        except asyncpg.CheckViolationError as exc:
            if not is_missing_partition(exc):
                raise
            await self.repair_partitions()
            result = await self._move()
        self.stats.add(result)
        return result

    async def _move_until_stop(self) -> BatchResult | None:
        """A batch that a stop request lets finish, for STOP_GRACE_SECONDS at most.

        Cancelling a statement mid-way is safe (it rolls back), but finishing it is
        cheaper for everyone, so the call is shielded and `begin_stop` only sets
        a deadline on it. Returns None when the deadline cut it short."""
        with trio.CancelScope(shield=True, deadline=self._stop_deadline) as scope:
            self._in_flight.add(scope)
            try:
                return await self.move_batch()
            finally:
                self._in_flight.discard(scope)
        return None

    def begin_stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Give batches in flight `grace` seconds to commit; call before cancelling."""
        self._stop_deadline = trio.current_time() + grace
        for scope in self._in_flight:
            scope.deadline = min(scope.deadline, self._stop_deadline)

    # -- tasks -----------------------------------------------------------------

    async def ingest_task(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Loop forever: a full batch means more is waiting, so go again at once;
        otherwise wait for a NOTIFY or the fallback poll. Database errors are
        logged by type, backed off from, and retried."""
        backoff = Backoff()
        task_status.started()
        while True:
            wake = self.wakeup.current()
            try:
                result = await self._move_until_stop()
            except DB_ERRORS as exc:
                self.stats.errors += 1
                log.warning("ingest_batch_failed", **error_fields(exc))
                await trio.sleep(backoff.next())
                continue
            backoff.reset()
            if result is not None and result.claimed >= self.batch_rows:
                await trio.lowlevel.checkpoint()  # let a stop request in between batches
                continue
            with trio.move_on_after(POLL_SECONDS):
                await wake.wait()

    async def listen_task(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """LISTEN on a dedicated connection (a pooled one would be handed to others)
        and wake the ingest tasks on each notification. The connection is
        replaced as soon as it dies (asyncpg reports the loss; a probe catches a
        half-open one); the fallback poll covers the gap."""
        backoff = Backoff(first=0.5)
        started = False
        args = db.connect_args(self.settings, db.SERVICE_ROLES["worker"]).kwargs()
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await trio_asyncio.aio_as_trio(asyncpg.connect)(
                    **args,
                    timeout=10,
                    server_settings={"application_name": "stopcovid_worker_listen"},
                )
                lost = trio.Event()
                conn.add_termination_listener(lambda _conn, event=lost: event.set())
                await trio_asyncio.aio_as_trio(conn.add_listener)(INBOX_CHANNEL, self.wakeup.notify)
                log.info("ingest_listening")
                self.wakeup.wake()  # scans that arrived while nobody listened
                backoff.reset()
                if not started:
                    started = True
                    task_status.started()
                while not conn.is_closed():
                    with trio.move_on_after(LISTEN_CHECK_SECONDS):
                        await lost.wait()
                    with trio.fail_after(LISTEN_CHECK_SECONDS):
                        await trio_asyncio.aio_as_trio(conn.execute)("SELECT 1")
                log.warning("ingest_listen_lost")
            except _LISTEN_ERRORS as exc:
                log.warning("ingest_listen_failed", **error_fields(exc))
            finally:
                if conn is not None:
                    await _close_quietly(conn)
            if not started:  # a database that is down must not hold up the pool's start
                started = True
                task_status.started()
            await trio.sleep(backoff.next())

    async def summary_task(self) -> None:
        """Log the counters every SUMMARY_SECONDS while they move (idle is quiet)."""
        last: tuple[int, int] = (-1, -1)
        while True:
            await trio.sleep(SUMMARY_SECONDS)
            now = (self.stats.batches, self.stats.errors)
            if now != last:
                log.info("ingest_summary", **self.stats.summary())
                last = now


async def _close_quietly(conn: asyncpg.Connection) -> None:
    """Close a connection even while cancelled; a dead one is just dropped."""
    with trio.move_on_after(2) as scope:
        scope.shield = True
        try:
            await trio_asyncio.aio_as_trio(conn.close)(timeout=2)
            return
        except DB_ERRORS:
            pass
    conn.terminate()


# -- partitions and day keys ahead --------------------------------------------


async def _ensure_partitions(pool: asyncpg.Pool, query: str, *args: object) -> list[Any]:
    """Run a statement that calls ensure_checkin_partition (which tolerates a race with
    another worker creating the same partition)."""
    rows: list[Any] = await trio_asyncio.aio_as_trio(pool.fetch)(query, *args)
    return rows


def window_days(today: dt.date, max_scan_age_s: float) -> list[dt.date]:
    """Days a scan accepted now (or within the next two days) can fall on: back to the
    oldest acceptable scan plus a day of slack, ahead by two days (clock skew and
    the turn of the UTC day)."""
    back = math.ceil(max_scan_age_s / 86400) + 1
    return [today + dt.timedelta(days=n) for n in range(-back, 3)]


@dataclass(frozen=True)
class AheadResult:
    days: list[dt.date]
    keys: dict[dt.date, str]
    destroyed: list[dt.date]
    failed: list[dt.date]
    partitions_created: list[dt.date]


def _day_keys(
    keystore: KeyStore, days: Sequence[dt.date]
) -> tuple[dict[dt.date, str], list[dt.date], list[dt.date]]:
    """Make sure each day has its key (file I/O: runs in a thread). A destroyed key
    is never recreated: its day's data is gone, and a new key would invite new
    data under a day that expiry closed."""
    keys: dict[dt.date, str] = {}
    destroyed: list[dt.date] = []
    failed: list[dt.date] = []
    for day in days:
        try:
            keys[day] = keystore.day_key(day).key_id
        except KeyDestroyed:
            destroyed.append(day)
        except (KeyError_, OSError) as exc:
            failed.append(day)
            log.error("day_key_unavailable", day=day.isoformat(), error_type=type(exc).__name__)
    return keys, destroyed, failed


async def ensure_days_ahead(
    pool: asyncpg.Pool, keystore: KeyStore, settings: Settings, today: dt.date | None = None
) -> AheadResult:
    """Create the day keys (registered in day_keys) and the partitions of every day in
    `window_days`, skipping days whose key was destroyed. Two bridge calls."""
    today = today or dt.datetime.now(dt.UTC).date()
    days = window_days(today, settings.max_scan_age_s)
    keys, destroyed, failed = await trio.to_thread.run_sync(_day_keys, keystore, days)
    for day in destroyed:
        log.warning("day_key_destroyed_skipped", day=day.isoformat())
    registered = sorted(keys)
    await trio_asyncio.aio_as_trio(pool.execute)(
        Q["register_day_keys"], registered, [keys[d] for d in registered]
    )
    wanted = [d for d in days if d not in destroyed]
    rows = await _ensure_partitions(pool, Q["ensure_partitions"], wanted)
    created = [r["day"] for r in rows if r["created"]]
    return AheadResult(days, keys, destroyed, failed, created)


async def maintenance_task(
    pool: asyncpg.Pool,
    keystore: KeyStore,
    settings: Settings,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep partitions and day keys ahead, at start and every MAINTENANCE_SECONDS.
    Reports started after the first attempt, so ingest begins with the
    partitions in place when the database is up, and begins anyway when not."""
    backoff = Backoff(first=1.0, cap=MAINTENANCE_SECONDS)
    started = False
    while True:
        try:
            result = await ensure_days_ahead(pool, keystore, settings)
        except DB_ERRORS as exc:
            log.warning("days_ahead_failed", **error_fields(exc))
            delay = backoff.next()
        else:
            backoff.reset()
            delay = MAINTENANCE_SECONDS
            if result.partitions_created:
                log.info(
                    "partitions_created",
                    days=[d.isoformat() for d in result.partitions_created],
                )
        if not started:
            started = True
            task_status.started()
        await trio.sleep(delay)
