"""Synthetic check-ins written straight into the store, for trace benchmarks and
tests. Synthetic data only: random ids, no phone numbers.

Rows are exactly what the ingest workers write (day partition, day pseudonym,
person id encrypted under the day key bound to its row), so a trace reads and
decrypts them as it would real ones. Daytime scans fall between 01:00 and 15:00
UTC (08:00-22:00 in Cambodia), so their stays stay within one day. Night visits
(`night_share`) begin between 22:00 and 24:00 UTC (05:00-07:00 in Cambodia);
those whose exit falls after midnight, under the next day's pseudonym, are
remembered in `Synth.crossing` as ground truth for the trace's linking.
"""

from __future__ import annotations

import datetime as dt
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import asyncpg

# A store row has the inbox row's columns: ingest moves rows as they are.
from services.domain.checkins.inbox import COLUMNS
from services.kernel.keys import KeyStore, row_aad

_OPEN_S = 3600  # 01:00 UTC
_CLOSE_S = 15 * 3600  # 15:00 UTC
_NIGHT_S = 22 * 3600  # 22:00 UTC
_DAY_S = 24 * 3600


@dataclass(frozen=True)
class SynthVenue:
    venue_id: uuid.UUID
    device_id: uuid.UUID
    setting: str
    default_stay: dt.timedelta


@dataclass(frozen=True)
class Visit:
    """One stay to write: an entry scan, and an exit scan unless `exit` is None."""

    person: uuid.UUID
    venue: SynthVenue
    entry: dt.datetime
    exit: dt.datetime | None


@dataclass
class Synth:
    """A synthetic population and its venues; `write` stores visits."""

    rng: random.Random
    venues: list[SynthVenue] = field(default_factory=list)
    _sequences: dict[uuid.UUID, int] = field(default_factory=dict)
    crossing: dict[uuid.UUID, list[Visit]] = field(default_factory=dict)
    """Per venue, the visits made whose exit fell on the day after their entry."""

    @classmethod
    def create(cls, seed: int, venue_count: int, outdoor_share: float = 0.2) -> Synth:
        rng = random.Random(seed)  # noqa: S311 - reproducible synthetic data, not secrets
        synth = cls(rng)
        for _ in range(venue_count):
            synth.venues.append(
                SynthVenue(
                    uuid.UUID(int=rng.getrandbits(128), version=4),
                    uuid.UUID(int=rng.getrandbits(128), version=4),
                    "outdoor" if rng.random() < outdoor_share else "indoor",
                    dt.timedelta(minutes=rng.choice((30, 60, 60, 120))),
                )
            )
        return synth

    def person(self) -> uuid.UUID:
        return uuid.UUID(int=self.rng.getrandbits(128), version=4)

    def random_visit(
        self, person: uuid.UUID, day: dt.date, exit_share: float = 0.5, night: bool = False
    ) -> Visit:
        rng = self.rng
        venue = self.venues[rng.randrange(len(self.venues))]
        if night:
            start = rng.randrange(_NIGHT_S, _DAY_S)
        else:
            start = rng.randrange(_OPEN_S, _CLOSE_S - 4 * 3600)
        entry = _at(day, start)
        leave = None
        if rng.random() < exit_share:
            leave = entry + dt.timedelta(minutes=rng.randrange(5, 180))
        visit = Visit(person, venue, entry, leave)
        if leave is not None and leave.date() != entry.date():
            self.crossing.setdefault(venue.venue_id, []).append(visit)
        return visit

    def background(
        self,
        days: list[dt.date],
        rows: int,
        people: int,
        exit_share: float = 0.5,
        night_share: float = 0.0,
    ) -> Iterator[list[Visit]]:
        """About `rows` scans of `people` random people spread over `days`, one list
        of visits per day, `night_share` of them at night."""
        population = [self.person() for _ in range(people)]
        per_day = rows / len(days) / (1 + exit_share)
        for day in days:
            yield [
                self.random_visit(
                    population[self.rng.randrange(people)],
                    day,
                    exit_share,
                    night=self.rng.random() < night_share,
                )
                for _ in range(round(per_day))
            ]

    def scan_row(
        self, keystore: KeyStore, person: uuid.UUID, venue: SynthVenue, when: dt.datetime,
        direction: str,
    ) -> tuple[object, ...]:  # fmt: skip
        """One store row (COLUMNS), as ingest writes it: the next sequence number of
        the venue's device, the day's pseudonym and the person id sealed to the row."""
        day = when.astimezone(dt.UTC).date()
        key = keystore.day_key(day)
        sequence = self._sequences.get(venue.device_id, 0) + 1
        self._sequences[venue.device_id] = sequence
        aad = row_aad(venue.venue_id.bytes, venue.device_id.bytes, sequence, day)
        return (
            day,
            venue.venue_id,
            venue.device_id,
            sequence,
            when,
            direction,
            "admitted",
            None,
            key.key_id,
            key.pseudonym(person.bytes),
            key.encrypt(person.bytes, aad),
            when,
        )

    def records(self, keystore: KeyStore, visits: list[Visit]) -> list[tuple[object, ...]]:
        """Store rows for `visits`, as ingest writes them."""
        rows: list[tuple[object, ...]] = []
        for visit in visits:
            rows.append(self.scan_row(keystore, visit.person, visit.venue, visit.entry, "entry"))
            if visit.exit is not None:
                rows.append(self.scan_row(keystore, visit.person, visit.venue, visit.exit, "exit"))
        return rows

    async def write_venues(self, conn: asyncpg.Connection) -> None:
        await conn.executemany(
            "INSERT INTO venues (venue_id, display_name, setting, region_code, default_stay,"
            " created_by) VALUES ($1, $2, $3, 'KH-12', $4, 'synthetic')",
            [
                (v.venue_id, f"Synthetic venue {i + 1}", v.setting, v.default_stay)
                for i, v in enumerate(self.venues)
            ],
        )

    async def write(self, conn: asyncpg.Connection, keystore: KeyStore, visits: list[Visit]) -> int:
        """Store `visits` (partitions and day keys made as needed); rows written."""
        return await write_rows(conn, keystore, self.records(keystore, visits))


