"""The trace's rules at every edge, one at a time: the risk levels of an overlap
(services/domain/exposure/tracing.py, RiskRules), how scans make stays (pair_stays), the
door's decision from a level (services/checkin/caches.py, against real Postgres),
and the names shared between the trace, the schema and the API. A rule moved by a
minute, or a door that denies below HIGH, fails here by name."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import uuid
from pathlib import Path

import asyncpg
import pytest
from stopcovid.exposure.v1 import exposure_service_pb2 as pb

from services.checkin.caches import CHANNELS, Caches
from services.domain.exposure import tracing
from services.domain.exposure.tracing import (
    HIGH,
    LOW,
    MEDIUM,
    RiskRules,
    Scan,
    Stay,
    Venue,
    pair_stays,
)
from services.exposure import service as exposure
from services.kernel import db
from services.kernel.config import Settings

T0 = dt.datetime(2026, 11, 20, 10, 0, tzinfo=dt.UTC)
S = dt.timedelta(seconds=1)
M = dt.timedelta(minutes=1)
H = dt.timedelta(hours=1)
INDOOR = Venue(uuid.UUID(int=1), "Hall", "indoor", 60 * M)
OUTDOOR = Venue(uuid.UUID(int=2), "Stall", "outdoor", 30 * M)
RULES = RiskRules()


def visit(venue: Venue = INDOOR, start: dt.datetime = T0, minutes: int = 60) -> Stay:
    """A case's visit from `start`, `minutes` long, exit scanned."""
    return Stay(venue, start, start + minutes * M, False, ())


def stay(venue: Venue, start: dt.datetime, end: dt.datetime) -> Stay:
    return Stay(venue, start, end, False, ())


def level(case: Stay, start: dt.datetime, end: dt.datetime) -> int:
    return RULES.assess(case, stay(case.venue, start, end))[0]


# -- levels -------------------------------------------------------------------------


def test_the_default_rules_are_the_documented_ones() -> None:
    settings = Settings.from_env()
    assert RiskRules.from_settings(settings) == RiskRules(15 * M, 30 * M, 12 * H)


@pytest.mark.parametrize(
    ("overlap", "indoor", "outdoor"),
    [
        (1 * S, MEDIUM, LOW),
        (14 * M + 59 * S, MEDIUM, LOW),
        (15 * M, HIGH, MEDIUM),
        (15 * M + 1 * S, HIGH, MEDIUM),
        (16 * M, HIGH, MEDIUM),
        (60 * M, HIGH, MEDIUM),
    ],
)
def test_overlap_levels_on_both_sides_of_15_minutes(
    overlap: dt.timedelta, indoor: int, outdoor: int
) -> None:
    for venue, expected in ((INDOOR, indoor), (OUTDOOR, outdoor)):
        case = visit(venue)
        # The contact's stay ends `overlap` into the case's visit...
        assert level(case, T0 - 2 * H, T0 + overlap) == expected
        # ...or begins `overlap` before its end.
        assert level(case, case.end - overlap, case.end + 2 * H) == expected


def test_overlap_is_measured_within_the_case_visit() -> None:
    case = visit(minutes=20)
    level_, rule, overlap = RULES.assess(case, stay(INDOOR, T0 - H, T0 + 3 * H))
    assert (level_, overlap) == (HIGH, 20 * M)
    assert rule == "indoor overlap of 15 minutes or more"
    level_, rule, overlap = RULES.assess(case, stay(INDOOR, T0 + 5 * M, T0 + 19 * M))
    assert (level_, overlap) == (MEDIUM, 14 * M)
    assert rule == "indoor overlap under 15 minutes"


