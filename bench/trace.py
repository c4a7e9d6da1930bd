"""Trace benchmark: the time of a trace's database work on a large store, against
the straightforward design (one overlap query over the whole store), in one run.

    ./dev bench trace            # 10M check-ins, 28 days, 10,000 venues, 100 cases
    ./dev bench trace --quick    # 1M check-ins, a smoke run

Each case has 40 visits over the last 14 days; the rest of the store is a random
population. For every case the trace's two lookups run as the worker role
(services/core/tracing.py): the case's visits through the day pseudonyms, then
everyone at those venues around those times. The straightforward query runs for
the first few cases (it takes seconds each), and both must find the same
overlaps, or the run fails.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from bench.common import PrivateDatabase, clean_environment
from bench.synth import Synth, case_visits
from services.core import db, tracing
from services.core.config import Settings
from services.core.keys import KeyStore


@dataclass(frozen=True)
class Options:
    checkins: int
    venues: int
    days: int
    cases: int
    baseline_cases: int
    visits: int
    case_days: int
    seed: int
    json_path: Path | None
    keep: bool


def parse(argv: list[str]) -> Options:
    p = argparse.ArgumentParser(prog="bench.trace", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1M check-ins, 20 cases, 2 baselines")
    p.add_argument("--checkins", type=int, default=10_000_000)
    p.add_argument("--venues", type=int, default=10_000)
    p.add_argument("--days", type=int, default=28)
    p.add_argument("--cases", type=int, default=100)
    p.add_argument("--baseline-cases", type=int, default=5)
    p.add_argument("--visits", type=int, default=40, help="visits per case")
    p.add_argument("--case-days", type=int, default=14, help="days a case's visits span")
    p.add_argument("--seed", type=int, default=20211)
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    p.add_argument("--keep", action="store_true", help="leave the cluster directory behind")
    a = p.parse_args(argv)
    if a.quick:
        a.checkins, a.cases, a.baseline_cases = 1_000_000, 20, 2
    return Options(
        a.checkins, a.venues, a.days, a.cases, min(a.baseline_cases, a.cases), a.visits,
        a.case_days, a.seed, a.json, a.keep,
    )  # fmt: skip


class Timed:
    """Times every statement of a connection: the trace's database work."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.seconds = 0.0
        self.statements = 0

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        began = time.perf_counter()
        try:
            return await self.conn.fetch(query, *args)
        finally:
            self.seconds += time.perf_counter() - began
            self.statements += 1


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def load(
    opts: Options, settings: Settings, keystore: KeyStore
) -> tuple[list[uuid.UUID], int, dt.date]:
    conn = await asyncpg.connect(**db.connect_args(settings, db.MIGRATOR).kwargs())
    try:
        today = dt.datetime.now(dt.UTC).date()
        days = [today - dt.timedelta(days=opts.days - 1 - i) for i in range(opts.days)]
        synth = Synth.create(opts.seed, opts.venues)
        await synth.write_venues(conn)
        written = 0
        began = time.monotonic()
        people = max(1000, opts.checkins // 20)
        for number, visits in enumerate(synth.background(days, opts.checkins, people), 1):
            written += await synth.write(conn, keystore, visits)
            rate = written / (time.monotonic() - began)
            print(f"  load: day {number}/{len(days)}, {written:,} rows, {rate:,.0f} rows/s",
                  flush=True)  # fmt: skip
        cases = [synth.person() for _ in range(opts.cases)]
        case_days = days[-opts.case_days :]
        for person in cases:
            written += await synth.write(
                conn, keystore, case_visits(synth, person, case_days, opts.visits)
            )
        print(f"  load: {written:,} rows in {time.monotonic() - began:.0f}s; analyzing",
              flush=True)  # fmt: skip
        await conn.execute("VACUUM (ANALYZE) checkins")
        return cases, written, case_days[0]
    finally:
        await conn.close()


async def measure(
    opts: Options, settings: Settings, keystore: KeyStore, cases: list[uuid.UUID],
    first_day: dt.date,
) -> dict[str, Any]:  # fmt: skip
    conn = await asyncpg.connect(**db.connect_args(settings, "stopcovid_worker").kwargs())
    rules = tracing.RiskRules.from_settings(settings)
    start = dt.datetime(first_day.year, first_day.month, first_day.day, tzinfo=dt.UTC)
    end = dt.datetime.now(dt.UTC)
    ours: list[float] = []
    ours_total: list[float] = []
    visits_found: list[int] = []
    overlaps_found: list[int] = []
    found: dict[uuid.UUID, set[tuple[uuid.UUID, uuid.UUID, dt.datetime]]] = {}
    try:
        for person in cases:
            timed = Timed(conn)
            began = time.perf_counter()
            visits = await tracing.find_visits(
                timed,  # type: ignore[arg-type]
                keystore, person, start, end, rules=rules,
            )  # fmt: skip
            overlaps = await tracing.find_overlaps(
                timed,  # type: ignore[arg-type]
                keystore, visits, person, rules,
            )  # fmt: skip
            ours_total.append(time.perf_counter() - began)
            ours.append(timed.seconds)
            visits_found.append(len(visits))
            overlaps_found.append(len(overlaps))
            found[person] = {(o.person_id, o.case_visit.venue_id, o.contact_stay.start)
                             for o in overlaps}  # fmt: skip
        baseline: list[float] = []
        for person in cases[: opts.baseline_cases]:
            began = time.perf_counter()
            rows = await tracing.straightforward_overlaps(
                conn, keystore, person, start, end, rules=rules
            )
            baseline.append(time.perf_counter() - began)
            theirs = {(who, venue, stay_start) for who, venue, stay_start, _ in rows}
            if theirs != found[person]:
                raise SystemExit(
                    f"the two designs disagree for a case: {len(found[person])} overlaps "
                    f"against {len(theirs)} ({len(found[person] - theirs)} only in the trace, "
                    f"{len(theirs - found[person])} only in the straightforward query)"
                )
            print(f"  straightforward query: {baseline[-1]:.2f}s, same {len(theirs)} overlaps",
                  flush=True)  # fmt: skip
    finally:
        await conn.close()
    return {
        "cases": len(cases),
        "visits_mean": statistics.mean(visits_found),
        "overlaps_mean": statistics.mean(overlaps_found),
        "trace_db_ms": {"p50": pct(ours, 0.5) * 1e3, "p95": pct(ours, 0.95) * 1e3,
                        "max": max(ours) * 1e3},
        "trace_total_ms": {"p50": pct(ours_total, 0.5) * 1e3,
                           "p95": pct(ours_total, 0.95) * 1e3},
        "baseline_cases": len(baseline),
        "baseline_ms": {"p50": pct(baseline, 0.5) * 1e3, "p95": pct(baseline, 0.95) * 1e3,
                        "max": max(baseline) * 1e3},
    }  # fmt: skip


def report(opts: Options, rows: int, figures: dict[str, Any]) -> bool:
    ours, base = figures["trace_db_ms"], figures["baseline_ms"]
    ratio50 = base["p50"] / ours["p50"]
    ratio95 = base["p50"] / ours["p95"]
    print()
    print(f"store: {rows:,} check-ins, {opts.days} days, {opts.venues:,} venues; "
          f"{figures['cases']} cases of {opts.visits} visits over {opts.case_days} days "
          f"(found {figures['visits_mean']:.1f} visits, {figures['overlaps_mean']:.1f} "
          f"overlaps per case on average)")  # fmt: skip
    print()
    print("| design | cases | p50 | p95 | max |")
    print("|---|---|---|---|---|")
    print(f"| trace, database work (2 statements) | {figures['cases']} | {ours['p50']:.1f} ms | "
          f"{ours['p95']:.1f} ms | {ours['max']:.1f} ms |")  # fmt: skip
    total = figures["trace_total_ms"]
    print(f"| trace, with pairing and decryption | {figures['cases']} | {total['p50']:.1f} ms | "
          f"{total['p95']:.1f} ms | - |")  # fmt: skip
    print(f"| straightforward: one overlap query over the store | {figures['baseline_cases']} | "
          f"{base['p50']:.0f} ms | {base['p95']:.0f} ms | {base['max']:.0f} ms |")  # fmt: skip
    print()
    print(f"ratio: straightforward p50 / trace p50 = {ratio50:,.0f}x; "
          f"straightforward p50 / trace p95 = {ratio95:,.0f}x")  # fmt: skip
    ok_p95 = bool(ours["p95"] <= 100)
    ok_ratio = bool(ratio95 >= 10)
    print(f"target p95 <= 100 ms: {'PASS' if ok_p95 else 'FAIL'} ({ours['p95']:.1f} ms)")
    print(f"target >= 10x the straightforward query: {'PASS' if ok_ratio else 'FAIL'} "
          f"({ratio95:,.0f}x at the trace's p95)")  # fmt: skip
    figures["ratio_p50"] = ratio50
    figures["ratio_p95"] = ratio95
    figures["rows"] = rows
    if opts.json_path:
        opts.json_path.write_text(json.dumps(figures, indent=2) + "\n")
    return ok_p95 and ok_ratio


def main(argv: list[str] | None = None) -> int:
    opts = parse(sys.argv[1:] if argv is None else argv)
    with clean_environment():
        private = PrivateDatabase("stopcovid-bench-trace-")
        try:
            private.start()
            settings, keystore = private.settings, private.keystore
            cases, rows, first_day = asyncio.run(load(opts, settings, keystore))
            figures = asyncio.run(measure(opts, settings, keystore, cases, first_day))
            return 0 if report(opts, rows, figures) else 1
        finally:
            private.close(opts.keep)


if __name__ == "__main__":
    raise SystemExit(main())
