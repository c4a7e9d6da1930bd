"""Expiry of check-ins, and of the entry decisions among them.

Every day partition of `checkins` whose whole UTC day is older than the CHECK_INS
period is DETACHed in the run's transaction and its files DROPped right after it
commits (whole files; never a row-by-row DELETE of the store); the day's inbox
rows are deleted, and the day key is destroyed in the key store and recorded in
day_keys.destroy_time.

Denials at the door are rows of the same store (outcome 'denied'), so they go with
their day, at the check-ins period: the denials among the dropped rows get an
ENTRY_DECISIONS report of their own. A longer entry_decisions period is not
honoured today: keeping a denial past its day would need it re-encrypted under a
key of its own.

Key first: the day keys are destroyed before the partitions are detached. A crash
in between leaves rows that nobody can read or link any more (the state an old
backup is in), never the reverse, which would leave every backup of the day
readable with its key still in the store. A re-run finds the leftovers (a
partition past the period, a day key not recorded destroyed), destroys again
(idempotent: the tombstone stays, a missing file is fine) and drops what is left.

A day's rows are counted once, when it can take no more scans (`SEAL_AFTER`), so
that expiring it reads the count instead of scanning the day.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Sequence

import structlog

from services.domain.retention.run_context import Deletion, Q, RunContext
from services.kernel.db import one
from services.kernel.keys import KeyStore

log = structlog.get_logger()

SEAL_AFTER = dt.timedelta(days=8)
"""A day is counted for its deletion report once this old: past the longest scan age
(at most 7 days, see Settings.max_scan_age_s), so no scan can be added to it."""


def midnight(day: dt.date) -> dt.datetime:
    """00:00 UTC of `day`: check-in days are UTC days (their partitions and keys)."""
    return dt.datetime.combine(day, dt.time(), dt.UTC)


def last_expired_day(now: dt.datetime, period_days: int) -> dt.date:
    """The newest UTC day wholly older than the period at `now`: day d goes once
    d + 1 day + period <= now."""
    return (now - dt.timedelta(days=period_days + 1)).date()


async def seal_days(run: RunContext) -> None:
    """Count the rows of days that can no longer receive scans, once each."""
    last = (run.now - SEAL_AFTER).date()
    with run.timed("seal_s"):
        for row in await run.conn.fetch(Q["unsealed_days"], last):
            await run.conn.execute(Q["seal_day"], row["day"])


async def reclaim(run: RunContext) -> None:
    """Remove the files of expired days' detached partitions: committed expiry has
    already taken them out of the store; this frees the disk, in time proportional
    to their size. Also finishes what a run that died left."""
    with run.timed("reclaim_s"):
        await run.conn.fetchval(Q["drop_expired"])


async def _counts(run: RunContext, days: Sequence[dt.date]) -> dict[dt.date, tuple[int, int]]:
    """(rows, denials) of each day: as sealed, else counted now."""
    counts = {}
    with run.timed("count_s"):
        for day in days:
            row = await run.conn.fetchrow(Q["sealed_count"], day)
            if row is None:
                row = one(await run.conn.fetchrow(Q["count_day"], day))
            counts[day] = (row["row_count"], row["denied_count"])
    return counts


def _destroy_day_keys(keystore: KeyStore, days: Sequence[dt.date]) -> None:
    for day in days:
        keystore.destroy_day_key(day)


async def expire(run: RunContext, data_class: str = "check_ins") -> None:
    """Expire the check-in days past their period, reporting their denials too when
    the run wants entry decisions."""
    if not run.dry_run:
        await reclaim(run)
        await seal_days(run)
    period = run.policies[data_class]
    last = last_expired_day(run.now, period)
    days: list[dt.date] = [r["day"] for r in await run.conn.fetch(Q["expirable_days"], last)]
    if not days:
        return
    counts = await _counts(run, days)
    rows = sum(c[0] for c in counts.values())
    denied = sum(c[1] for c in counts.values())
    span = (midnight(days[0]), midnight(days[-1] + dt.timedelta(days=1)))
    with_denials = bool(denied) and "entry_decisions" in run.wanted
    if run.dry_run:
        await run.report(
            Deletion(data_class, period, rows, *span, [f"day-{d.isoformat()}" for d in days])
        )
        if with_denials:
            await run.report(Deletion("entry_decisions", period, denied, *span))
        return
    # Keys first (see the module docstring): from here on the days are unreadable.
    with run.timed("destroy_keys_s"):
        await asyncio.to_thread(_destroy_day_keys, run.keystore, days)
    with run.timed("drop_s"):
        async with run.conn.transaction():
            inbox = 0
            for day in days:
                row = one(await run.conn.fetchrow(Q["expire_day"], day))
                inbox += row["inbox_rows"]
                await run.audit(
                    "drop_partition",
                    "checkins_day",
                    day.isoformat(),
                    {
                        "row_count": counts[day][0],
                        "denied_count": counts[day][1],
                        "inbox_row_count": row["inbox_rows"],
                        "partition_dropped": row["dropped"],
                    },
                )
            recorded = await run.conn.fetch(Q["record_day_keys_destroyed"], days)
            key_ids = sorted(r["key_id"] for r in recorded)
            for r in sorted(recorded, key=lambda r: r["day"]):
                await run.audit("destroy_day_key", "day_key", r["key_id"], {})
            await run.report(Deletion(data_class, period, rows + inbox, *span, key_ids))
            if with_denials:
                await run.report(Deletion("entry_decisions", period, denied, *span))
    await reclaim(run)
    log.info(
        "expiry_check_ins",
        days=[d.isoformat() for d in days],
        rows=rows + inbox,
        keys_destroyed=len(key_ids),
    )
