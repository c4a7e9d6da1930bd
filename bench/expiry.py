"""The expiry benchmark: dropping a day against deleting it, at two day sizes.

    .venv/bin/python -m bench.expiry [--quick] [--sizes 1000000,5000000] [--json out.json]

One run, in a private temporary Postgres prepared the way `up` prepares one
(roles, migrations, key store). For each size:

1. one day of synthetic check-ins is COPY'd into its day partition of `checkins`
   (the store's real shape and indexes: the dedupe key, the pseudonym index, the
   venue/time index, the denial index), and an identical copy of it (same rows,
   the next day) is made with INSERT ... SELECT; both are VACUUM ANALYZEd, as
   autovacuum would have done to days this old, then a CHECKPOINT;
2. expiry: the real `run_expiry` (services/domain/retention/expiry_run.py), as the Retention
   server's database role. First as the schedule runs it when the day is 8 days
   old (it can take no more scans): that run counts the day's rows once, for its
   future deletion report, and is timed apart. Then with a clock that makes
   exactly the day due: it reads that count, destroys the day key, DETACHes the
   partition and records the report, commits, then DROPs the detached partition
   (removing its files frees the disk in time proportional to their size, so it
   is reported apart: the day left the store and became unreadable at the
   commit);
3. DELETE: `DELETE FROM checkins WHERE day = <the copy>` in one statement, after
   another CHECKPOINT (so both start with the same full-page-write state).

For each it reports the time, the dead tuples left behind
(pg_stat_all_tables.n_dead_tup summed over every table, catalogs included, after
minus before) and the WAL written (pg_current_wal_lsn before and after). The
expiry time is also broken down: reading the day's count for the deletion report,
destroying the key (a file), detaching and committing, and removing the files.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

# A store row has the inbox row's columns: ingest moves rows as they are.
from bench.common import PrivateDatabase, clean_environment
from services.domain.checkins.inbox import COLUMNS
from services.domain.retention import expiry_run
from services.kernel import db
from services.kernel.auth import Principal
from services.kernel.config import Settings
from services.kernel.keys import KeyStore

BENCH_PRINCIPAL = Principal("bench-retention-officer", "ROLE_RETENTION_OFFICER", "")
COPY_CHUNK = 100_000


@dataclass(frozen=True)
class Options:
    sizes: tuple[int, ...]
    keep: bool
    json_path: Path | None


@dataclass
class Measure:
    size: int
    method: str
    seconds: float
    dead_tuples: int
    wal_bytes: int
    detail: dict[str, float]


def _rows(day: dt.date, key_id: str, n: int, rng: random.Random) -> Iterator[list[tuple[Any, ...]]]:
    """`n` synthetic check-ins of `day` in chunks: 20 venues, 200 devices with their
    own sequence numbers, pseudonyms and ciphertexts of the real sizes (random
    bytes, drawn from a pool so that making them costs little), 0.1% denials."""
    venues = [uuid.UUID(int=rng.getrandbits(128)) for _ in range(20)]
    devices = [uuid.UUID(int=rng.getrandbits(128)) for _ in range(200)]
    refs = [rng.randbytes(16) for _ in range(50_000)]
    encs = [rng.randbytes(44) for _ in range(4_096)]
    start = dt.datetime.combine(day, dt.time(), dt.UTC)
    chunk: list[tuple[Any, ...]] = []
    for i in range(n):
        device = i % len(devices)
        at = start + dt.timedelta(microseconds=(i * 86_400_000_000) // n)
        denied = i % 1000 == 999
        chunk.append(
            (
                day,
                venues[device % len(venues)],
                devices[device],
                i // len(devices) + 1,
                at,
                "entry" if i % 2 else "exit",
                "denied" if denied else "admitted",
                uuid.UUID(int=rng.getrandbits(128)) if denied else None,
                key_id,
                refs[i % len(refs)],
                encs[i % len(encs)],
                at,
            )
        )
        if len(chunk) == COPY_CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class Bench:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.db = PrivateDatabase("stopcovid-bench-expiry-")
        self.results: list[Measure] = []

    @property
    def settings(self) -> Settings:
        return self.db.settings

    @property
    def keystore(self) -> KeyStore:
        return self.db.keystore

    def setup(self) -> None:
        self.db.start()

    def close(self) -> None:
        self.db.close(self.opts.keep)

    async def _admin(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.db.superuser_dsn())

    @staticmethod
    async def _wal(conn: asyncpg.Connection) -> str:
        lsn: str = await conn.fetchval("SELECT pg_current_wal_lsn()::text")
        return lsn

    @staticmethod
    async def _dead(conn: asyncpg.Connection) -> int:
        total: int = await conn.fetchval(
            "SELECT coalesce(sum(n_dead_tup), 0)::bigint FROM pg_stat_all_tables"
        )
        return total

    async def _dead_after(self, conn: asyncpg.Connection, before: int) -> int:
        """Dead tuples added since `before`, once the statistics have been flushed
        (a backend flushes them when it goes idle; give it a moment)."""
        await conn.execute("SELECT pg_stat_force_next_flush()")
        last, stable = -1, 0
        for _ in range(50):
            await asyncio.sleep(0.1)
            await conn.execute("SELECT pg_stat_clear_snapshot()")
            now = await self._dead(conn)
            stable = stable + 1 if now == last else 0
            last = now
            if stable >= 5:
                break
        return max(0, last - before)

    async def load(self, day: dt.date, copy_day: dt.date, n: int) -> None:
        conn = await self._admin()
        try:
            for d in (day, copy_day):
                key = self.keystore.day_key(d)
                await conn.execute(
                    "INSERT INTO day_keys (day, key_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    d,
                    key.key_id,
                )
                await conn.execute("SELECT ensure_checkin_partition($1)", d)
            began = time.monotonic()
            rng = random.Random(n)  # noqa: S311 - synthetic data, not secrets
            for chunk in _rows(day, f"day-{day.isoformat()}", n, rng):
                await conn.copy_records_to_table("checkins", records=chunk, columns=COLUMNS)
            copied = time.monotonic()
            await conn.execute(
                "INSERT INTO checkins (day, venue_id, device_id, sequence, scan_time, direction,"
                " outcome, decision_id, day_key_id, person_ref, person_enc, receive_time)"
                " SELECT $2, venue_id, device_id, sequence, scan_time + interval '1 day',"
                " direction, outcome, decision_id, $3, person_ref, person_enc,"
                " receive_time + interval '1 day' FROM checkins WHERE day = $1",
                day,
                copy_day,
                f"day-{copy_day.isoformat()}",
            )
            duplicated = time.monotonic()
            for d in (day, copy_day):
                await conn.execute(f"VACUUM (ANALYZE) checkins_{d:%Y%m%d}")
            print(
                f"  loaded {n:,} rows into {day} by COPY in {copied - began:.1f}s, "
                f"copied to {copy_day} in {duplicated - copied:.1f}s, "
                f"vacuumed in {time.monotonic() - duplicated:.1f}s",
                flush=True,
            )
        finally:
            await conn.close()

    async def expire(self, day: dt.date, n: int) -> Measure:
        conn = await self._admin()
        pool = await db.create_pool(self.settings, db.SERVICE_ROLES["retention"])
        try:
            # The scheduled run that counts the day once it can take no more scans
            # (8 days old), weeks before it expires; timed apart, as the background
            # work it is.
            began = time.perf_counter()
            await expiry_run.run_expiry(
                pool,
                self.keystore,
                now=expiry_run.midnight(day + dt.timedelta(days=9)),
                classes=["check_ins"],
                trigger=expiry_run.SCHEDULED,
                requester=BENCH_PRINCIPAL,
            )
            count_once = time.perf_counter() - began
            await conn.execute("CHECKPOINT")
            dead, wal = await self._dead(conn), await self._wal(conn)
            # The clock at which exactly `day` is wholly past the 28-day period.
            now = expiry_run.midnight(day + dt.timedelta(days=29)) + dt.timedelta(hours=1)
            began = time.perf_counter()
            run = await expiry_run.run_expiry(
                pool,
                self.keystore,
                now=now,
                classes=["check_ins"],
                trigger=expiry_run.ON_DEMAND,
                requester=BENCH_PRINCIPAL,
            )
            seconds = time.perf_counter() - began
            wal_bytes = await conn.fetchval(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)::bigint", wal
            )
            (report,) = [r for r in run.reports if r.data_class == "check_ins"]
            if report.row_count != n or report.destroyed_key_ids != [f"day-{day.isoformat()}"]:
                raise RuntimeError(f"expiry reported {report}, expected {n:,} rows of {day}")
            if self.keystore.has_day_key(day):
                raise RuntimeError(f"the key of {day} survived expiry")
            await pool.close()  # its backends flush their statistics as they exit
            # The run's own clock splits it: up to the commit (the key destroyed, the
            # partition out of the store, the report written) and then removing the
            # detached partition's files, which frees the disk.
            reclaim = run.timings.get("reclaim_s", 0.0)
            return Measure(
                n,
                "expire: destroy key + detach partition",
                seconds - reclaim,
                await self._dead_after(conn, dead),
                wal_bytes,
                {
                    "count_once_s": count_once,
                    **{k: v for k, v in run.timings.items() if k != "total_s"},
                },
            )
        finally:
            await pool.close()
            await conn.close()

    async def delete(self, day: dt.date, n: int) -> Measure:
        conn = await self._admin()
        try:
            await conn.execute("CHECKPOINT")
            dead, wal = await self._dead(conn), await self._wal(conn)
            began = time.perf_counter()
            status = await conn.execute("DELETE FROM checkins WHERE day = $1", day)
            seconds = time.perf_counter() - began
            wal_bytes = await conn.fetchval(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)::bigint", wal
            )
            if status != f"DELETE {n}":
                raise RuntimeError(f"DELETE answered {status!r}, expected {n:,} rows")
            measure = Measure(
                n,
                "DELETE of the same rows",
                seconds,
                await self._dead_after(conn, dead),
                wal_bytes,
                {},
            )
            await conn.execute(f"DROP TABLE checkins_{day:%Y%m%d}")  # free the disk
            return measure
        finally:
            await conn.close()

    async def run(self) -> None:
        today = dt.datetime.now(dt.UTC).date()
        for i, n in enumerate(self.opts.sizes):
            day = today - dt.timedelta(days=60 + 10 * i)
            copy_day = day + dt.timedelta(days=1)  # still kept at the clock used for `day`
            print(f"day of {n:,} check-ins", flush=True)
            await self.load(day, copy_day, n)
            self.results.append(await self.expire(day, n))
            print(f"  expired in {self.results[-1].seconds:.3f}s", flush=True)
            self.results.append(await self.delete(copy_day, n))
            print(f"  deleted in {self.results[-1].seconds:.3f}s", flush=True)


def summarize(results: list[Measure]) -> dict[str, Any]:
    sizes = sorted({m.size for m in results})
    rows = []
    for size in sizes:
        drop = next(m for m in results if m.size == size and m.method.startswith("expire"))
        delete = next(m for m in results if m.size == size and m.method.startswith("DELETE"))
        rows.append(
            {
                "size": size,
                "expire": drop.__dict__,
                "delete": delete.__dict__,
                "time_ratio": delete.seconds / drop.seconds if drop.seconds else None,
                "wal_ratio": delete.wal_bytes / drop.wal_bytes if drop.wal_bytes else None,
            }
        )
    expires = [m.seconds for m in results if m.method.startswith("expire")]
    return {
        "rows": rows,
        "expire_growth": expires[-1] / expires[0] if len(expires) > 1 and expires[0] else None,
    }


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 100_000 else f"{n / 1e3:,.1f} kB"


def render(summary: dict[str, Any]) -> str:
    lines = [
        "| day size | method | time | then files removed in | dead tuples | WAL written |",
        "|---|---|---|---|---|---|",
    ]
    for row in summary["rows"]:
        for which in ("expire", "delete"):
            m = row[which]
            reclaim = m["detail"].get("reclaim_s")
            after = f"{reclaim:.3f} s" if reclaim is not None else "-"
            lines.append(
                f"| {row['size']:,} | {m['method']} | {m['seconds']:.3f} s | {after} | "
                f"{m['dead_tuples']:,} | {_mb(m['wal_bytes'])} |"
            )
    lines.append("")
    for row in summary["rows"]:
        d = row["expire"]["detail"]
        lines.append(
            f"{row['size']:,} rows: DELETE took {row['time_ratio']:.0f}x the time and wrote "
            f"{row['wal_ratio']:.0f}x the WAL of expiry_run. Expiry broke down into counting for "
            f"the report {d.get('count_s', 0):.3f} s (the day was counted once, by the "
            f"scheduled run when it was 8 days old, in {d.get('count_once_s', 0):.3f} s), "
            f"destroying the key "
            f"{d.get('destroy_keys_s', 0):.3f} s, detaching and committing "
            f"{d.get('drop_s', 0):.3f} s (lock wait {d.get('lock_wait_s', 0):.3f} s); then "
            f"removing the detached files {d.get('reclaim_s', 0):.3f} s."
        )
    if summary["expire_growth"] is not None:
        first, last = summary["rows"][0], summary["rows"][-1]
        lines.append(
            f"Expiry time at {last['size']:,} rows / at {first['size']:,} rows: "
            f"{summary['expire_growth']:.2f}x (day size x{last['size'] / first['size']:.0f})."
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m bench.expiry",
        description="Expiring a day (drop partition + destroy key) against a DELETE.",
    )
    parser.add_argument(
        "--sizes",
        default=None,
        help="comma-separated day sizes in rows (default 1000000,5000000; --quick 100000,500000)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: small days")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    a = parser.parse_args(argv)
    raw = a.sizes or ("100000,500000" if a.quick else "1000000,5000000")
    try:
        sizes = tuple(int(s) for s in raw.split(","))
    except ValueError:
        parser.error("--sizes must be comma-separated integers")
    if not sizes or min(sizes) < 1:
        parser.error("--sizes must be positive")
    return Options(sizes=sizes, keep=a.keep, json_path=a.json)


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    started = time.monotonic()
    with clean_environment():
        bench = Bench(opts)
        try:
            bench.setup()
            asyncio.run(bench.run())
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        finally:
            bench.close()
    summary = summarize(bench.results)
    summary["environment"] = {
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "total_seconds": time.monotonic() - started,
    }
    print()
    print(render(summary))
    if opts.json_path is not None:
        opts.json_path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
        print(f"\nwrote {opts.json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