@pytest.mark.parametrize(
    ("arrival", "expected"),
    [
        (0 * M, LOW),  # arrives the moment the case leaves
        (10 * M, LOW),
        (29 * M + 59 * S, LOW),
        (30 * M, LOW),
        (30 * M + 1 * S, 0),
        (31 * M, 0),
        (2 * H, 0),
    ],
)
def test_indoor_arrival_after_the_case_left(arrival: dt.timedelta, expected: int) -> None:
    case = visit()
    assert level(case, case.end + arrival, case.end + arrival + 20 * M) == expected
    rule = RULES.assess(case, stay(INDOOR, case.end + arrival, case.end + arrival + M))[1]
    assert rule == ("indoor arrival within 30 minutes after a case left" if expected else "")


def test_outdoor_arrival_after_the_case_left_is_nothing() -> None:
    case = visit(OUTDOOR)
    for arrival in (0 * M, 10 * M, 30 * M):
        assert level(case, case.end + arrival, case.end + arrival + 20 * M) == 0


def test_leaving_before_the_case_came_is_nothing() -> None:
    case = visit()
    assert level(case, T0 - H, T0) == 0  # left the moment the case arrived
    assert level(case, T0 - H, T0 - 1 * S) == 0


# -- stays --------------------------------------------------------------------------


def scan(minutes: float, direction: str = "entry", day: dt.date | None = None) -> Scan:
    when = T0 + dt.timedelta(minutes=minutes)
    return Scan(day or when.date(), INDOOR.venue_id, uuid.UUID(int=9), int(minutes * 60),
                when, direction, b"ref", b"enc")  # fmt: skip


def spans(scans: list[Scan], venue: Venue = INDOOR) -> list[tuple[float, float, bool, int]]:
    """(start, end in minutes after T0, end estimated, scans used) per stay."""
    return [
        ((s.start - T0) / M, (s.end - T0) / M, s.end_estimated, len(s.scans))
        for s in pair_stays(scans, venue, RULES.max_stay)
    ]


def test_an_exit_ends_a_stay_up_to_12_hours_after_its_entry() -> None:
    twelve = 12 * 60
    assert spans([scan(0), scan(twelve, "exit")]) == [(0, twelve, False, 2)]
    late = twelve + 1 / 60  # one second more
    assert spans([scan(0), scan(late, "exit")]) == [(0, 60, True, 1)]
    assert spans([scan(0), scan(twelve + 1, "exit")]) == [(0, 60, True, 1)]


def test_without_an_exit_a_stay_lasts_the_default_stay() -> None:
    assert spans([scan(0)]) == [(0, 60, True, 1)]
    assert spans([scan(0)], OUTDOOR) == [(0, 30, True, 1)]
    # An exit later than the default stay still ends it, and is exact.
    assert spans([scan(0), scan(90, "exit")]) == [(0, 90, False, 2)]


def test_an_exit_without_an_entry_is_ignored() -> None:
    assert spans([scan(0, "exit")]) == []
    assert spans([scan(0), scan(10, "exit"), scan(20, "exit")]) == [(0, 10, False, 2)]


def test_a_repeated_entry_scan_is_the_same_stay() -> None:
    # Scanned twice at the door, then out: one stay from the first scan.
    assert spans([scan(0), scan(2), scan(40, "exit")]) == [(0, 40, False, 3)]
    # Without an exit the default stay runs from the latest entry.
    assert spans([scan(0), scan(50)]) == [(0, 110, True, 2)]
    # An entry the default stay or more after the last one is a new stay.
    assert spans([scan(0), scan(60)]) == [(0, 60, True, 1), (60, 120, True, 1)]
    # So is an entry after an exit.
    assert spans([scan(0), scan(10, "exit"), scan(15)]) == [(0, 10, False, 2), (15, 75, True, 1)]


def test_the_next_entry_cuts_an_estimated_stay_short() -> None:
    # With a maximum stay shorter than the default stay, an exit too late to count
    # leaves the stay open, and the next entry ends it.
    late = [scan(0), scan(7 * 60, "exit"), scan(8 * 60)]
    long_stay = Venue(INDOOR.venue_id, "Hall", "indoor", 12 * H)
    stays = pair_stays(late, long_stay, 6 * H)
    assert [((s.start - T0) / M, (s.end - T0) / M, s.end_estimated) for s in stays] == [
        (0, 8 * 60, True),
        (8 * 60, 20 * 60, True),
    ]


