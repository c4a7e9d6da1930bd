"""The core of a trace: a case's visits, and who overlapped with them.

Two statements do the database work, whatever the store's size:

1. the case's scans, by (day, pseudonym) pairs: the case's person id is
   pseudonymised with each day key of the window, and each pair probes one day
   partition's `person_ref` index;
2. everyone's scans at each visit's venue around the visit, one range of the
   `(venue_id, scan_time)` index per visit.

Stays are built in Python from those few rows: an entry is closed by the same
person's next exit at the venue within `max_stay`, otherwise it lasts the venue's
default stay (and the end is marked estimated). A contact's pseudonym is per day,
so a stay that crosses 00:00 UTC (07:00 in Cambodia) is seen as two stays.

These functions decrypt personal data (the contacts' person ids). Callers check the
access grant first and audit what was decrypted (workers/traces.py).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.core.config import Settings
from services.core.db import Conn, load_queries
from services.core.keys import KeyDestroyed, KeyError_, KeyStore, row_aad

Q = load_queries(Path(__file__).with_name("tracing.sql"))

LOW, MEDIUM, HIGH = 2, 3, 4  # stopcovid.common.v1.RiskLevel numbers
_UTC = dt.UTC


@dataclass(frozen=True)
class RiskRules:
    """How an overlap becomes a risk level (configurable, see Settings)."""

    high_overlap: dt.timedelta = dt.timedelta(minutes=15)
    after_case: dt.timedelta = dt.timedelta(minutes=30)
    max_stay: dt.timedelta = dt.timedelta(hours=12)

    @classmethod
    def from_settings(cls, settings: Settings) -> RiskRules:
        return cls(
            high_overlap=dt.timedelta(minutes=settings.risk_high_overlap_min),
            after_case=dt.timedelta(minutes=settings.risk_after_case_min),
            max_stay=dt.timedelta(hours=settings.trace_max_stay_h),
        )

    def level(self, setting: str, overlap: dt.timedelta, gap: dt.timedelta) -> tuple[int, str]:
        """(level, rule in words) for one overlap; level 0 means no risk.

        `overlap` is how long the stays overlapped; `gap`, when they did not, how long
        after the case left the contact arrived (negative: the contact left before)."""
        minutes = _minutes(self.high_overlap)
        if overlap > dt.timedelta(0):
            long = overlap >= self.high_overlap
            if setting == "indoor":
                if long:
                    return HIGH, f"indoor overlap of {minutes} minutes or more"
                return MEDIUM, f"indoor overlap under {minutes} minutes"
            if long:
                return MEDIUM, f"outdoor overlap of {minutes} minutes or more"
            return LOW, f"outdoor overlap under {minutes} minutes"
        if setting == "indoor" and dt.timedelta(0) <= gap <= self.after_case:
            after = _minutes(self.after_case)
            return LOW, f"indoor arrival within {after} minutes after a case left"
        return 0, ""


def _minutes(delta: dt.timedelta) -> int:
    return int(delta.total_seconds() // 60)


@dataclass(frozen=True)
class Scan:
    day: dt.date
    venue_id: uuid.UUID
    device_id: uuid.UUID | None
    sequence: int | None
    scan_time: dt.datetime
    direction: str
    person_ref: bytes
    person_enc: bytes


@dataclass(frozen=True)
class Venue:
    venue_id: uuid.UUID
    display_name: str
    setting: str
    default_stay: dt.timedelta


@dataclass(frozen=True)
class Stay:
    """One person's time at one venue: entry to exit, or to the default stay."""

    venue_id: uuid.UUID
    setting: str
    venue_name: str
    start: dt.datetime
    end: dt.datetime
    end_estimated: bool
    scans: tuple[Scan, ...]