async def write_rows(
    conn: asyncpg.Connection, keystore: KeyStore, rows: list[tuple[object, ...]]
) -> int:
    """Store rows (COLUMNS), making their days' partitions and day keys as needed."""
    days: set[dt.date] = {r[0] for r in rows}  # type: ignore[misc]
    for day in sorted(days):
        await conn.execute("SELECT ensure_checkin_partition($1)", day)
        await conn.execute(
            "INSERT INTO day_keys (day, key_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            day,
            keystore.day_key(day).key_id,
        )
    await conn.copy_records_to_table("checkins", records=rows, columns=COLUMNS)
    return len(rows)


def _at(day: dt.date, seconds: int) -> dt.datetime:
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC) + dt.timedelta(seconds=seconds)


def case_visits(
    synth: Synth,
    person: uuid.UUID,
    days: list[dt.date],
    count: int,
    exit_share: float = 0.5,
    *,
    night_share: float = 0.0,
) -> list[Visit]:
    """`count` visits of one person spread evenly over `days`, never overlapping;
    `night_share` of them late in the UTC day (22:30-23:20, out before midnight
    when an exit is scanned), where other people's stays cross midnight."""
    visits = []
    per_day = -(-count // len(days))
    slot = (_CLOSE_S - _OPEN_S - 4 * 3600) // per_day
    for i in range(count):
        day = days[i % len(days)]
        night = synth.rng.random() < night_share
        if night:
            start = _NIGHT_S + 1800 + synth.rng.randrange(0, 3000)
        else:
            start = _OPEN_S + (i // len(days)) * slot + synth.rng.randrange(0, max(1, slot - 3600))
        venue = synth.venues[synth.rng.randrange(len(synth.venues))]
        entry = _at(day, start)
        leave = None
        if synth.rng.random() < exit_share:
            leave = entry + dt.timedelta(minutes=synth.rng.randrange(10, 35 if night else 50))
        visits.append(Visit(person, venue, entry, leave))
    return visits
