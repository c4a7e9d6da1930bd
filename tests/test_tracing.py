"""The trace core (services/domain/exposure/tracing.py) against a real store: hand-made stays
with known levels and durations, stays across 00:00 UTC, rows that can be nobody's,
and random populations checked against the straightforward overlap query (the
benchmark's baseline) and, for stays across midnight, the synthetic ground truth."""

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
from bench.synth import write_rows as synth_write_rows
from bench.trace import check_linked
from services.domain.exposure import tracing
from services.domain.exposure.tracing import CaseSearch
from services.kernel import db
from services.kernel.config import Settings
from services.kernel.keys import KeyStore, load_kek

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
        visits = await tracing.find_visits(
            conn, keystore, CaseSearch(case, at(0), at(23, 59, TODAY))
        )
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
            found = await tracing.find_visits(conn, keystore, CaseSearch(case, start, end))
            assert len(found) == 12
            ours = (await tracing.find_overlaps(conn, keystore, found, case)).overlaps
            theirs = await tracing.straightforward_overlaps(
                conn, keystore, CaseSearch(case, start, end)
            )
            results.append((
                {(o.person_id, o.case_visit.venue_id, o.contact_stay.start) for o in ours},
                {(who, venue, stay_start) for who, venue, stay_start, _ in theirs},
            ))  # fmt: skip
        return results

    results = run(settings, both)
    assert sum(len(ours) for ours, _ in results) > 10  # the population does overlap
    for ours, theirs in results:
        assert ours == theirs


# -- across the day boundary, and rows that can be nobody's --------------------------

MIDNIGHT = dt.datetime.combine(DAY + dt.timedelta(days=1), dt.time(), dt.UTC)


def near_midnight(minutes: int) -> dt.datetime:
    """`minutes` after 00:00 UTC of the day after DAY (negative: before it)."""
    return MIDNIGHT + minutes * M


Row = tuple[object, ...]


def one_venue(seed: int) -> tuple[Synth, SynthVenue]:
    """A synthetic population of one indoor venue with an hour's default stay."""
    venue = SynthVenue(uuid.uuid4(), uuid.uuid4(), "indoor", dt.timedelta(hours=1))
    synth = Synth.create(seed, 0)
    synth.venues.append(venue)
    return synth, venue


def scans(synth: Synth, keystore: KeyStore, person: uuid.UUID, venue: SynthVenue,
          *times: tuple[int, str]) -> list[Row]:  # fmt: skip
    """Store rows of `person`'s scans at `venue`: (minutes from midnight, direction)."""
    return [synth.scan_row(keystore, person, venue, near_midnight(t), d) for t, d in times]


def write_rows(settings: Settings, synth: Synth, keystore: KeyStore, rows: list[Row]) -> None:
    async def go() -> None:
        conn = await asyncpg.connect(**db.connect_args(settings, db.MIGRATOR).kwargs())
        try:
            await synth.write_venues(conn)
            await synth_write_rows(conn, keystore, rows)
        finally:
            await conn.close()

    asyncio.run(go())


def search(
    settings: Settings, keystore: KeyStore, case: uuid.UUID
) -> tuple[list[tracing.Stay], tracing.Found]:
    async def body(conn: asyncpg.Connection) -> tuple[list[tracing.Stay], tracing.Found]:
        start = MIDNIGHT - dt.timedelta(days=2)
        visits = await tracing.find_visits(
            conn, keystore, CaseSearch(case, start, at(23, 59, TODAY))
        )
        return visits, await tracing.find_overlaps(conn, keystore, visits, case)

    return run(settings, body)


def test_stays_across_midnight_are_linked_and_only_what_matters_is_decrypted(
    settings: Settings, keystore: KeyStore
) -> None:
    synth, bar = one_venue(5)
    case = synth.person()
    p = {name: synth.person() for name in "ABCDEFGHL"}
    rows = [
        *scans(synth, keystore, case, bar, (-30, "entry"), (40, "exit")),  # 23:30-00:40
        # 22:40-00:20: without the link, an estimated hour that overlaps 10 minutes.
        *scans(synth, keystore, p["A"], bar, (-80, "entry"), (20, "exit")),
        *scans(synth, keystore, p["B"], bar, (5, "entry"), (25, "exit")),  # after midnight
        # Scanned in at 23:58 and again at 00:03, out at 00:12: one stay of 14 minutes.
        *scans(synth, keystore, p["C"], bar, (-2, "entry"), (3, "entry"), (12, "exit")),
        # An entry 13.5 hours before an exit: the exit does not count.
        *scans(synth, keystore, p["D"], bar, (-13 * 60, "entry"), (30, "exit")),
        *scans(synth, keystore, p["E"], bar, (-120, "entry"), (-40, "exit")),  # left before
        # In at 13:00, out at 00:50 next day: 11 h 50 min, within the maximum stay.
        *scans(synth, keystore, p["F"], bar, (-11 * 60, "entry"), (50, "exit")),
        *scans(synth, keystore, p["G"], bar, (-14 * 60, "entry"), (-13 * 60 - 30, "exit")),
        *scans(synth, keystore, p["H"], bar, (9 * 60, "entry")),  # the next morning
        *scans(synth, keystore, p["L"], bar, (60, "entry"), (80, "exit")),  # 20 min after
    ]
    write_rows(settings, synth, keystore, rows)

    visits, found = search(settings, keystore, case)

    [visit] = visits  # the case's own stay is linked across midnight too
    assert (visit.start, visit.end, visit.end_estimated, visit.days) == (
        near_midnight(-30),
        near_midnight(40),
        False,
        2,
    )
    names = {person: name for name, person in p.items()}
    got = {
        names[o.person_id]: (
            o.level,
            o.overlap,
            (o.contact_stay.start - MIDNIGHT) / M,
            (o.contact_stay.end - MIDNIGHT) / M,
            o.contact_stay.end_estimated,
            o.contact_stay.days,
        )
        for o in found.overlaps
    }
    assert got == {
        "A": (tracing.HIGH, 50 * M, -80, 20, False, 2),
        "B": (tracing.HIGH, 20 * M, 5, 25, False, 1),
        "C": (tracing.MEDIUM, 14 * M, -2, 12, False, 2),
        "F": (tracing.HIGH, 70 * M, -11 * 60, 50, False, 2),
        "L": (tracing.LOW, 0 * M, 60, 80, False, 1),
    }
    assert len(found.overlaps) == 5
    assert found.links == 3  # A, C and F
    # Decrypted: the rows at the boundary whose joining could change a level (the
    # last entries of A, C, F on the first day; the first scans of A, B, C, D, F on
    # the next), and L, found a contact. Not D's entry 13.5 hours before any exit,
    # nor E, G or H.
    assert found.rows_decrypted == 9
    assert found.skipped_counts() == {reason: 0 for reason in tracing.SKIP_REASONS}


