"""For random populations, the trace finds exactly what the README's rules say.

Hypothesis draws a case's visits and a crowd around them at three venues, with the
edges a real outbreak has: stays across 00:00 UTC (where the day pseudonym
changes) at entry or at exit, entry scans made twice, exits exactly 12 hours after
the entry or a minute more, no exit at all, overlaps a second either side of 15
minutes, arrivals either side of 30 minutes after the case left, people who
withdrew consent (their rows unlinked) and rows whose ciphertext is damaged. The
rows go into the real store as the ingest workers write them, and the trace's two
lookups (services/domain/exposure/tracing.py) run against it as the worker role.

The oracle below is written from the README's table, not from the code under
test: it imports nothing that decides a stay or a level, and works from what
each person did (when they came in, scanned again, left), not from the rows.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stopcovid.common.v1 import common_pb2

from bench.synth import Synth, SynthVenue, write_rows
from services.domain.exposure import tracing
from services.kernel import db
from services.kernel.config import Settings
from services.kernel.keys import KeyStore, load_kek

M = dt.timedelta(minutes=1)
H = dt.timedelta(hours=1)
HIGH, MEDIUM, LOW = (
    common_pb2.RISK_LEVEL_HIGH,
    common_pb2.RISK_LEVEL_MEDIUM,
    common_pb2.RISK_LEVEL_LOW,
)
MIDNIGHT = dt.datetime.combine(
    dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1), dt.time(), dt.UTC
)

# -- the oracle: the README's rules, written out ----------------------------------------

LONG = dt.timedelta(minutes=15)  # an overlap this long or longer is "long"
AFTER = dt.timedelta(minutes=30)  # arriving indoors this soon after the case left
MAX_STAY = dt.timedelta(hours=12)  # an exit counts only this soon after the entry


@dataclass(frozen=True)
class Place:
    name: str
    indoor: bool
    default_stay: dt.timedelta


@dataclass(frozen=True)
class Presence:
    """What one person did at one place: came in (and maybe scanned in again a few
    minutes later), and maybe scanned out."""

    place: int
    entries: tuple[dt.datetime, ...]
    exit: dt.datetime | None


def oracle_stay(p: Presence, place: Place) -> tuple[dt.datetime, dt.datetime, bool]:
    """(start, end, end estimated): from the first entry; to the exit if it came
    within 12 h of the last entry scan, else the venue's default stay after it."""
    if p.exit is not None and p.exit - p.entries[-1] <= MAX_STAY:
        return p.entries[0], p.exit, False
    return p.entries[0], p.entries[-1] + place.default_stay, True


def oracle_level(
    place: Place, case: tuple[dt.datetime, dt.datetime], contact: tuple[dt.datetime, dt.datetime]
) -> tuple[int, dt.timedelta]:
    """(level, overlap) by the README's table; level 0: not a contact."""
    overlap = min(case[1], contact[1]) - max(case[0], contact[0])
    if overlap > dt.timedelta(0):
        if place.indoor:
            return (HIGH if overlap >= LONG else MEDIUM), overlap
        return (MEDIUM if overlap >= LONG else LOW), overlap
    if place.indoor and case[1] <= contact[0] <= case[1] + AFTER:
        return LOW, dt.timedelta(0)
    return 0, dt.timedelta(0)


# -- populations ------------------------------------------------------------------------

PLACES = (
    Place("hall", True, 60 * M),
    Place("bar", True, 120 * M),
    Place("market", False, 30 * M),
)

# Minute offsets that sit on the rules' edges (drawn two times in three).
EDGES = [-15, -14, 0, 1, 14, 15, 16, 29, 30, 31, 59, 60, 61]


@st.composite
def presence(draw: st.DrawFn, place: int, anchor: dt.datetime, earliest: int) -> Presence:
    """Someone at `place` around `anchor` (the case's arrival there, or midnight):
    arriving from `earliest` minutes before it, staying a drawn time or without
    an exit, sometimes scanning in twice."""
    edge = st.sampled_from(EDGES)
    entry = anchor + draw(st.one_of(edge, edge, st.integers(-earliest, 180))) * M
    entries = [entry]
    if draw(st.integers(0, 4)) == 0:
        entries.append(entry + draw(st.integers(0, 10)) * M)
    length = draw(
        st.none()
        | st.sampled_from([12 * 60, 12 * 60 + 1, 15, 14, 30])
        | st.integers(1, 12 * 60 + 30)
    )
    leave = None if length is None else entries[-1] + length * M
    return Presence(place, tuple(entries), leave)


@dataclass(frozen=True)
class Person:
    presence: Presence
    kind: str  # "plain", "withdrawn" (rows unlinked) or "damaged" (ciphertexts)


@st.composite
def population(draw: st.DrawFn) -> tuple[list[Presence], list[Person]]:
    """The case's visits (at most one per place: around midnight, so they may
    cross it) and up to 14 other people, each at one place once."""
    places = draw(st.lists(st.integers(0, 2), min_size=1, max_size=3, unique=True))
    case = [
        draw(presence(place, MIDNIGHT + draw(st.integers(-150, 90)) * M, 0)) for place in places
    ]
    # Others arrive relative to the case's arrival or departure, so that the
    # edges (a minute either side of 15 and of 30) fall on the case's times.
    anchors = {p.place: (p.entries[0], oracle_stay(p, PLACES[p.place])[1]) for p in case}
    people = []
    for _ in range(draw(st.integers(0, 14))):
        place = draw(st.integers(0, 2))
        anchor = draw(st.sampled_from(anchors.get(place, (MIDNIGHT,))))
        # Earliest arrival 11 h before the case: the trace looks 12 h back.
        kind = draw(st.sampled_from(["plain"] * 6 + ["withdrawn", "damaged"]))
        people.append(Person(draw(presence(place, anchor, 11 * 60)), kind))
    return case, people