@dataclass(frozen=True)
class Overlap:
    """One contact stay against one case visit, with the level it gives."""

    person_id: uuid.UUID
    case_visit: Stay
    contact_stay: Stay
    overlap: dt.timedelta
    level: int
    rule: str

    @property
    def exposure_time(self) -> dt.datetime:
        """When the exposure began: the overlap's start, or the arrival after the case."""
        return max(self.case_visit.start, self.contact_stay.start)


def _scan(row: Any) -> Scan:
    return Scan(
        row["day"],
        row["venue_id"],
        row["device_id"],
        row["sequence"],
        row["scan_time"],
        row["direction"],
        bytes(row["person_ref"]),
        bytes(row["person_enc"]),
    )


def window_days(start: dt.datetime, end: dt.datetime) -> list[dt.date]:
    """The UTC days (partitions, day keys) that scans in [start, end) can fall on."""
    first = start.astimezone(_UTC).date()
    last = (end - dt.timedelta(microseconds=1)).astimezone(_UTC).date()
    return [first + dt.timedelta(days=i) for i in range((last - first).days + 1)]


def pair_stays(scans: Iterable[Scan], venue: Venue, max_stay: dt.timedelta) -> list[Stay]:
    """Stays from one person's scans at one venue, in time order."""
    stays: list[Stay] = []
    entry: Scan | None = None

    def close_estimated(before: dt.datetime | None) -> None:
        assert entry is not None
        end = entry.scan_time + venue.default_stay
        if before is not None and before < end:
            end = before
        stays.append(
            Stay(venue.venue_id, venue.setting, venue.display_name, entry.scan_time, end, True,
                 (entry,))
        )  # fmt: skip

    for scan in sorted(scans, key=lambda s: s.scan_time):
        if scan.direction == "entry":
            if entry is not None:
                close_estimated(scan.scan_time)
            entry = scan
        elif entry is not None and scan.scan_time - entry.scan_time <= max_stay:
            stays.append(
                Stay(venue.venue_id, venue.setting, venue.display_name, entry.scan_time,
                     scan.scan_time, False, (entry, scan))
            )  # fmt: skip
            entry = None
    if entry is not None:
        close_estimated(None)
    return stays


async def _venues(conn: Conn, ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, Venue]:
    rows = await conn.fetch(Q["venues"], list(set(ids)))
    return {
        r["venue_id"]: Venue(r["venue_id"], r["display_name"], r["setting"], r["default_stay"])
        for r in rows
    }


def _day_pseudonyms(
    keystore: KeyStore, person: uuid.UUID, days: Sequence[dt.date]
) -> tuple[list[dt.date], list[bytes]]:
    """(days, pseudonyms) of a person for the days whose key still exists."""
    found_days: list[dt.date] = []
    refs: list[bytes] = []
    for day in days:
        try:
            key = keystore.day_key(day, create=False)
        except (KeyDestroyed, KeyError_):
            continue  # expired or never written: nothing of that day can be found
        found_days.append(day)
        refs.append(key.pseudonym(person.bytes))
    return found_days, refs


async def find_visits(
    conn: Conn,
    keystore: KeyStore,
    person_id: uuid.UUID,
    start: dt.datetime,
    end: dt.datetime,
    *,
    rules: RiskRules | None = None,
) -> list[Stay]:
    """The case's admitted stays overlapping [start, end), oldest first."""
    rules = rules or RiskRules()
    lo = start - rules.max_stay
    days, refs = _day_pseudonyms(keystore, person_id, window_days(lo, end))
    if not days:
        return []
    scans = [_scan(r) for r in await conn.fetch(Q["case_scans"], days, refs, lo, end)]
    venues = await _venues(conn, (s.venue_id for s in scans))
    by_venue: dict[uuid.UUID, list[Scan]] = defaultdict(list)
    for scan in scans:
        by_venue[scan.venue_id].append(scan)
    visits = [
        stay
        for venue_id, venue_scans in by_venue.items()
        for stay in pair_stays(venue_scans, venues[venue_id], rules.max_stay)
        if stay.end > start and stay.start < end
    ]
    return sorted(visits, key=lambda v: (v.start, str(v.venue_id)))


