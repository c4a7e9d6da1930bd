"""The core of a trace: a case's visits, and who overlapped with them.

Two statements do the database work, whatever the store's size:

1. the case's scans, by (day, pseudonym) pairs, with their venues: the case's
   person id is pseudonymised with each day key of the window, and each pair
   probes one day partition's `person_ref` index;
2. everyone's scans at each visit's venue around the visit, one range of the
   `(venue_id, scan_time)` index per visit.

Stays are built in Python from those few rows (`pair_stays`), from one person's
scans at one venue in time order:

- an entry opens a stay; another entry right after it (no exit between), less
  than the venue's default stay later, repeats it (a second scan at the door):
  the stay goes on from its first entry;
- an exit at most `max_stay` after the stay's latest entry ends it;
- otherwise the stay ends the default stay after its latest entry (or at the
  person's next entry, if sooner) and its end is marked estimated; an exit
  with no open stay is ignored.

A case's scans are all one person's. A contact's rows carry a pseudonym per UTC
day, so a stay across 00:00 UTC (07:00 in Cambodia) has its entry under one
day's pseudonym and its exit under the next. Such a boundary is linked through
the person id (`person_enc`, under each row's day key): the two rows are
decrypted only when joining them could change what the trace reports for the
visit, and joined when they name the same person.

Rows that can be nobody's are skipped and counted by reason, never fatal:
unlinked by a withdrawal of consent (empty ciphertext), under a day key that is
gone, or with a ciphertext that does not decrypt (the person's other rows are
used when one does).

These functions decrypt personal data (the contacts' person ids). Callers check the
access grant first and audit what was decrypted (trace_job.py).
"""

from __future__ import annotations

import datetime as dt
import uuid
from bisect import bisect_left, bisect_right
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag

from services.domain.checkins.inbox import ScanEvent
from services.kernel.config import Settings
from services.kernel.db import Conn, load_queries
from services.kernel.keys import DayKey, KeyDestroyed, KeyError_, KeyStore, row_aad

Q = load_queries(Path(__file__).with_name("tracing.sql"))

LOW, MEDIUM, HIGH = 2, 3, 4  # stopcovid.common.v1.RiskLevel numbers
_UTC = dt.UTC

# Why a row of the store was left out (traces.skipped_rows keys; the Exposure
# service maps them to stopcovid.exposure.v1.TraceSkipReason).
WITHDRAWN = "withdrawn"
KEY_DESTROYED = "key_destroyed"
UNDECRYPTABLE = "undecryptable"
SKIP_REASONS = (WITHDRAWN, KEY_DESTROYED, UNDECRYPTABLE)

# The steps of a trace run (trace_job.py), named when one fails
# (traces.failure_step; stopcovid.exposure.v1.TraceStep).
FIND_VISITS = "find_visits"
FIND_CONTACTS = "find_contacts"
BUILD_RESULTS = "build_results"
STORE_RESULTS = "store_results"
STEPS = (FIND_VISITS, FIND_CONTACTS, BUILD_RESULTS, STORE_RESULTS)


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

    def assess(self, visit: Stay, stay: Stay) -> tuple[int, str, dt.timedelta]:
        """(level, rule, overlap) of a contact's stay against a case's visit."""
        overlap = min(visit.end, stay.end) - max(visit.start, stay.start)
        level, rule = self.level(visit.setting, overlap, stay.start - visit.end)
        return level, rule, max(overlap, dt.timedelta(0))