# -- the store, and the trace -----------------------------------------------------------


def rows_of(
    synth: Synth, keystore: KeyStore, venues: list[SynthVenue], who: uuid.UUID, p: Presence
) -> list[tuple[object, ...]]:
    venue = venues[p.place]
    scans = [(t, "entry") for t in p.entries] + ([(p.exit, "exit")] if p.exit else [])
    return [synth.scan_row(keystore, who, venue, when, d) for when, d in scans]


def unlinked(row: tuple[object, ...]) -> tuple[object, ...]:
    """As WithdrawConsent leaves a row: a random pseudonym, no ciphertext."""
    return (*row[:9], uuid.uuid4().bytes, b"", row[11])


def damaged(row: tuple[object, ...]) -> tuple[object, ...]:
    enc = row[10]
    assert isinstance(enc, bytes)
    return (*row[:10], enc[:-1] + bytes([enc[-1] ^ 1]), row[11])


@pytest.fixture
def keystore(settings: Settings, tmp_path: Path) -> KeyStore:
    return KeyStore(tmp_path / "keys", load_kek(settings.secrets_dir))


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(drawn=population())
def test_the_trace_equals_the_rules(
    settings: Settings, keystore: KeyStore, drawn: tuple[list[Presence], list[Person]]
) -> None:
    case_presences, people = drawn
    synth = Synth.create(0, 0)
    venues = [
        SynthVenue(uuid.uuid4(), uuid.uuid4(), "indoor" if p.indoor else "outdoor", p.default_stay)
        for p in PLACES
    ]
    synth.venues.extend(venues)
    case = uuid.uuid4()
    ids = [uuid.uuid4() for _ in people]
    rows = [r for p in case_presences for r in rows_of(synth, keystore, venues, case, p)]
    withdrawn_rows: list[tuple[object, ...]] = []
    damaged_rows: set[tuple[object, ...]] = set()
    for who, person in zip(ids, people, strict=True):
        made = rows_of(synth, keystore, venues, who, person.presence)
        if person.kind == "withdrawn":
            made = [unlinked(r) for r in made]
            withdrawn_rows += made
        elif person.kind == "damaged":
            made = [damaged(r) for r in made]
            damaged_rows |= {(r[0], r[1], r[2], r[3], r[4], r[5]) for r in made}
        rows += made

    # What the rules say.
    visits = {p.place: oracle_stay(p, PLACES[p.place]) for p in case_presences}  # one per place
    expected = set()
    for who, person in zip(ids, people, strict=True):
        place = person.presence.place
        if place not in visits:
            continue
        stay = oracle_stay(person.presence, PLACES[place])
        level, overlap = oracle_level(PLACES[place], visits[place][:2], stay[:2])
        if level and person.kind == "plain":
            expected.add((who, place, *stay, level, overlap))
    in_range = 0
    for row in withdrawn_rows:
        place = next(i for i, v in enumerate(venues) if v.venue_id == row[1])
        when = row[4]
        assert isinstance(when, dt.datetime)
        if place in visits:
            start, end, _ = visits[place]
            in_range += start - MAX_STAY <= when < end + AFTER + MAX_STAY

    async def trace() -> tuple[list[tracing.Stay], tracing.Found]:
        conn = await asyncpg.connect(**db.connect_args(settings, db.MIGRATOR).kwargs())
        try:
            await synth.write_venues(conn)
            await write_rows(conn, keystore, rows)
        finally:
            await conn.close()
        conn = await asyncpg.connect(**db.connect_args(settings, "stopcovid_worker").kwargs())
        try:
            window = (MIDNIGHT - dt.timedelta(days=1), MIDNIGHT + dt.timedelta(days=2))
            found = await tracing.find_visits(conn, keystore, tracing.CaseSearch(case, *window))
            return found, await tracing.find_overlaps(conn, keystore, found, case)
        finally:
            await conn.close()

    found_visits, found = asyncio.run(trace())

    place_of = {v.venue_id: i for i, v in enumerate(venues)}
    assert {place_of[v.venue_id]: (v.start, v.end, v.end_estimated) for v in found_visits} == (
        visits
    )
    assert len(found_visits) == len(visits)
    got = {
        (
            o.person_id,
            place_of[o.contact_stay.venue_id],
            o.contact_stay.start,
            o.contact_stay.end,
            o.contact_stay.end_estimated,
            o.level,
            o.overlap,
        )
        for o in found.overlaps
    }
    assert got == expected
    assert len(found.overlaps) == len(expected)  # one row per contact stay and visit
    assert len(found.skipped[tracing.WITHDRAWN]) == in_range
    assert found.skipped[tracing.KEY_DESTROYED] == set()
    assert found.skipped[tracing.UNDECRYPTABLE] <= damaged_rows
