"""What one trace run writes, built before its final transaction: a record per
row of trace_contacts (records.TraceContactRow, the row the Exposure server lists),
case_records, risk_status and notifications, with every
person id sealed under the case key (services.kernel.keys.Sealed) the way the
Exposure service opens it.

- `Contacts` gathers what the search of every chunk of the case's visits found:
  the overlaps, the rows skipped (by reason, each row once), and the standing of
  the people found (no longer enrolled: nothing is kept about them; confirmed
  cases themselves: listed, but neither raised nor notified).
- `build_results` turns them into `Results`: contacts ordered highest level
  first, the check-ins used as case records (each scan once), and per person the
  overlap that sets their level (the highest, then the longest, then the
  latest) as a risk row and a notification. CPU work: the trace job runs it in a
  thread.

The records' fields are the columns of the set-based inserts of trace_job.sql,
in the order of their `unnest(...) AS u (...)` (tests/test_traces.py checks it).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from services.domain.exposure import risk, tracing
from services.domain.exposure.records import TraceContactRow
from services.kernel.clock import CAMBODIA
from services.kernel.keys import KeyStore, Sealed

CASE, CONTACT = "case", "contact"
"""case_records.subject: whose check-in a case record is."""

LEVEL_NAMES = {tracing.LOW: risk.LOW, tracing.MEDIUM: risk.MEDIUM, tracing.HIGH: risk.HIGH}
"""A trace's level ranks (trace_contacts.level_rank) in the risk vocabulary."""


@dataclass(frozen=True)
class Standing:
    """A person a trace found, now (query contact_standing)."""

    person_id: uuid.UUID
    erased: bool
    """No longer enrolled (withdrew, or the enrollment expired)."""
    confirmed_case: bool


@dataclass(frozen=True)
class CaseRecordRow:
    """case_records: a check-in the trace used, kept under the case key."""

    subject: str
    contact_ref: str
    """Empty for the case's own check-ins."""
    venue_id: uuid.UUID
    scan_time: dt.datetime
    direction: str
    person_index: bytes
    person_enc: bytes
    """Sealed.CASE_RECORD_PERSON, bound to the trace."""


@dataclass(frozen=True)
class RiskRow:
    """risk_status as a contact's exposure raises it (never lowering one)."""

    person_id: uuid.UUID
    level: str
    exposure_time: dt.datetime
    expire_time: dt.datetime
    venue_id: uuid.UUID
    venue_display_name: str
    overlap: dt.timedelta
    rule: str


@dataclass(frozen=True)
class NotificationRow:
    """notifications: the one message a contact gets for the case."""

    notification_id: uuid.UUID
    person_index: bytes
    person_enc: bytes
    """Sealed.NOTIFICATION_PERSON, bound to the notification."""
    contact_ref: str
    risk_level: str
    venue_id: uuid.UUID
    exposure_date: dt.date
    """In Cambodia."""
    person_id: uuid.UUID
    """Joined to people when queued; not stored in the row."""


@dataclass
class Contacts:
    """What the search of every chunk found: the overlaps, the rows skipped (by
    reason, each row once), and the found people's standing."""

    overlaps: list[tracing.Overlap] = field(default_factory=list)
    skipped: dict[str, set[tracing.RowId]] = field(
        default_factory=lambda: {reason: set() for reason in tracing.SKIP_REASONS}
    )
    erased: set[uuid.UUID] = field(default_factory=set)
    """No longer enrolled (withdrew, or the enrollment expired): nothing is kept."""
    confirmed: set[uuid.UUID] = field(default_factory=set)
    """Confirmed cases themselves: listed as contacts, neither raised nor notified."""

    def add(self, found: tracing.Found, standing: Sequence[Standing]) -> None:
        self.overlaps.extend(found.overlaps)
        for reason, rows in found.skipped.items():
            self.skipped[reason] |= rows
        for person in standing:
            if person.erased:
                self.erased.add(person.person_id)
            elif person.confirmed_case:
                self.confirmed.add(person.person_id)

    def skipped_counts(self) -> dict[str, int]:
        return {reason: len(rows) for reason, rows in self.skipped.items()}


@dataclass
class Results:
    """The rows one run writes."""

    contacts: list[TraceContactRow] = field(default_factory=list)
    records: list[CaseRecordRow] = field(default_factory=list)
    risk: list[RiskRow] = field(default_factory=list)
    notifications: list[NotificationRow] = field(default_factory=list)
    level_counts: dict[str, int] = field(default_factory=dict)
    """People raised, by level (risk.RAISED)."""
    erased_contacts: int = 0
    case_contacts: int = 0

    @property
    def people(self) -> int:
        """People raised (and notified)."""
        return len(self.risk)


def contact_ref(case_key: bytes, trace_id: uuid.UUID, person_id: uuid.UUID) -> str:
    """A contact's pseudonym, stable within one trace only (keyed by the case key,
    so it cannot be recomputed once the case is purged)."""
    message = b"contact-ref|" + trace_id.bytes + b"|" + person_id.bytes
    return hmac.new(case_key, message, hashlib.sha256).hexdigest()[:16]