def test_a_stay_across_midnight_is_one_stay_once_its_scans_are_one_persons() -> None:
    night = dt.datetime(2026, 11, 20, 23, 0, tzinfo=dt.UTC)
    entry = Scan(night.date(), INDOOR.venue_id, None, None, night, "entry", b"a", b"")
    out = night + 80 * M
    exit_ = Scan(out.date(), INDOOR.venue_id, None, None, out, "exit", b"b", b"")
    [joined] = pair_stays([exit_, entry], INDOOR, RULES.max_stay)
    assert (joined.start, joined.end, joined.end_estimated, joined.days) == (night, out, False, 2)


# -- the door -----------------------------------------------------------------------


@pytest.fixture
def people_at_each_level(settings: Settings) -> dict[str, uuid.UUID]:
    """One person at each level, and one at a HIGH level that has expired."""
    people = {name: uuid.uuid4() for name in ("none", "low", "medium", "high", "expired")}

    async def prepare() -> None:
        conn = await asyncpg.connect(**db.connect_args(settings, db.MIGRATOR).kwargs())
        try:
            for name, person in people.items():
                await conn.execute(
                    "INSERT INTO risk_status (person_id, level, expire_time, reason)"
                    " VALUES ($1, $2, now() + $3, 'venue_contact')",
                    person,
                    "high" if name == "expired" else name,
                    -H if name == "expired" else 24 * H,
                )
        finally:
            await conn.close()

    asyncio.run(prepare())
    return people


def test_the_door_denies_only_the_highest_level(
    settings: Settings, people_at_each_level: dict[str, uuid.UUID]
) -> None:
    """The CheckIn server's caches, by their full reload and by the path a risk
    NOTIFY takes: only the person at an unexpired HIGH is denied."""
    people = people_at_each_level

    async def decisions() -> tuple[set[str], set[str]]:
        args = db.connect_args(settings, db.SERVICE_ROLES["checkin"]).kwargs()
        pool = await asyncpg.create_pool(**args, min_size=1, max_size=2)
        try:
            cache = Caches(pool, settings)
            now = dt.datetime.now(dt.UTC).timestamp()
            await cache.reload()
            loaded = {n for n, p in people.items() if cache.is_high_risk(p.bytes, now)}
            cache.high_risk.clear()
            changed = {"stopcovid_risk": {str(p) for p in people.values()}}
            await cache._apply({**{channel: set() for channel in CHANNELS}, **changed})
            notified = {n for n, p in people.items() if cache.is_high_risk(p.bytes, now)}
            return loaded, notified
        finally:
            await pool.close()

    loaded, notified = asyncio.run(decisions())
    assert loaded == {"high"}
    assert notified == {"high"}


# -- names shared between the trace, the schema and the API ---------------------------

MIGRATION = (
    Path(__file__).resolve().parent.parent / "services/sql/migrations/0007_trace_completeness.sql"
)


def test_every_skip_reason_and_step_has_an_api_value_and_a_schema_value() -> None:
    assert set(exposure.SKIP_REASONS) == set(tracing.SKIP_REASONS)
    reasons = set(pb.TraceSkipReason.values()) - {pb.TRACE_SKIP_REASON_UNSPECIFIED}
    assert set(exposure.SKIP_REASONS.values()) == reasons
    assert set(exposure.TRACE_STEPS) == set(tracing.STEPS)
    steps = set(pb.TraceStep.values()) - {pb.TRACE_STEP_UNSPECIFIED}
    assert set(exposure.TRACE_STEPS.values()) == steps
    check = re.search(r"failure_step IN \(([^)]*)\)", MIGRATION.read_text())
    assert check is not None
    assert set(re.findall(r"'([a-z_]+)'", check[1])) == set(tracing.STEPS)
