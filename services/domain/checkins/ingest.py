"""Moving acknowledged scans from the inbox into the check-in store, and keeping
the days ahead ready: the steps of the workers' ingest and days-ahead jobs
(workers/ingest.py schedules them). Each step is one asyncio call, so it crosses
the workers' trio/asyncio bridge once.

The CheckIn servers COPY every acknowledged scan into `scan_inbox`, an
append-only table with no unique index, so that an ack costs one cheap COPY.
`move_batch` moves rows on into `checkins` (partitioned by day, unique on
(device, sequence, day)): one statement claims rows with SKIP LOCKED, deletes
them and inserts them in the same transaction, so any number of tasks and
processes can run it at once, a row is never moved twice, and a worker killed
mid-batch loses nothing (the batch commits whole or not at all). A batch that
meets a day with no partition creates the partitions of the inbox's days and
runs once more.

`ensure_days_ahead` makes the day keys and partitions of the days a scan
accepted now can fall on, so that a batch rarely meets a missing partition. A
destroyed day key is never made again.

Nothing here logs row contents: only counts, days, and the types of errors (a
Postgres error message can quote a row's values).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import structlog

from services.kernel import db
from services.kernel.config import Settings
from services.kernel.keys import KeyDestroyed, KeyError_, KeyStore

log = structlog.get_logger()

Q = db.load_queries(Path(__file__).with_name("ingest.sql"))


@dataclass(frozen=True)
class PartitionRepair:
    """A batch met a missing partition: the partitions of the inbox's days were made."""

    created: tuple[dt.date, ...]
    """The days whose partition was new."""
    inbox_days: int
    """How many days the inbox held."""


@dataclass(frozen=True)
class BatchResult:
    claimed: int
    """Inbox rows moved out of the inbox."""
    stored: int
    """Of those, rows stored (the rest were copies of scans already in the store)."""
    repair: PartitionRepair | None = None

    @property
    def duplicates(self) -> int:
        return self.claimed - self.stored


def is_missing_partition(exc: BaseException) -> bool:
    """True when an insert failed because no partition of `checkins` takes the row.

    Postgres reports this as a check violation (23514) without a constraint name;
    the class is checked first so that no other error is mistaken for it."""
    if not isinstance(exc, asyncpg.CheckViolationError):
        return False
    return "no partition of relation" in str(exc.args[0] if exc.args else "")


async def _move(pool: asyncpg.Pool, rows: int) -> tuple[int, int]:
    row = db.one(await pool.fetchrow(Q["ingest_batch"], rows))
    return int(row["claimed"]), int(row["stored"])


async def _ensure_partitions(pool: asyncpg.Pool, query: str, *args: object) -> list[Any]:
    """Run a statement that calls ensure_checkin_partition (which tolerates a race
    with another worker creating the same partition)."""
    found: list[Any] = await pool.fetch(query, *args)
    return found


async def move_batch(pool: asyncpg.Pool, rows: int) -> BatchResult:
    """Move up to `rows` inbox rows into the store (one statement). On a missing
    partition, make the inbox days' partitions and try once more: the failed
    attempt rolled back, so its rows are still in the inbox for the retry."""
    try:
        claimed, stored = await _move(pool, rows)
        return BatchResult(claimed, stored)
    except asyncpg.CheckViolationError as exc:
        if not is_missing_partition(exc):
            raise
    made = await _ensure_partitions(pool, Q["ensure_inbox_partitions"])
    repair = PartitionRepair(tuple(r["day"] for r in made if r["created"]), len(made))
    claimed, stored = await _move(pool, rows)
    return BatchResult(claimed, stored, repair)


def days_to_prepare(today: dt.date, max_scan_age_s: float) -> list[dt.date]:
    """Days a scan accepted now (or within the next two days) can fall on: back to
    the oldest acceptable scan plus a day of slack, ahead by two days (clock skew
    and the turn of the UTC day)."""
    back = math.ceil(max_scan_age_s / 86400) + 1
    return [today + dt.timedelta(days=n) for n in range(-back, 3)]


@dataclass(frozen=True)
class AheadResult:
    days: list[dt.date]
    keys: dict[dt.date, str]
    """The key id of each day that has its key."""
    destroyed: list[dt.date]
    """Days whose key was destroyed: skipped, never made again."""
    failed: list[dt.date]
    """Days whose key could not be read or made (logged)."""
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
    """Create the day keys (registered in day_keys) and the partitions of every day
    in `days_to_prepare`, skipping days whose key was destroyed. Two statements."""
    today = today or dt.datetime.now(dt.UTC).date()
    days = days_to_prepare(today, settings.max_scan_age_s)
    keys, destroyed, failed = await asyncio.to_thread(_day_keys, keystore, days)
    for day in destroyed:
        log.warning("day_key_destroyed_skipped", day=day.isoformat())
    registered = sorted(keys)
    await pool.execute(Q["register_day_keys"], registered, [keys[d] for d in registered])
    wanted = [d for d in days if d not in destroyed]
    made = await _ensure_partitions(pool, Q["ensure_partitions"], wanted)
    created = [r["day"] for r in made if r["created"]]
    return AheadResult(days, keys, destroyed, failed, created)