def test_rows_that_can_be_nobodys_are_skipped_and_counted(
    settings: Settings, keystore: KeyStore
) -> None:
    synth, hall = one_venue(6)
    case = synth.person()
    p = {name: synth.person() for name in ("withdrawn", "corrupt", "half", "gone", "plain")}
    withdrawn = scans(synth, keystore, p["withdrawn"], hall, (10, "entry"), (60, "exit"))
    corrupt = scans(synth, keystore, p["corrupt"], hall, (15, "entry"), (55, "exit"))
    half = scans(synth, keystore, p["half"], hall, (20, "entry"), (50, "exit"))
    rows = [
        *scans(synth, keystore, case, hall, (0, "entry"), (60, "exit")),
        # Unlinked by a withdrawal of consent: a random pseudonym, no ciphertext.
        *[(*r[:9], uuid.uuid4().bytes, b"", r[11]) for r in withdrawn],
        # Every ciphertext of one person damaged; only the entry's of another.
        *[(*r[:10], _damaged(r[10]), r[11]) for r in corrupt],
        (*half[0][:10], _damaged(half[0][10]), half[0][11]),
        half[1],
        # The day before: its key is destroyed below, but its rows are still there.
        *scans(synth, keystore, p["gone"], hall, (-30, "entry")),
        *scans(synth, keystore, p["plain"], hall, (30, "entry"), (44, "exit")),
    ]
    write_rows(settings, synth, keystore, rows)
    keystore.destroy_day_key(DAY)

    visits, found = search(settings, keystore, case)

    assert [(v.start, v.end) for v in visits] == [(near_midnight(0), near_midnight(60))]
    assert {o.person_id: o.level for o in found.overlaps} == {
        p["half"]: tracing.HIGH,  # its exit still says who it was
        p["plain"]: tracing.MEDIUM,
    }
    assert found.skipped_counts() == {
        tracing.WITHDRAWN: 2,
        tracing.KEY_DESTROYED: 1,
        tracing.UNDECRYPTABLE: 3,
    }


def _damaged(ciphertext: object) -> bytes:
    """The ciphertext with one byte flipped (its GCM tag no longer verifies)."""
    assert isinstance(ciphertext, bytes)
    return ciphertext[:-1] + bytes([ciphertext[-1] ^ 1])


@pytest.mark.parametrize("seed", [7, 8])
def test_a_population_out_at_night_matches_the_straightforward_query_and_the_truth(
    settings: Settings, keystore: KeyStore, seed: int
) -> None:
    """As the trace benchmark checks it: the same overlaps as the straightforward
    query, apart from stays linked across midnight (which it cannot link), and those
    are exactly the night visits made."""
    synth = Synth.create(seed, 12)
    days = [TODAY - dt.timedelta(days=i) for i in (3, 2, 1)]
    visits = [
        v for day_visits in synth.background(days, 2400, 600, night_share=0.3) for v in day_visits
    ]
    cases = [synth.person() for _ in range(3)]
    for case in cases:
        visits += case_visits(synth, case, days, 12, night_share=0.5)
    store(settings, synth, keystore, visits)
    assert sum(len(v) for v in synth.crossing.values()) > 50

    Keys = set[tuple[uuid.UUID, uuid.UUID, dt.datetime]]

    async def both(conn: asyncpg.Connection) -> list[tuple[int, Keys, Keys]]:
        rules = tracing.RiskRules()
        results = []
        start, end = at(0, day=days[0]), at(23, 59, TODAY)
        for case in cases:
            found = await tracing.find_visits(conn, keystore, CaseSearch(case, start, end))
            ours = await tracing.find_overlaps(conn, keystore, found, case)
            linked = check_linked(synth, rules, ours, found)
            theirs = await tracing.straightforward_overlaps(
                conn, keystore, CaseSearch(case, start, end)
            )
            results.append((
                len(linked),
                {(o.person_id, o.case_visit.venue_id, o.contact_stay.start)
                 for o in ours.overlaps if (o.person_id, o.case_visit.venue_id) not in linked},
                {(who, venue, stay_start) for who, venue, stay_start, _ in theirs
                 if (who, venue) not in linked},
            ))  # fmt: skip
        return results

    results = run(settings, both)
    assert sum(linked for linked, _, _ in results) > 0  # some stays did cross midnight
    for _, ours, theirs in results:
        assert ours == theirs
