"""The trace core (services/core/tracing.py) against a real store: hand-made stays
with known levels and durations, and a random population checked against the
straightforward overlap query (the benchmark's baseline) as an oracle."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import asyncpg
import pytest

from bench.synth import Synth, SynthVenue, Visit, case_visits
from services.core import db, tracing
from services.core.config import Settings
from services.core.keys import KeyStore, load_kek

T = TypeVar("T")
M = dt.timedelta(minutes=1)
TODAY = dt.datetime.now(dt.UTC).date()
DAY = TODAY - dt.timedelta(days=2)


def at(hour: int, minute: int = 0, day: dt.date = DAY) -> dt.datetime:
    return dt.datetime(day.year, day.month, day.day, hour, minute, tzinfo=dt.UTC)


def run(settings: Settings, body: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    """Run `body` with a connection as the worker role (the role traces run as)."""

    async def go() -> T:
        conn = await asyncpg.connect(**db.connect_args(settings, "stopcovid_worker").kwargs())
        try:
            return await body(conn)
        finally:
            await conn.close()

    return asyncio.run(go())


def store(settings: Settings, synth: Synth, keystore: KeyStore, visits: list[Visit]) -> None:
    async def go() -> None:
        conn = await asyncpg.connect(**db.connect_args(settings, db.MIGRATOR).kwargs())
        try:
            await synth.write_venues(conn)
            await synth.write(conn, keystore, visits)
        finally:
            await conn.close()

    asyncio.run(go())


@pytest.fixture
def keystore(settings: Settings, tmp_path: Path) -> KeyStore:
    """A key store of this test's own: the session's is shared, and one test here
    destroys a day key."""
    return KeyStore(tmp_path / "keys", load_kek(settings.secrets_dir))


def trace(
    settings: Settings, keystore: KeyStore, case: uuid.UUID
) -> tuple[list[tracing.Stay], list[tracing.Overlap]]:
    async def body(conn: asyncpg.Connection) -> tuple[list[tracing.Stay], list[tracing.Overlap]]:
        visits = await tracing.find_visits(conn, keystore, case, at(0), at(23, 59, TODAY))
        return visits, (await tracing.find_overlaps(conn, keystore, visits, case)).overlaps

    return run(settings, body)


def test_levels_and_durations_of_hand_made_stays(settings: Settings, keystore: KeyStore) -> None:
    indoor = SynthVenue(uuid.uuid4(), uuid.uuid4(), "indoor", dt.timedelta(hours=1))
    outdoor = SynthVenue(uuid.uuid4(), uuid.uuid4(), "outdoor", dt.timedelta(minutes=30))
    other = SynthVenue(uuid.uuid4(), uuid.uuid4(), "indoor", dt.timedelta(hours=1))
    synth = Synth.create(1, 0)
    synth.venues.extend([indoor, outdoor, other])
    case = uuid.uuid4()
    people = {name: uuid.uuid4() for name in "ABCDEFGHIJKL"}
    p = people
    visits = [
        Visit(case, indoor, at(10), at(10, 40)),
        Visit(case, outdoor, at(12), None),  # default stay: 12:00-12:30
        Visit(p["A"], indoor, at(10, 10), at(10, 50)),  # 30 min inside the case's stay
        Visit(p["B"], indoor, at(10, 30), None),  # 10 min, end estimated
        Visit(p["C"], indoor, at(10, 50), at(11, 30)),  # arrived 10 min after the case left
        Visit(p["D"], indoor, at(11, 20), None),  # 40 min after: nothing
        Visit(p["E"], indoor, at(9), at(9, 55)),  # left before the case came
        Visit(p["F"], indoor, at(9, 30), None),  # default stay to 10:30: 30 min
        Visit(p["G"], outdoor, at(12), at(12, 20)),  # outdoor 20 min
        Visit(p["H"], outdoor, at(12, 25), at(12, 35)),  # outdoor 5 min
        Visit(p["I"], outdoor, at(12, 40), None),  # outdoors, arriving after: nothing
        Visit(p["J"], other, at(10), at(11)),  # another venue
        Visit(p["K"], indoor, at(10, 10, DAY - dt.timedelta(days=1)), None),  # another day
        Visit(p["L"], indoor, at(10, 39), at(10, 41)),  # 1 minute
    ]  # fmt: skip
    store(settings, synth, keystore, visits)

    found_visits, overlaps = trace(settings, keystore, case)

    assert [(v.venue_id, v.start, v.end, v.end_estimated) for v in found_visits] == [
        (indoor.venue_id, at(10), at(10, 40), False),
        (outdoor.venue_id, at(12), at(12, 30), True),
    ]
    got = {
        next(n for n, pid in people.items() if pid == o.person_id): (o.level, o.overlap, o.rule)
        for o in overlaps
    }
    assert got == {
        "A": (tracing.HIGH, 30 * M, "indoor overlap of 15 minutes or more"),
        "B": (tracing.MEDIUM, 10 * M, "indoor overlap under 15 minutes"),
        "C": (tracing.LOW, 0 * M, "indoor arrival within 30 minutes after a case left"),
        "F": (tracing.HIGH, 30 * M, "indoor overlap of 15 minutes or more"),
        "G": (tracing.MEDIUM, 20 * M, "outdoor overlap of 15 minutes or more"),
        "H": (tracing.LOW, 5 * M, "outdoor overlap under 15 minutes"),
        "L": (tracing.MEDIUM, 1 * M, "indoor overlap under 15 minutes"),
    }
    assert len(overlaps) == len(got)  # one overlap each, and the case is not its own contact
    estimated = {o.person_id for o in overlaps if o.contact_stay.end_estimated}
    assert estimated == {p["B"], p["F"]}


def test_a_destroyed_day_key_hides_that_day(settings: Settings, keystore: KeyStore) -> None:
    venue = SynthVenue(uuid.uuid4(), uuid.uuid4(), "indoor", dt.timedelta(hours=1))
    synth = Synth.create(2, 0)
    synth.venues.append(venue)
    case, contact = uuid.uuid4(), uuid.uuid4()
    old = DAY - dt.timedelta(days=1)
    store(settings, synth, keystore, [
        Visit(case, venue, at(10, day=old), None),
        Visit(contact, venue, at(10, day=old), None),
        Visit(case, venue, at(10), None),
        Visit(contact, venue, at(10), None),
    ])  # fmt: skip
    keystore.destroy_day_key(old)

    visits, overlaps = trace(settings, keystore, case)

    assert [v.start for v in visits] == [at(10)]
    assert [(o.person_id, o.contact_stay.start) for o in overlaps] == [(contact, at(10))]


@pytest.mark.parametrize("seed", [3, 4])
def test_random_population_matches_the_straightforward_query(
    settings: Settings, keystore: KeyStore, seed: int
) -> None:
    synth = Synth.create(seed, 15)
    days = [TODAY - dt.timedelta(days=i) for i in (3, 2, 1)]
    visits = [v for day_visits in synth.background(days, 3000, 300) for v in day_visits]
    cases = [synth.person() for _ in range(3)]
    for case in cases:
        visits += case_visits(synth, case, days, 12)
    store(settings, synth, keystore, visits)

    Found = set[tuple[uuid.UUID, uuid.UUID, dt.datetime]]

    async def both(conn: asyncpg.Connection) -> list[tuple[Found, Found]]:
        results = []
        start, end = at(0, day=days[0]), at(23, 59, TODAY)
        for case in cases:
            found = await tracing.find_visits(conn, keystore, case, start, end)
            assert len(found) == 12
            ours = (await tracing.find_overlaps(conn, keystore, found, case)).overlaps
            theirs = await tracing.straightforward_overlaps(conn, keystore, case, start, end)
            results.append((
                {(o.person_id, o.case_visit.venue_id, o.contact_stay.start) for o in ours},
                {(who, venue, stay_start) for who, venue, stay_start, _ in theirs},
            ))  # fmt: skip
        return results

    results = run(settings, both)
    assert sum(len(ours) for ours, _ in results) > 10  # the population does overlap
    for ours, theirs in results:
        assert ours == theirs