async def find_overlaps(
    conn: Conn,
    keystore: KeyStore,
    visits: Sequence[Stay],
    case_person: uuid.UUID,
    rules: RiskRules | None = None,
) -> list[Overlap]:
    """Everyone whose stay at a visit's venue overlapped it, or who arrived soon
    after the case left, with the level each overlap gives. One statement."""
    rules = rules or RiskRules()
    if not visits:
        return []
    columns: tuple[list[Any], ...] = ([], [], [], [], [], [])
    for number, visit in enumerate(visits):
        lo = visit.start - rules.max_stay
        hi = visit.end + rules.after_case + rules.max_stay
        days = window_days(lo, hi)
        for column, value in zip(
            columns, (number, visit.venue_id, lo, hi, days[0], days[-1]), strict=True
        ):
            column.append(value)
    rows = await conn.fetch(Q["scans_near"], *columns)
    venues = await _venues(conn, (v.venue_id for v in visits))

    # The case's own pseudonyms, so the case is never its own contact.
    all_days = sorted({r["day"] for r in rows})
    days, refs = _day_pseudonyms(keystore, case_person, all_days)
    own = set(zip(days, refs, strict=True))

    near: dict[int, dict[tuple[dt.date, bytes], list[Scan]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for row in rows:
        scan = _scan(row)
        if (scan.day, scan.person_ref) not in own:
            near[row["visit"]][(scan.day, scan.person_ref)].append(scan)

    people: dict[tuple[dt.date, bytes], uuid.UUID] = {}
    found: list[Overlap] = []
    for number, visit in enumerate(visits):
        venue = venues[visit.venue_id]
        for who, scans in near[number].items():
            for stay in pair_stays(scans, venue, rules.max_stay):
                overlap = min(visit.end, stay.end) - max(visit.start, stay.start)
                level, rule = rules.level(visit.setting, overlap, stay.start - visit.end)
                if not level:
                    continue
                person = people.get(who)
                if person is None:
                    person = people[who] = _decrypt_person(keystore, stay.scans[0])
                found.append(
                    Overlap(person, visit, stay, max(overlap, dt.timedelta(0)), level, rule)
                )
    return found


def _decrypt_person(keystore: KeyStore, scan: Scan) -> uuid.UUID:
    key = keystore.day_key(scan.day, create=False)
    aad = row_aad(
        scan.venue_id.bytes,
        scan.device_id.bytes if scan.device_id else None,
        scan.sequence,
        scan.day,
    )
    return uuid.UUID(bytes=key.decrypt(scan.person_enc, aad))


async def straightforward_overlaps(
    conn: Conn,
    keystore: KeyStore,
    person_id: uuid.UUID,
    start: dt.datetime,
    end: dt.datetime,
    *,
    rules: RiskRules | None = None,
) -> list[tuple[uuid.UUID, uuid.UUID, dt.datetime, dt.datetime]]:
    """The same search as one overlap query over the whole store (the benchmark's
    baseline): (contact, venue, contact stay start, end) per overlap found."""
    rules = rules or RiskRules()
    lo = start - rules.max_stay
    days, refs = _day_pseudonyms(keystore, person_id, window_days(lo, end))
    rows = await conn.fetch(
        Q["straightforward_overlaps"], days, refs, start, end, rules.max_stay, rules.after_case
    )
    found = []
    for r in rows:
        overlap = min(r["case_end"], r["contact_end"]) - max(r["case_start"], r["contact_start"])
        level, _ = rules.level(r["setting"], overlap, r["contact_start"] - r["case_end"])
        if not level:
            continue
        scan = Scan(
            r["day"], r["venue_id"], r["device_id"], r["sequence"], r["contact_start"], "entry",
            b"", bytes(r["person_enc"]),
        )  # fmt: skip
        found.append(
            (_decrypt_person(keystore, scan), r["venue_id"], r["contact_start"], r["contact_end"])
        )
    return found
