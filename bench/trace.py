"""Trace benchmark: the time of a trace's database work on a large store, against
the straightforward design (one overlap query over the whole store), in one run.

    ./dev bench trace            # 10M check-ins, 28 days, 10,000 venues, 100 cases
    ./dev bench trace --quick    # 1M check-ins, a smoke run

Each case has 40 visits over the last 14 days, a tenth of them late in the UTC
day; the rest of the store is a random population, 2% of whose visits are at
night and often leave after 00:00 UTC, under the next day's pseudonym. For
every case the trace's two lookups run as the worker role
(services/domain/exposure/tracing.py): the case's visits through the day pseudonyms, then
everyone at those venues around those times, linking stays across midnight.
The straightforward query runs for the first few cases (it takes seconds each),
and both must find the same overlaps, or the run fails; the straightforward
query cannot link a stay across midnight (it has pseudonyms only), so the
people whose stay the trace linked are compared with the synthetic ground
truth instead, for every case: each linked stay must be the visit made, and
every night visit that overlapped a case's visit must have been found linked.
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
from services.domain.exposure import tracing
from services.kernel import db
from services.kernel.config import Settings
from services.kernel.keys import KeyStore


@dataclass(frozen=True)
class Options:
    checkins: int
    venues: int
    days: int
    cases: int
    baseline_cases: int
    visits: int
    case_days: int
    night_share: float
    case_night_share: float
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
    p.add_argument(
        "--night-share",
        type=float,
        default=0.02,
        help="share of the population's visits at night, across 00:00 UTC",
    )
    p.add_argument(
        "--case-night-share",
        type=float,
        default=0.1,
        help="share of a case's visits late in the UTC day",
    )
    p.add_argument("--seed", type=int, default=20211)
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    p.add_argument("--keep", action="store_true", help="leave the cluster directory behind")
    a = p.parse_args(argv)
    if a.quick:
        a.checkins, a.cases, a.baseline_cases = 1_000_000, 20, 2
    return Options(
        a.checkins, a.venues, a.days, a.cases, min(a.baseline_cases, a.cases), a.visits,
        a.case_days, a.night_share, a.case_night_share, a.seed, a.json, a.keep,
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
) -> tuple[Synth, list[uuid.UUID], int, dt.date]:
    conn = await asyncpg.connect(**db.connect_args(settings, db.MIGRATOR).kwargs())
    try:
        today = dt.datetime.now(dt.UTC).date()
        days = [today - dt.timedelta(days=opts.days - 1 - i) for i in range(opts.days)]
        synth = Synth.create(opts.seed, opts.venues)
        await synth.write_venues(conn)
        written = 0
        began = time.monotonic()
        people = max(1000, opts.checkins // 20)
        background = synth.background(days, opts.checkins, people, night_share=opts.night_share)
        for number, visits in enumerate(background, 1):
            written += await synth.write(conn, keystore, visits)
            rate = written / (time.monotonic() - began)
            print(f"  load: day {number}/{len(days)}, {written:,} rows, {rate:,.0f} rows/s",
                  flush=True)  # fmt: skip
        cases = [synth.person() for _ in range(opts.cases)]
        case_days = days[-opts.case_days :]
        for person in cases:
            visits = case_visits(
                synth, person, case_days, opts.visits, night_share=opts.case_night_share
            )
            written += await synth.write(conn, keystore, visits)
        print(f"  load: {written:,} rows in {time.monotonic() - began:.0f}s; analyzing",
              flush=True)  # fmt: skip
        await conn.execute("VACUUM (ANALYZE) checkins")
        return synth, cases, written, case_days[0]
    finally:
        await conn.close()


Key = tuple[uuid.UUID, uuid.UUID, dt.datetime]
"""(contact, venue, contact stay start): one overlap, as both designs give it."""


def check_linked(
    synth: Synth, rules: tracing.RiskRules, found: tracing.Found, visits: list[tracing.Stay]
) -> set[tuple[uuid.UUID, uuid.UUID]]:
    """The (contact, venue) pairs whose stay the trace linked across a day boundary,
    after checking them against the synthetic ground truth: every linked stay is a
    visit that was made, and every visit across midnight that overlapped one of the
    case's visits was found, linked. Exits the run otherwise."""
    reported = {
        (o.person_id, o.contact_stay.venue_id, o.contact_stay.start): o.contact_stay
        for o in found.overlaps
    }
    truth = {
        (made.person, venue_id, made.entry): made.exit
        for venue_id, crossing in synth.crossing.items()
        for made in crossing
    }
    for key, stay in reported.items():
        if stay.days > 1 and (truth.get(key) != stay.end or stay.end_estimated):
            raise SystemExit("a stay linked across midnight is not the visit that was made")
    for visit in visits:
        for made in synth.crossing.get(visit.venue_id, ()):
            assert made.exit is not None
            level, _, _ = rules.assess(
                visit, tracing.Stay(visit.venue, made.entry, made.exit, False, ())
            )
            got = reported.get((made.person, visit.venue_id, made.entry))
            if level and (got is None or got.days < 2 or got.end != made.exit):
                raise SystemExit("a stay across midnight that overlapped a case's visit was missed")
    return {(person, venue) for (person, venue, _), stay in reported.items() if stay.days > 1}


