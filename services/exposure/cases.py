"""Reporting a case: ReportCase (GetCase and ListCases only read: reads.py).

A case's infectious window runs from 00:00 Cambodia time
`infectious_days_before` days before the symptom onset (or the test, when onset
is unknown) to the report. The case row holds no identity: the person id is
sealed under the case's own key (Sealed.CASE_PERSON), found again by a keyed
index. Reporting sets the person HIGH as a confirmed case in the same
transaction; one person's cases never overlap (AlreadyExists names the other).
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass

import structlog
from stopcovid.exposure.v1 import exposure_service_pb2 as pb

from services.domain.exposure import risk
from services.domain.exposure.records import Case
from services.exposure import convert, queries
from services.exposure.base import ExposureBase
from services.kernel import errors, tenancy, validation
from services.kernel.auth import current_principal
from services.kernel.clock import local_date, local_midnight
from services.kernel.keys import Sealed
from services.kernel.rpc import Context

log = structlog.get_logger()


@dataclass(frozen=True)
class Reported:
    """A case as ReportCase was asked to report it, checked."""

    test_date: dt.date
    onset: dt.date | None
    reference: str
    request_id: uuid.UUID | None
    time: dt.datetime


class CaseRpcs(ExposureBase):
    def infectious_window(
        self, test_date: dt.date, onset: dt.date | None, report: dt.datetime
    ) -> tuple[dt.datetime, dt.datetime]:
        """From 00:00 Cambodia time N days before onset (or the test date) to the report."""
        first = (onset or test_date) - dt.timedelta(days=self._settings.infectious_days_before)
        return local_midnight(first).astimezone(dt.UTC), report

    async def ReportCase(
        self, request: pb.ReportCaseRequest, context: Context
    ) -> pb.ReportCaseResponse:
        report = dt.datetime.now(dt.UTC)
        today = local_date(report)
        asked = request.case
        test_date = convert.calendar_date(asked.test_date, "case.test_date", today, required=True)
        assert test_date is not None
        onset = convert.calendar_date(
            asked.symptom_onset_date, "case.symptom_onset_date", today, required=False
        )
        if onset is not None and onset > test_date:
            # Tested before any symptom: the case is reported without an onset, and
            # its window starts from the test date, the earlier date anyway.
            raise errors.InvalidArgument(
                "case.symptom_onset_date must not be after case.test_date; leave it"
                " empty for a case tested before symptoms began",
                field="case.symptom_onset_date",
            )
        reference = validation.text(
            asked.external_reference, "case.external_reference", min_len=0, max_len=100
        )
        request_id = validation.optional_uuid(request.request_id, "request_id")
        done = None
        if request_id is not None:
            done = await queries.case_by_request(self._pool, tenancy.request_owner(), request_id)
        if done is None:
            done = await self._report(
                await self._person(request.person),
                Reported(test_date, onset, reference, request_id, report),
            )
        return pb.ReportCaseResponse(case=convert.case(done))

    async def _report(self, person_id: uuid.UUID, reported: Reported) -> Case:
        """`person_id`'s case, stored with a key of its own, and the person set HIGH;
        or the case a concurrent call with the same request_id stored."""
        start, end = self.infectious_window(reported.test_date, reported.onset, reported.time)
        person_index = self._keys.person_index(person_id.bytes)
        case_id = uuid.uuid4()
        expire = start + dt.timedelta(days=self._settings.risk_expiry_days)
        created = False
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                await queries.lock_key(conn, f"person|{person_index.hex()}")
                if reported.request_id is not None:
                    done = await queries.case_by_request(
                        conn, tenancy.request_owner(), reported.request_id
                    )
                    if done is not None:  # a retry racing the first call
                        return done
                clash = await queries.overlapping_case(conn, person_index, start, end)
                if clash is not None:
                    raise errors.AlreadyExists(
                        "the person already has a case whose infectious window overlaps",
                        metadata={"case_id": str(clash)},
                    )
                key = self._keys.case_key(case_id, create=True)
                created = True
                case = await queries.insert_case(
                    conn,
                    Case(
                        case_id=case_id,
                        person_index=person_index,
                        person_enc=Sealed.CASE_PERSON.seal(key, case_id, person_id.bytes),
                        external_reference=reported.reference,
                        test_date=reported.test_date,
                        symptom_onset_date=reported.onset,
                        window_start=start,
                        window_end=end,
                        reporter=current_principal().name,
                        request_id=reported.request_id,
                        report_time=reported.time,
                        purge_time=None,
                    ),
                    tenancy.request_owner(),
                )
                raised = await queries.raise_risk_to_case(conn, person_id, start, expire)
                await self._audit(
                    conn,
                    ("case", case_id),
                    {"risk_level": risk.HIGH, "risk_changed": raised},
                    case_id=case_id,
                )
        except BaseException:
            if created:  # the case was never stored: its key must not outlive it
                self._keys.destroy_case_key(case_id)
            raise
        log.info("case_reported", case_id=str(case_id))
        return case
