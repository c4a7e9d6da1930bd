"""Data-subject requests: a person's export, and the withdrawal of their consent.

A person's check-ins are found by their per-day pseudonym for every day whose key
is still alive, their case records and notifications by their person index.
Withdrawal erases the enrollment and risk status, records the erasure (the
CheckIn servers then refuse their tokens), unlinks their check-ins (random
pseudonym, empty ciphertext) and cancels queued messages, in one transaction.
Case records kept for an investigation stay until their class expires (the
CASE_RECORDS policy). An export lists a denied scan once, as a denial with its
decision id (never also as a check-in), and one case record per scan; withdrawal
reports the same count of case records, from the same query.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from typing import Any

import structlog
from stopcovid.common.v1 import common_pb2
from stopcovid.retention.v1 import retention_service_pb2 as pb

from services.domain.exposure import risk
from services.domain.people import enrollment
from services.domain.retention import audit_actions, periods
from services.kernel import audit, errors, keys
from services.kernel.db import Conn
from services.kernel.keys import KeyStore, Sealed
from services.kernel.rpc import Context, timestamp
from services.retention.base import RetentionBase
from services.retention.queries import data_subject as store
from services.retention.queries.data_subject import CaseRecord, Subject, Visit
from services.retention.spans import instant
from services.retention.vocabulary import DIRECTIONS

log = structlog.get_logger()

# Older days hold no check-ins: no policy keeps them longer.
_MAX_CHECKIN_DAYS = periods.CLASSES["check_ins"].max_days


def pseudonyms(
    keystore: KeyStore, person_id: uuid.UUID, today: dt.date
) -> tuple[list[dt.date], list[bytes]]:
    """The person's pseudonym on every UTC day whose key is alive in the key store
    (the longest check-in period back, and tomorrow for clock skew). A destroyed
    or never-made key has no rows to link."""
    days: list[dt.date] = []
    refs: list[bytes] = []
    for back in range(-1, _MAX_CHECKIN_DAYS + 1):
        day = today - dt.timedelta(days=back)
        if not keystore.has_day_key(day):
            continue
        try:
            key = keystore.day_key(day, create=False)
        except keys.KeyError_:
            continue
        days.append(day)
        refs.append(key.pseudonym(person_id.bytes))
    return days, refs


def _check_in(scan: Visit | CaseRecord, case_record: bool) -> pb.ExportedCheckIn:
    return pb.ExportedCheckIn(
        venue_id=str(scan.venue_id),
        venue_display_name=scan.venue_display_name,
        scan_time=timestamp(scan.scan_time),
        direction=DIRECTIONS.number(scan.direction),
        case_record=case_record,
    )


def exported_check_ins(
    visits: Sequence[Visit], records: Sequence[CaseRecord]
) -> list[pb.ExportedCheckIn]:
    """The person's check-ins, oldest first: each admitted scan (marked when a case
    record keeps it), and each case record whose scan has left the store. A denied
    scan is a refusal at the door, not a visit: it is exported as a denial only."""
    admitted = [v for v in visits if v.outcome != "denied"]
    kept = {r.place() for r in records}
    seen = {v.place() for v in admitted}
    found = [(v.scan_time, _check_in(v, v.place() in kept)) for v in admitted]
    found += [(r.scan_time, _check_in(r, True)) for r in records if r.place() not in seen]
    found.sort(key=lambda pair: pair[0])
    return [c for _, c in found]


def exported_denials(visits: Sequence[Visit]) -> list[pb.ExportedDenial]:
    """The person's refusals at the door, oldest first, each with the decision id to
    appeal with."""
    denied = sorted((v for v in visits if v.outcome == "denied"), key=lambda v: v.scan_time)
    return [
        pb.ExportedDenial(
            decision_id=str(v.decision_id or ""),
            decision_time=timestamp(v.scan_time),
            venue_id=str(v.venue_id),
        )
        for v in denied
    ]


def _enrollment(person: Any, phone: str) -> pb.ExportedEnrollment:
    return pb.ExportedEnrollment(
        person_id=str(person["person_id"]),
        phone_number=phone,
        enroll_time=timestamp(person["enroll_time"]),
        consent_text_version=person["consent_text_version"],
        consent_time=timestamp(person["consent_time"]),
        language_code=person["language_code"],
        last_activity_time=instant(person.get("last_activity_time")),
    )


async def _audit(
    conn: Conn, action: str, selector: common_pb2.PersonSelector, **counts: int
) -> None:
    """A request about a person, audited by the kind of selector and counts: never
    who the person is."""
    details = {"selector": selector.WhichOneof("selector") or "", **counts}
    await audit.record(conn, action, "people", "", details)


class DataSubjectRpcs(RetentionBase):
    async def _subject(
        self, conn: Conn, selector: common_pb2.PersonSelector
    ) -> tuple[Any, Subject]:
        """The people row the selector names (NOT_FOUND, INVALID_ARGUMENT as
        enrollment.find says) and how their rows are found."""
        person = await enrollment.find(
            conn,
            selector,
            blind_key=self._keystore.blind_index_key(),
            tokens=self._tokens,
            audit_pool=self._pool,
        )
        person_id: uuid.UUID = person["person_id"]
        today = dt.datetime.now(dt.UTC).date()
        days, refs = pseudonyms(self._keystore, person_id, today)
        return person, Subject(person_id, self._keystore.person_index(person_id.bytes), days, refs)

    async def ExportPersonData(
        self, request: pb.ExportPersonDataRequest, context: Context
    ) -> pb.ExportPersonDataResponse:
        async with (
            self._pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            person, subject = await self._subject(conn, request.person)
            found = await store.person_data(conn, subject)
        key = self._keystore.people_key(person["people_key_id"])
        phone = Sealed.PHONE.open(key, subject.person_id, person["phone_enc"]).decode()
        now = dt.datetime.now(dt.UTC)
        reply = pb.ExportPersonDataResponse(
            enrollment=_enrollment(person, phone),
            check_ins=exported_check_ins(found.visits, found.case_records),
            risk_status=risk.status_to_proto(found.risk_status, now),
            denials=exported_denials(found.visits),
            notifications=[
                pb.ExportedNotification(
                    notification_id=str(n.notification_id),
                    risk_level=risk.LEVELS[n.risk_level],
                    send_time=timestamp(n.send_time),
                )
                for n in found.notifications
            ],
            data_accesses=[
                pb.ExportedDataAccess(
                    grant_id=str(a.grant_id),
                    outbreak_reference=a.outbreak_reference,
                    action=audit_actions.START_TRACE,
                    access_time=timestamp(a.access_time),
                )
                for a in found.data_accesses
            ],
            export_time=timestamp(now),
        )
        # Audited in a transaction of its own: the export's was read-only.
        async with self._pool.acquire() as conn:
            await _audit(
                conn,
                audit_actions.EXPORT_PERSON_DATA,
                request.person,
                check_ins=len(reply.check_ins),
                denials=len(reply.denials),
                notifications=len(reply.notifications),
                data_accesses=len(reply.data_accesses),
            )
        return reply

    async def WithdrawConsent(
        self, request: pb.WithdrawConsentRequest, context: Context
    ) -> pb.WithdrawConsentResponse:
        async with self._pool.acquire() as conn, conn.transaction():
            _, subject = await self._subject(conn, request.person)
            erased = await store.erase(conn, subject)
            if erased is None:
                raise errors.NotFound("no enrolled person matches", metadata={"resource": "person"})
            # Counted as ExportPersonData lists them: the same query.
            kept = await store.case_records(conn, subject.person_index)
            await _audit(
                conn,
                audit_actions.WITHDRAW_CONSENT,
                request.person,
                unlinked_check_ins=erased.unlinked_check_ins,
                cancelled_notifications=erased.cancelled_notifications,
                retained_case_records=len(kept),
            )
        log.info(
            "consent_withdrawn", unlinked_check_ins=erased.unlinked_check_ins, retained=len(kept)
        )
        retained_until = max((r.retained_until for r in kept), default=None)
        return pb.WithdrawConsentResponse(
            withdraw_time=timestamp(erased.erase_time or dt.datetime.now(dt.UTC)),
            unlinked_check_in_count=erased.unlinked_check_ins,
            retained_case_record_count=len(kept),
            retained_until_time=instant(retained_until),
        )