async def measure(
    opts: Options, settings: Settings, keystore: KeyStore, synth: Synth,
    cases: list[uuid.UUID], *, first_day: dt.date,
) -> dict[str, Any]:  # fmt: skip
    conn = await asyncpg.connect(**db.connect_args(settings, "stopcovid_worker").kwargs())
    rules = tracing.RiskRules.from_settings(settings)
    start = dt.datetime(first_day.year, first_day.month, first_day.day, tzinfo=dt.UTC)
    end = dt.datetime.now(dt.UTC)
    ours: list[float] = []
    ours_total: list[float] = []
    visits_found: list[int] = []
    overlaps_found: list[int] = []
    decrypted: list[int] = []
    linked_found: list[int] = []
    found: dict[uuid.UUID, set[Key]] = {}
    linked: dict[uuid.UUID, set[tuple[uuid.UUID, uuid.UUID]]] = {}
    try:
        for person in cases:
            timed = Timed(conn)
            began = time.perf_counter()
            visits = await tracing.find_visits(
                timed,  # type: ignore[arg-type]
                keystore, tracing.CaseSearch(person, start, end, rules),
            )  # fmt: skip
            result = await tracing.find_overlaps(
                timed,  # type: ignore[arg-type]
                keystore, visits, person, rules,
            )  # fmt: skip
            ours_total.append(time.perf_counter() - began)
            ours.append(timed.seconds)
            visits_found.append(len(visits))
            overlaps_found.append(len(result.overlaps))
            decrypted.append(result.rows_decrypted)
            linked[person] = check_linked(synth, rules, result, visits)
            linked_found.append(sum(1 for o in result.overlaps if o.contact_stay.days > 1))
            found[person] = {
                (o.person_id, o.case_visit.venue_id, o.contact_stay.start)
                for o in result.overlaps
                if (o.person_id, o.case_visit.venue_id) not in linked[person]
            }
        baseline: list[float] = []
        for person in cases[: opts.baseline_cases]:
            began = time.perf_counter()
            rows = await tracing.straightforward_overlaps(
                conn, keystore, tracing.CaseSearch(person, start, end, rules)
            )
            baseline.append(time.perf_counter() - began)
            theirs = {(who, venue, stay_start) for who, venue, stay_start, _ in rows
                      if (who, venue) not in linked[person]}  # fmt: skip
            if theirs != found[person]:
                raise SystemExit(
                    f"the two designs disagree for a case (apart from stays linked across "
                    f"midnight): {len(found[person])} overlaps "
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
        "rows_decrypted_mean": statistics.mean(decrypted),
        "linked_overlaps": sum(linked_found),
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
          f"overlaps per case on average, {figures['rows_decrypted_mean']:.1f} rows "
          f"decrypted; overlaps of stays linked across 00:00 UTC: "
          f"{figures['linked_overlaps']}, each the visit made)")  # fmt: skip
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
            synth, cases, rows, first_day = asyncio.run(load(opts, settings, keystore))
            figures = asyncio.run(
                measure(opts, settings, keystore, synth, cases, first_day=first_day)
            )
            return 0 if report(opts, rows, figures) else 1
        finally:
            private.close(opts.keep)


if __name__ == "__main__":
    raise SystemExit(main())