def _best(overlaps: Sequence[tracing.Overlap]) -> dict[uuid.UUID, tracing.Overlap]:
    """Per person, the overlap that sets their level: the highest, then the longest,
    then the latest."""
    best: dict[uuid.UUID, tracing.Overlap] = {}
    for o in overlaps:
        found = best.get(o.person_id)
        if found is None or (o.level, o.overlap, o.exposure_time) > (
            found.level,
            found.overlap,
            found.exposure_time,
        ):
            best[o.person_id] = o
    return best


def build_results(
    keystore: KeyStore,
    visits: Sequence[tracing.Stay],
    contacts: Contacts,
    *,
    case_id: uuid.UUID,
    trace_id: uuid.UUID,
    case_person: uuid.UUID,
    risk_expiry: dt.timedelta,
) -> Results:
    """Every row of a run of trace `trace_id` of case `case_id`, whose person is
    `case_person` (see the module docstring). Erased people are left out;
    confirmed cases are listed but get no risk row, no notification and no count."""
    key = keystore.case_key(case_id)
    out = Results()
    overlaps = [o for o in contacts.overlaps if o.person_id not in contacts.erased]
    out.erased_contacts = len({o.person_id for o in contacts.overlaps} & contacts.erased)
    refs: dict[uuid.UUID, str] = {}
    indexes: dict[uuid.UUID, bytes] = {}

    def ref(person: uuid.UUID) -> str:
        if person not in refs:
            refs[person] = contact_ref(key.key, trace_id, person)
        return refs[person]

    def index(person: uuid.UUID) -> bytes:
        if person not in indexes:
            indexes[person] = keystore.person_index(person.bytes)
        return indexes[person]

    ordered = sorted(
        overlaps,
        key=lambda o: (
            -o.level,
            o.case_visit.start,
            o.contact_stay.start,
            ref(o.person_id),
            str(o.contact_stay.venue_id),
        ),
    )
    for number, o in enumerate(ordered, start=1):
        out.contacts.append(
            TraceContactRow(
                row_number=number,
                contact_ref=ref(o.person_id),
                level_rank=o.level,
                venue_id=o.contact_stay.venue_id,
                case_visit_start=o.case_visit.start,
                case_visit_end=o.case_visit.end,
                contact_stay_start=o.contact_stay.start,
                contact_stay_end=o.contact_stay.end,
                overlap=o.overlap,
                stay_end_estimated=o.case_visit.end_estimated or o.contact_stay.end_estimated,
                rule=o.rule[:200],
                person_index=index(o.person_id),
                person_enc=Sealed.CONTACT_PERSON.seal(key, trace_id, o.person_id.bytes),
            )
        )

    # The check-ins used: all of the case's visits, and each contact's stays that
    # overlapped. A scan used by two overlaps is kept once.
    seen: set[tuple[object, ...]] = set()

    def record(subject: str, person: uuid.UUID, scan: tracing.Scan) -> None:
        ref_value = ref(person) if subject == CONTACT else ""
        identity = (subject, ref_value, scan.day, scan.venue_id, scan.device_id, scan.sequence,
                    scan.scan_time, scan.direction)  # fmt: skip
        if identity in seen:
            return
        seen.add(identity)
        out.records.append(
            CaseRecordRow(
                subject=subject,
                contact_ref=ref_value,
                venue_id=scan.venue_id,
                scan_time=scan.scan_time,
                direction=scan.direction,
                person_index=index(person),
                person_enc=Sealed.CASE_RECORD_PERSON.seal(key, trace_id, person.bytes),
            )
        )

    for visit in visits:
        for scan in visit.scans:
            record(CASE, case_person, scan)
    for o in ordered:
        for scan in o.contact_stay.scans:
            record(CONTACT, o.person_id, scan)

    best = _best(overlaps)
    out.case_contacts = len(best.keys() & contacts.confirmed)
    counts: Counter[str] = Counter()
    for person in sorted(best.keys() - contacts.confirmed, key=lambda p: p.bytes):
        o = best[person]
        level = LEVEL_NAMES[o.level]
        counts[level] += 1
        exposure = o.exposure_time
        out.risk.append(
            RiskRow(
                person_id=person,
                level=level,
                exposure_time=exposure,
                expire_time=exposure + risk_expiry,
                venue_id=o.contact_stay.venue_id,
                venue_display_name=o.contact_stay.venue_name,
                overlap=o.overlap,
                rule=o.rule[:200],
            )
        )
        notification_id = uuid.uuid4()
        out.notifications.append(
            NotificationRow(
                notification_id=notification_id,
                person_index=index(person),
                person_enc=Sealed.NOTIFICATION_PERSON.seal(key, notification_id, person.bytes),
                contact_ref=ref(person),
                risk_level=level,
                venue_id=o.contact_stay.venue_id,
                exposure_date=exposure.astimezone(CAMBODIA).date(),
                person_id=person,
            )
        )
    out.level_counts = {name: counts.get(name, 0) for name in risk.RAISED}
    return out