def _minutes(delta: dt.timedelta) -> int:
    return int(delta.total_seconds() // 60)


RowId = tuple[dt.date, uuid.UUID, uuid.UUID | None, int | None, dt.datetime, str]
"""A store row without its person columns: what a skipped row is counted by."""


@dataclass(frozen=True)
class Scan(ScanEvent):
    """A stored scan as a trace reads it: the event and its person columns."""

    person_ref: bytes
    person_enc: bytes

    @property
    def row(self) -> RowId:
        return (self.day, self.venue_id, self.device_id, self.sequence, self.scan_time,
                self.direction)  # fmt: skip


def _order(scan: Scan) -> tuple[dt.datetime, str]:
    """Time order; an entry before an exit at the same instant."""
    return scan.scan_time, scan.direction


@dataclass(frozen=True)
class Venue:
    venue_id: uuid.UUID
    display_name: str
    setting: str
    default_stay: dt.timedelta


@dataclass(frozen=True)
class Stay:
    """One person's time at one venue: first entry to exit, or to the default stay."""

    venue: Venue
    start: dt.datetime
    end: dt.datetime
    end_estimated: bool
    scans: tuple[Scan, ...]

    @property
    def venue_id(self) -> uuid.UUID:
        return self.venue.venue_id

    @property
    def setting(self) -> str:
        return self.venue.setting

    @property
    def venue_name(self) -> str:
        return self.venue.display_name

    @property
    def days(self) -> int:
        """How many UTC days (pseudonyms) its scans come from: 2 when linked across 00:00."""
        return len({s.day for s in self.scans})


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


@dataclass
class Found:
    """What a search of visits found: the overlaps, the rows it skipped by reason
    (as row ids, so that searches of several chunks count a row once), how many
    rows it decrypted, and how many day boundaries it linked."""

    overlaps: list[Overlap] = field(default_factory=list)
    skipped: dict[str, set[RowId]] = field(
        default_factory=lambda: {reason: set() for reason in SKIP_REASONS}
    )
    rows_decrypted: int = 0
    links: int = 0

    def skipped_counts(self) -> dict[str, int]:
        return {reason: len(rows) for reason, rows in self.skipped.items()}


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
    """Stays from one person's scans at one venue, in time order (the rules are in
    the module's docstring)."""
    stays: list[Stay] = []
    used: list[Scan] = []  # the open stay's scans; empty when none is open
    previous: Scan | None = None

    def close(end: dt.datetime, estimated: bool) -> None:
        stays.append(Stay(venue, used[0].scan_time, end, estimated, tuple(used)))
        used.clear()

    for scan in sorted(scans, key=_order):
        if scan.direction == "entry":
            latest = used[-1] if used else None
            if (
                latest is not None
                and previous is latest
                and scan.scan_time < latest.scan_time + venue.default_stay
            ):
                used.append(scan)  # a repeated entry: the same stay
                previous = scan
                continue
            if latest is not None:
                close(min(latest.scan_time + venue.default_stay, scan.scan_time), True)
            used.append(scan)
        elif used and scan.scan_time - used[-1].scan_time <= max_stay:
            used.append(scan)
            close(scan.scan_time, False)
        previous = scan
    if used:
        close(used[-1].scan_time + venue.default_stay, True)
    return stays


def _venue(row: Any) -> Venue:
    return Venue(row["venue_id"], row["display_name"], row["setting"], row["default_stay"])


def _day_keys(keystore: KeyStore, days: Iterable[dt.date]) -> dict[dt.date, DayKey]:
    """The keys of `days` that still exist (expired or never written: absent)."""
    found: dict[dt.date, DayKey] = {}
    for day in sorted(set(days)):
        try:
            found[day] = keystore.day_key(day, create=False)
        except (KeyDestroyed, KeyError_):
            continue
    return found


@dataclass(frozen=True)
class CaseSearch:
    """Whose visits to look for, in which window, under which rules: what the
    trace's search and its straightforward baseline both take."""

    person_id: uuid.UUID
    start: dt.datetime
    end: dt.datetime
    rules: RiskRules = field(default_factory=RiskRules)

    @property
    def lo(self) -> dt.datetime:
        """A stay that began up to the longest stay before the window may overlap it."""
        return self.start - self.rules.max_stay

    def pseudonyms(self, keystore: KeyStore) -> tuple[list[dt.date], list[bytes]]:
        """(days, pseudonyms) of the case's person on the UTC days of [lo, end)
        whose key still exists: what both searches probe the person_ref index with."""
        keys = _day_keys(keystore, window_days(self.lo, self.end))
        return list(keys), [key.pseudonym(self.person_id.bytes) for key in keys.values()]


async def find_visits(conn: Conn, keystore: KeyStore, search: CaseSearch) -> list[Stay]:
    """The case's admitted stays overlapping [start, end), oldest first."""
    rules, start, end = search.rules, search.start, search.end
    days, refs = search.pseudonyms(keystore)
    if not days:
        return []
    rows = await conn.fetch(Q["case_scans"], days, refs, search.lo, end)
    venues: dict[uuid.UUID, Venue] = {}
    by_venue: dict[uuid.UUID, list[Scan]] = defaultdict(list)
    for row in rows:
        venues.setdefault(row["venue_id"], _venue(row))
        by_venue[row["venue_id"]].append(_scan(row))
    visits = [
        stay
        for venue_id, venue_scans in by_venue.items()
        for stay in pair_stays(venue_scans, venues[venue_id], rules.max_stay)
        if stay.end > start and stay.start < end
    ]
    return sorted(visits, key=lambda v: (v.start, str(v.venue_id)))


Group = tuple[dt.date, bytes]
"""One person's rows of one UTC day: (day, pseudonym)."""


class _People:
    """Person ids of rows, each row decrypted at most once, each failure counted."""

    def __init__(self, keys: dict[dt.date, DayKey], found: Found) -> None:
        self._keys = keys
        self._found = found
        self._rows: dict[RowId, uuid.UUID | None] = {}
        self._groups: dict[Group, uuid.UUID] = {}

    def _row(self, scan: Scan) -> uuid.UUID | None:
        if scan.row in self._rows:
            return self._rows[scan.row]
        device = scan.device_id.bytes if scan.device_id else None
        aad = row_aad(scan.venue_id.bytes, device, scan.sequence, scan.day)
        person: uuid.UUID | None
        try:
            person = uuid.UUID(bytes=self._keys[scan.day].decrypt(scan.person_enc, aad))
        except (InvalidTag, ValueError):  # corrupt, truncated, or moved from another row
            person = None
            self._found.skipped[UNDECRYPTABLE].add(scan.row)
        self._found.rows_decrypted += 1
        self._rows[scan.row] = person
        return person

    def of(self, groups: Sequence[Group], scans: Iterable[Scan]) -> uuid.UUID | None:
        """The person of `groups` (one person's), from the first of `scans` that
        decrypts; None when none does."""
        for group in groups:
            if group in self._groups:
                return self._groups[group]
        for scan in scans:
            person = self._row(scan)
            if person is not None:
                for group in groups:
                    self._groups[group] = person
                return person
        return None


def _link(
    groups: dict[Group, list[Scan]],
    visit: Stay,
    rules: RiskRules,
    people: _People,
    found: Found,
) -> list[list[Group]]:
    """The groups near one visit, joined into one person's where a stay crosses a
    day boundary: a day's last scan being an entry, and a later day's first scan an
    exit within the maximum stay of it, or an entry within the default stay. Both
    rows are decrypted only when joining the two would change a stay that gives a
    level for `visit`."""
    venue = visit.venue
    parent = {group: group for group in groups}

    def root(group: Group) -> Group:
        while parent[group] != group:
            parent[group] = parent[parent[group]]
            group = parent[group]
        return group

    members: dict[Group, list[Group]] = {group: [group] for group in groups}

    def scans_of(top: Group) -> list[Scan]:
        return [scan for group in members[top] for scan in groups[group]]

    def matters(first: list[Scan], second: list[Scan]) -> bool:
        apart = set(pair_stays(first, venue, rules.max_stay))
        apart |= set(pair_stays(second, venue, rules.max_stay))
        joined = set(pair_stays(first + second, venue, rules.max_stay))
        return any(rules.assess(visit, stay)[0] for stay in apart ^ joined)

    # Each group's first scan, by direction and time: a tail meets only the heads
    # within reach of it (an exit within the maximum stay, an entry within the
    # default stay), however busy the venue.
    heads: dict[str, list[tuple[dt.datetime, Group]]] = {"entry": [], "exit": []}
    for group, group_scans in groups.items():
        heads[group_scans[0].direction].append((group_scans[0].scan_time, group))
    for listed in heads.values():
        listed.sort()
    times = {direction: [t for t, _ in listed] for direction, listed in heads.items()}

    def heads_after(tail: Scan) -> list[tuple[dt.datetime, Group]]:
        after = tail.scan_time
        exits, entries = times["exit"], times["entry"]
        last_exit = bisect_right(exits, after + rules.max_stay)
        last_entry = bisect_left(entries, after + venue.default_stay)
        return [
            *heads["exit"][bisect_right(exits, after) : last_exit],
            *heads["entry"][bisect_right(entries, after) : last_entry],
        ]

    for group in sorted(groups):
        tail = groups[group][-1]
        if tail.direction != "entry":
            continue
        for _, other in heads_after(tail):
            if other[0] <= group[0]:
                continue  # the same day's pseudonym is another person's
            head = groups[other][0]
            a, b = root(group), root(other)
            if a == b or not matters(scans_of(a), scans_of(b)):
                continue
            person = people.of(members[a], [tail, *scans_of(a)])
            if person is None or people.of(members[b], [head, *scans_of(b)]) != person:
                continue
            parent[b] = a
            members[a] += members.pop(b)
            found.links += 1
    return [members[top] for top in members]


async def find_overlaps(
    conn: Conn,
    keystore: KeyStore,
    visits: Sequence[Stay],
    case_person: uuid.UUID,
    rules: RiskRules | None = None,
) -> Found:
    """Everyone whose stay at a visit's venue overlapped it, or who arrived soon
    after the case left, with the level each overlap gives. One statement."""
    rules = rules or RiskRules()
    found = Found()
    if not visits:
        return found
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

    keys = _day_keys(keystore, (r["day"] for r in rows))
    # The case's own pseudonyms, so the case is never its own contact.
    own = {(day, key.pseudonym(case_person.bytes)) for day, key in keys.items()}
    near: dict[int, dict[Group, list[Scan]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        scan = _scan(row)
        if scan.day not in keys:
            found.skipped[KEY_DESTROYED].add(scan.row)
        elif not scan.person_enc:
            found.skipped[WITHDRAWN].add(scan.row)
        elif (scan.day, scan.person_ref) not in own:
            near[row["visit"]][(scan.day, scan.person_ref)].append(scan)

    people = _People(keys, found)
    for number, visit in enumerate(visits):
        groups = {who: sorted(scans, key=_order) for who, scans in near[number].items()}
        for joined in _link(groups, visit, rules, people, found):
            scans = [scan for group in joined for scan in groups[group]]
            for stay in pair_stays(scans, visit.venue, rules.max_stay):
                level, rule, overlap = rules.assess(visit, stay)
                if not level:
                    continue
                person = people.of(joined, [*stay.scans, *scans])
                if person is None:
                    continue  # no row of theirs decrypts: counted as undecryptable
                found.overlaps.append(Overlap(person, visit, stay, overlap, level, rule))
    return found


async def straightforward_overlaps(
    conn: Conn, keystore: KeyStore, search: CaseSearch
) -> list[tuple[uuid.UUID, uuid.UUID, dt.datetime, dt.datetime]]:
    """The same search as one overlap query over the whole store (the benchmark's
    baseline): (contact, venue, contact stay start, end) per overlap found. Being
    SQL over pseudonyms, it cannot link a stay across 00:00 UTC."""
    rules = search.rules
    days, refs = search.pseudonyms(keystore)
    rows = await conn.fetch(
        Q["straightforward_overlaps"],
        days, refs, search.start, search.end, rules.max_stay, rules.after_case,
    )  # fmt: skip
    keys = _day_keys(keystore, (r["day"] for r in rows))
    found = Found()
    people = _People(keys, found)
    out = []
    for r in rows:
        overlap = min(r["case_end"], r["contact_end"]) - max(r["case_start"], r["contact_start"])
        level, _ = rules.level(r["setting"], overlap, r["contact_start"] - r["case_end"])
        if not level or r["day"] not in keys or not r["person_enc"]:
            continue
        scan = Scan(
            r["day"], r["venue_id"], r["device_id"], r["sequence"], r["contact_start"], "entry",
            bytes(r["person_ref"]), bytes(r["person_enc"]),
        )  # fmt: skip
        person = people.of([(scan.day, scan.person_ref)], [scan])
        if person is not None:
            out.append((person, r["venue_id"], r["contact_start"], r["contact_end"]))
    return out
