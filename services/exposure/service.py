"""ExposureService: cases, two-person approved access, traces, risk levels, notifications.

Nobody's contact data is traced or decrypted without an active access grant
(services/domain/exposure/grants.py): an access request for one case, made by one principal
and approved by another (the schema refuses a decider who is the requester, too).
Every change is audited in its own transaction; every refusal of access (no grant,
expired, revoked, another case's grant, self-approval) is audited as denied in a
transaction of its own, since the refused call's transaction rolls back.

Encryption conventions (shared with the workers, services/kernel/keys.py):
- cases.person_enc: the case's person id under the case key, aad b"case|" + case id;
- trace_contacts.person_enc: a contact's person id under the case key, aad
  b"contact|" + trace id.

Calendar dates are in Cambodia time (Asia/Phnom_Penh, UTC+07:00, no DST).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import structlog
from stopcovid.common.v1 import common_pb2
from stopcovid.exposure.v1 import exposure_service_pb2 as pb
from stopcovid.exposure.v1 import exposure_service_pb2_grpc as pb_grpc

from services.domain.exposure import grants, risk, tracing
from services.domain.people import enrollment
from services.domain.people.tokens import PersonalTokens
from services.exposure import export
from services.kernel import audit, errors, keys, pagination, validation
from services.kernel.auth import current_principal
from services.kernel.clock import CAMBODIA
from services.kernel.config import Settings
from services.kernel.db import Conn, load_queries, one
from services.kernel.rpc import Context, timestamp
from services.kernel.rpc import duration as rpc_duration

log = structlog.get_logger()

Q = load_queries(Path(__file__).with_name("queries.sql"))

SERVICE = "stopcovid.exposure.v1.ExposureService"
_DATE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")
# Dates further back than the longest retention name data the platform no longer has.
MAX_DATE_AGE = dt.timedelta(days=90)
MIN_GRANT = dt.timedelta(minutes=1)

_REQUEST_STATES = {
    pb.ACCESS_REQUEST_STATE_PENDING: "pending",
    pb.ACCESS_REQUEST_STATE_APPROVED: "approved",
    pb.ACCESS_REQUEST_STATE_DENIED: "denied",
}
_REQUEST_STATES_BACK = {v: k for k, v in _REQUEST_STATES.items()}
_GRANT_STATES_BACK = {
    grants.ACTIVE: pb.ACCESS_GRANT_STATE_ACTIVE,
    grants.EXPIRED: pb.ACCESS_GRANT_STATE_EXPIRED,
    grants.REVOKED: pb.ACCESS_GRANT_STATE_REVOKED,
}
_TRACE_STATES = {
    pb.TRACE_STATE_QUEUED: "queued",
    pb.TRACE_STATE_RUNNING: "running",
    pb.TRACE_STATE_SUCCEEDED: "succeeded",
    pb.TRACE_STATE_FAILED: "failed",
    pb.TRACE_STATE_CANCELLED: "cancelled",
}
_TRACE_STATES_BACK = {v: k for k, v in _TRACE_STATES.items()}
# traces.skipped_rows keys and traces.failure_step <-> the API (domain/exposure/tracing.py).
SKIP_REASONS = {
    tracing.WITHDRAWN: pb.TRACE_SKIP_REASON_WITHDRAWN,
    tracing.KEY_DESTROYED: pb.TRACE_SKIP_REASON_KEY_DESTROYED,
    tracing.UNDECRYPTABLE: pb.TRACE_SKIP_REASON_UNDECRYPTABLE,
}
TRACE_STEPS = {
    tracing.FIND_VISITS: pb.TRACE_STEP_FIND_VISITS,
    tracing.FIND_CONTACTS: pb.TRACE_STEP_FIND_CONTACTS,
    tracing.BUILD_RESULTS: pb.TRACE_STEP_BUILD_RESULTS,
    tracing.STORE_RESULTS: pb.TRACE_STEP_STORE_RESULTS,
}
_NOTIFICATION_STATES = {
    pb.NOTIFICATION_STATE_QUEUED: "queued",
    pb.NOTIFICATION_STATE_SENT: "sent",
    pb.NOTIFICATION_STATE_FAILED: "failed",
    pb.NOTIFICATION_STATE_CANCELLED: "cancelled",
}
_NOTIFICATION_STATES_BACK = {v: k for k, v in _NOTIFICATION_STATES.items()}


def action(method: str) -> str:
    """The audit action of an RPC: its full method name."""
    return f"{SERVICE}/{method}"


# -- conversions -----------------------------------------------------------------


def _range(start: dt.datetime, end: dt.datetime) -> common_pb2.TimeRange:
    return common_pb2.TimeRange(start_time=timestamp(start), end_time=timestamp(end))


def case_to_proto(row: asyncpg.Record) -> pb.Case:
    onset: dt.date | None = row["symptom_onset_date"]
    return pb.Case(
        case_id=str(row["case_id"]),
        external_reference=row["external_reference"],
        test_date=row["test_date"].isoformat(),
        symptom_onset_date=onset.isoformat() if onset else "",
        infectious_window=_range(row["window_start"], row["window_end"]),
        report_time=timestamp(row["report_time"]),
        reporter=row["reporter"],
    )


def grant_to_proto(row: asyncpg.Record, prefix: str = "") -> pb.AccessGrant:
    """An access_grants row, or the g_-prefixed grant columns of a joined row."""

    def col(name: str) -> Any:
        return row[f"{prefix}{name}"]

    revoke_time = col("revoke_time")
    expire_time = col("expire_time")
    if revoke_time is not None:
        state = pb.ACCESS_GRANT_STATE_REVOKED
    elif dt.datetime.now(dt.UTC) >= expire_time:
        state = pb.ACCESS_GRANT_STATE_EXPIRED
    else:
        state = pb.ACCESS_GRANT_STATE_ACTIVE
    grant = pb.AccessGrant(
        grant_id=str(row["grant_id"]),
        case_id=str(row["case_id"]),
        window=_range(col("window_start"), col("window_end")),
        state=state,
        create_time=timestamp(col("create_time")),
        expire_time=timestamp(expire_time),
        revoker=col("revoker") or "",
        revoke_reason=col("revoke_reason") or "",
    )
    if revoke_time is not None:
        grant.revoke_time.CopyFrom(timestamp(revoke_time))
    return grant


def access_request_to_proto(row: asyncpg.Record) -> pb.AccessRequest:
    """An access_requests row joined with its grant (g_ columns, NULL when none)."""
    request = pb.AccessRequest(
        access_request_id=str(row["access_request_id"]),
        case_id=str(row["case_id"]),
        outbreak_reference=row["outbreak_reference"],
        justification=row["justification"],
        window=_range(row["window_start"], row["window_end"]),
        state=_REQUEST_STATES_BACK[row["state"]],
        requester=row["requester"],
        create_time=timestamp(row["create_time"]),
        decider=row["decider"] or "",
        decision_comment=row["decision_comment"],
    )
    if row["decide_time"] is not None:
        request.decide_time.CopyFrom(timestamp(row["decide_time"]))
    if row["grant_id"] is not None:
        request.grant.CopyFrom(grant_to_proto(row, prefix="g_"))
    return request


_LEVEL_ORDER = ("high", "medium", "low")


def _jsonb(value: Any) -> dict[str, int]:
    found = json.loads(value) if isinstance(value, str) else value
    return dict(found or {})


def trace_to_proto(row: asyncpg.Record) -> pb.Trace:
    counts = _jsonb(row["level_counts"])
    trace = pb.Trace(
        trace_id=str(row["trace_id"]),
        case_id=str(row["case_id"]),
        grant_id=str(row["grant_id"]),
        state=_TRACE_STATES_BACK[row["state"]],
        window=_range(row["window_start"], row["window_end"]),
        starter=row["starter"],
        create_time=timestamp(row["create_time"]),
        visits_found=row["visits_found"],
        visits_searched=row["visits_searched"],
        contacts_found=row["contacts_found"],
        error_message=row["error_message"],
        erased_contacts=row["erased_contacts"],
        case_contacts=row["case_contacts"],
    )
    if row["start_time"] is not None:
        trace.start_time.CopyFrom(timestamp(row["start_time"]))
    if row["end_time"] is not None:
        trace.end_time.CopyFrom(timestamp(row["end_time"]))
    for level in _LEVEL_ORDER:
        people = counts.get(level)
        if people:
            trace.level_counts.append(
                pb.TraceLevelCount(risk_level=risk.LEVELS[level], people=people)
            )
    skipped = _jsonb(row["skipped_rows"])
    for reason, number in SKIP_REASONS.items():
        if skipped.get(reason):
            trace.skipped_rows.append(pb.TraceSkippedRows(reason=number, rows=skipped[reason]))
    if row["state"] == "failed":
        trace.failure.CopyFrom(
            pb.TraceFailure(
                step=TRACE_STEPS.get(row["failure_step"] or "", pb.TRACE_STEP_UNSPECIFIED),
                error_type=row["failure_error"],
            )
        )
    return trace


def contact_to_proto(row: asyncpg.Record, person_id: str = "") -> pb.TraceContact:
    return pb.TraceContact(
        contact_ref=row["contact_ref"],
        venue_id=str(row["venue_id"]),
        case_visit=_range(row["case_visit_start"], row["case_visit_end"]),
        contact_stay=_range(row["contact_stay_start"], row["contact_stay_end"]),
        overlap=rpc_duration(row["overlap"]),
        stay_end_estimated=row["stay_end_estimated"],
        risk_level=row["level_rank"],
        rule=row["rule"],
        person_id=person_id,
    )


def notification_to_proto(row: asyncpg.Record) -> pb.Notification:
    note = pb.Notification(
        notification_id=str(row["notification_id"]),
        trace_id=str(row["trace_id"]),
        contact_ref=row["contact_ref"],
        risk_level=risk.LEVELS[row["risk_level"]],
        template=row["template"],
        state=_NOTIFICATION_STATES_BACK[row["state"]],
        attempt_count=row["attempt_count"],
        last_error=row["last_error"],
        create_time=timestamp(row["create_time"]),
    )
    if row["state"] == "queued":
        note.next_attempt_time.CopyFrom(timestamp(row["next_attempt_time"]))
    if row["send_time"] is not None:
        note.send_time.CopyFrom(timestamp(row["send_time"]))
    return note


# -- input -----------------------------------------------------------------------


def parse_date(value: str, field: str, today: dt.date, *, required: bool) -> dt.date | None:
    """A "YYYY-MM-DD" date in Cambodia time, not after `today` nor older than 90 days."""
    if not value:
        if required:
            raise errors.InvalidArgument(f"{field} is required", field=field)
        return None
    if not _DATE.match(value):
        raise errors.InvalidArgument(f"{field} must be a date YYYY-MM-DD", field=field)
    try:
        day = dt.date.fromisoformat(value)
    except ValueError:
        raise errors.InvalidArgument(f"{field} is not a calendar date", field=field) from None
    if day > today:
        raise errors.InvalidArgument(f"{field} must not be in the future", field=field)
    if day < today - MAX_DATE_AGE:
        raise errors.InvalidArgument(
            f"{field} must be within the last {MAX_DATE_AGE.days} days", field=field
        )
    return day


def time_range(
    value: common_pb2.TimeRange, field: str
) -> tuple[dt.datetime | None, dt.datetime | None]:
    """Either bound may be unset; when both are set, start must not be after end."""
    start = end = None
    try:
        if value.HasField("start_time"):
            start = value.start_time.ToDatetime(dt.UTC)
        if value.HasField("end_time"):
            end = value.end_time.ToDatetime(dt.UTC)
    except (ValueError, OverflowError):
        raise errors.InvalidArgument(f"{field} holds an invalid timestamp", field=field) from None
    if start is not None and end is not None and end < start:
        raise errors.InvalidArgument(f"{field}.end_time is before its start_time", field=field)
    return start, end


def _enum(value: int, known: dict[Any, str], field: str, what: str) -> str | None:
    if value == 0:
        return None
    if value not in known:
        raise errors.InvalidArgument(f"{field} is not a known {what}", field=field)
    return known[value]


def _not_found(resource: str) -> errors.NotFound:
    return errors.NotFound(f"no {resource} with this id", metadata={"resource": resource})


class ExposureService(pb_grpc.ExposureServiceServicer):
    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        self._pool = pool
        self._settings = settings
        self._keys = keys.open_keystore(settings.keystore_dir, settings.secrets_dir)
        current, token_keys = self._keys.token_keys()
        self._tokens = PersonalTokens(current, token_keys, settings.token_window_s)
        self._blind_key = self._keys.blind_index_key()

    # -- people ------------------------------------------------------------------

    async def _person(self, selector: common_pb2.PersonSelector) -> uuid.UUID:
        """The enrolled person a selector names; NOT_FOUND when none (or erased)."""
        row = await enrollment.find(
            self._pool, selector, blind_key=self._blind_key, tokens=self._tokens
        )
        person: uuid.UUID = row["person_id"]
        return person

    # -- cases -------------------------------------------------------------------

    def infectious_window(
        self, test_date: dt.date, onset: dt.date | None, report: dt.datetime
    ) -> tuple[dt.datetime, dt.datetime]:
        """From 00:00 Cambodia time N days before onset (or the test date) to the report."""
        first = (onset or test_date) - dt.timedelta(days=self._settings.infectious_days_before)
        start = dt.datetime.combine(first, dt.time(), CAMBODIA).astimezone(dt.UTC)
        return start, report

    async def ReportCase(
        self, request: pb.ReportCaseRequest, context: Context
    ) -> pb.ReportCaseResponse:
        report = dt.datetime.now(dt.UTC)
        today = report.astimezone(CAMBODIA).date()
        test_date = parse_date(request.case.test_date, "case.test_date", today, required=True)
        assert test_date is not None
        onset = parse_date(
            request.case.symptom_onset_date, "case.symptom_onset_date", today, required=False
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
            request.case.external_reference, "case.external_reference", min_len=0, max_len=100
        )
        request_id = validation.optional_uuid(request.request_id, "request_id")
        if request_id is not None:
            done = await self._pool.fetchrow(Q["case_by_request"], request_id)
            if done is not None:
                return pb.ReportCaseResponse(case=case_to_proto(done))
        person_id = await self._person(request.person)
        start, end = self.infectious_window(test_date, onset, report)
        person_index = self._keys.person_index(person_id.bytes)
        case_id = uuid.uuid4()
        principal = current_principal()
        expire = start + dt.timedelta(days=self._settings.risk_expiry_days)
        created = False
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute(Q["lock_key"], f"person|{person_index.hex()}")
                if request_id is not None:
                    done = await conn.fetchrow(Q["case_by_request"], request_id)
                    if done is not None:  # a retry racing the first call
                        return pb.ReportCaseResponse(case=case_to_proto(done))
                clash = await conn.fetchval(Q["overlapping_case"], person_index, start, end)
                if clash is not None:
                    raise errors.AlreadyExists(
                        "the person already has a case whose infectious window overlaps",
                        metadata={"case_id": str(clash)},
                    )
                key = self._keys.case_key(case_id, create=True)
                created = True
                person_enc = key.encrypt(person_id.bytes, b"case|" + case_id.bytes)
                row = one(
                    await conn.fetchrow(
                        Q["insert_case"],
                        case_id,
                        person_index,
                        person_enc,
                        reference,
                        test_date,
                        onset,
                        start,
                        end,
                        principal.name,
                        request_id,
                    )
                )
                raised = await conn.fetchval(Q["raise_risk_to_case"], person_id, start, expire)
                await audit.record(
                    conn,
                    action("ReportCase"),
                    "case",
                    str(case_id),
                    {"risk_level": "high", "risk_changed": raised is not None},
                    case_id=case_id,
                )
        except BaseException:
            if created:  # the case was never stored: its key must not outlive it
                self._keys.destroy_case_key(case_id)
            raise
        log.info("case_reported", case_id=str(case_id))
        return pb.ReportCaseResponse(case=case_to_proto(row))

    async def GetCase(self, request: pb.GetCaseRequest, context: Context) -> pb.GetCaseResponse:
        case_id = validation.uuid_id(request.case_id, "case_id")
        row = await self._pool.fetchrow(Q["get_case"], case_id)
        if row is None:
            raise _not_found("case")
        return pb.GetCaseResponse(case=case_to_proto(row))

    async def ListCases(
        self, request: pb.ListCasesRequest, context: Context
    ) -> pb.ListCasesResponse:
        size = pagination.page_size(request.page_size)
        start, end = (
            time_range(request.report_time_range, "report_time_range")
            if request.HasField("report_time_range")
            else (None, None)
        )
        filters = {
            "start": start.isoformat() if start else None,
            "end": end.isoformat() if end else None,
        }
        after_time, after_id = pagination.time_and_id(request.page_token, filters)
        rows, token = pagination.page(
            await self._pool.fetch(Q["list_cases"], start, end, after_time, after_id, size + 1),
            size,
            filters,
            pagination.time_id_key("report_time", "case_id"),
        )
        return pb.ListCasesResponse(cases=[case_to_proto(r) for r in rows], next_page_token=token)

    # -- access requests and grants ----------------------------------------------

    async def _access_request(self, conn: Conn, query: str, key: uuid.UUID) -> pb.AccessRequest:
        return access_request_to_proto(one(await conn.fetchrow(Q[query], key)))

    async def CreateAccessRequest(
        self, request: pb.CreateAccessRequestRequest, context: Context
    ) -> pb.CreateAccessRequestResponse:
        asked = request.access_request
        case_id = validation.uuid_id(asked.case_id, "access_request.case_id")
        outbreak = validation.text(
            asked.outbreak_reference, "access_request.outbreak_reference", max_len=100
        )
        justification = validation.text(
            asked.justification, "access_request.justification", min_len=20, max_len=2000
        )
        window = (
            time_range(asked.window, "access_request.window")
            if asked.HasField("window")
            else (None, None)
        )
        request_id = validation.optional_uuid(request.request_id, "request_id")
        principal = current_principal()
        async with self._pool.acquire() as conn, conn.transaction():
            if request_id is not None:
                done = await conn.fetchrow(Q["access_request_by_request"], request_id)
                if done is not None:
                    return pb.CreateAccessRequestResponse(
                        access_request=access_request_to_proto(done)
                    )
            case = await conn.fetchrow(Q["get_case"], case_id)
            if case is None:
                raise _not_found("case")
            start = window[0] or case["window_start"]
            end = window[1] or case["window_end"]
            if not case["window_start"] <= start <= end <= case["window_end"]:
                raise errors.InvalidArgument(
                    "access_request.window must lie within the case's infectious window",
                    field="access_request.window",
                )
            await conn.execute(Q["lock_key"], f"case|{case_id}")
            if request_id is not None:
                done = await conn.fetchrow(Q["access_request_by_request"], request_id)
                if done is not None:
                    return pb.CreateAccessRequestResponse(
                        access_request=access_request_to_proto(done)
                    )
            open_id = await conn.fetchval(Q["open_access_of_case"], case_id)
            if open_id is not None:
                raise errors.AlreadyExists(
                    "the case already has a pending access request or an active grant",
                    metadata={"access_request_id": str(open_id)},
                )
            access_request_id = one(
                await conn.fetchrow(
                    Q["insert_access_request"],
                    uuid.uuid4(),
                    case_id,
                    outbreak,
                    justification,
                    start,
                    end,
                    principal.name,
                    request_id,
                )
            )["access_request_id"]
            await audit.record(
                conn,
                action("CreateAccessRequest"),
                "access_request",
                str(access_request_id),
                {"outbreak_reference": outbreak},
                case_id=case_id,
            )
            made = await self._access_request(conn, "get_access_request", access_request_id)
        log.info("access_requested", access_request_id=str(access_request_id))
        return pb.CreateAccessRequestResponse(access_request=made)

    async def GetAccessRequest(
        self, request: pb.GetAccessRequestRequest, context: Context
    ) -> pb.GetAccessRequestResponse:
        access_request_id = validation.uuid_id(request.access_request_id, "access_request_id")
        row = await self._pool.fetchrow(Q["get_access_request"], access_request_id)
        if row is None:
            raise _not_found("access_request")
        return pb.GetAccessRequestResponse(access_request=access_request_to_proto(row))

    async def ListAccessRequests(
        self, request: pb.ListAccessRequestsRequest, context: Context
    ) -> pb.ListAccessRequestsResponse:
        size = pagination.page_size(request.page_size)
        state = _enum(request.state, _REQUEST_STATES, "state", "AccessRequestState")
        case_id = validation.optional_uuid(request.case_id, "case_id")
        filters = {"state": state, "case_id": str(case_id) if case_id else None}
        after_time, after_id = pagination.time_and_id(request.page_token, filters)
        rows, token = pagination.page(
            await self._pool.fetch(
                Q["list_access_requests"], state, case_id, after_time, after_id, size + 1
            ),
            size,
            filters,
            pagination.time_id_key("create_time", "access_request_id"),
        )
        return pb.ListAccessRequestsResponse(
            access_requests=[access_request_to_proto(r) for r in rows], next_page_token=token
        )

    async def _self_approval(self, method: str, row: asyncpg.Record) -> errors.PermissionDenied:
        """Audit a requester's attempt to decide their own request; the refusal to raise."""
        await audit.record_refusal(
            self._pool,
            action(method),
            "access_request",
            str(row["access_request_id"]),
            error_reason="SELF_APPROVAL",
            case_id=row["case_id"],
        )
        return errors.PermissionDenied(
            "an access request must be decided by a principal other than its requester",
            reason="SELF_APPROVAL",
            metadata={"access_request_id": str(row["access_request_id"])},
        )

    async def ApproveAccessRequest(
        self, request: pb.ApproveAccessRequestRequest, context: Context
    ) -> pb.ApproveAccessRequestResponse:
        access_request_id = validation.uuid_id(request.access_request_id, "access_request_id")
        comment = validation.text(request.comment, "comment", min_len=0, max_len=2000)
        high = dt.timedelta(hours=self._settings.grant_max_hours)
        span = (
            validation.duration(request.grant_duration, "grant_duration", low=MIN_GRANT, high=high)
            if request.HasField("grant_duration")
            else dt.timedelta(hours=self._settings.grant_default_hours)
        )
        principal = current_principal()
        refusal: asyncpg.Record | None = None
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(Q["lock_access_request"], access_request_id)
            if row is None:
                raise _not_found("access_request")
            if row["requester"] == principal.name:
                refusal = row
            elif row["state"] == "denied":
                raise errors.FailedPrecondition(
                    "the access request was denied; a new request is needed",
                    metadata={"state": "denied"},
                )
            elif row["state"] == "approved":
                if row["decider"] != principal.name:
                    raise errors.FailedPrecondition(
                        "the access request was already approved by another approver",
                        metadata={"state": "approved"},
                    )
            else:
                await conn.execute(Q["lock_key"], f"case|{row['case_id']}")
                one(
                    await conn.fetchrow(
                        Q["decide_access_request"],
                        access_request_id,
                        "approved",
                        principal.name,
                        comment,
                    )
                )
                grant_id = one(
                    await conn.fetchrow(
                        Q["insert_grant"],
                        uuid.uuid4(),
                        access_request_id,
                        row["case_id"],
                        row["window_start"],
                        row["window_end"],
                        span,
                    )
                )["grant_id"]
                await audit.record(
                    conn,
                    action("ApproveAccessRequest"),
                    "access_request",
                    str(access_request_id),
                    {"grant_duration_s": int(span.total_seconds())},
                    case_id=row["case_id"],
                    grant_id=grant_id,
                )
                log.info(
                    "access_approved",
                    access_request_id=str(access_request_id),
                    grant_id=str(grant_id),
                )
            if refusal is None:
                made = await self._access_request(conn, "get_access_request", access_request_id)
        if refusal is not None:
            raise await self._self_approval("ApproveAccessRequest", refusal)
        return pb.ApproveAccessRequestResponse(access_request=made)

    async def DenyAccessRequest(
        self, request: pb.DenyAccessRequestRequest, context: Context
    ) -> pb.DenyAccessRequestResponse:
        access_request_id = validation.uuid_id(request.access_request_id, "access_request_id")
        comment = validation.text(request.comment, "comment", max_len=2000)
        principal = current_principal()
        refusal: asyncpg.Record | None = None
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(Q["lock_access_request"], access_request_id)
            if row is None:
                raise _not_found("access_request")
            if row["requester"] == principal.name:
                refusal = row
            elif row["state"] == "approved":
                raise errors.FailedPrecondition(
                    "the access request was approved; revoke its grant instead",
                    metadata={"state": "approved"},
                )
            elif row["state"] == "pending":
                one(
                    await conn.fetchrow(
                        Q["decide_access_request"],
                        access_request_id,
                        "denied",
                        principal.name,
                        comment,
                    )
                )
                await audit.record(
                    conn,
                    action("DenyAccessRequest"),
                    "access_request",
                    str(access_request_id),
                    case_id=row["case_id"],
                )
            if refusal is None:
                made = await self._access_request(conn, "get_access_request", access_request_id)
        if refusal is not None:
            raise await self._self_approval("DenyAccessRequest", refusal)
        return pb.DenyAccessRequestResponse(access_request=made)

    async def RevokeAccessGrant(
        self, request: pb.RevokeAccessGrantRequest, context: Context
    ) -> pb.RevokeAccessGrantResponse:
        grant_id = validation.uuid_id(request.grant_id, "grant_id")
        reason = validation.text(request.reason, "reason", max_len=500)
        principal = current_principal()
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(Q["lock_grant"], grant_id)
            if row is None:
                raise _not_found("grant")
            if grants.state(row) != grants.ACTIVE:
                return pb.RevokeAccessGrantResponse(grant=grant_to_proto(row))
            row = one(await conn.fetchrow(Q["revoke_grant"], grant_id, principal.name, reason))
            traces = await conn.fetch(Q["cancel_traces_of_grant"], grant_id)
            notes = await conn.fetch(Q["cancel_notifications_of_grant"], grant_id)
            await audit.record(
                conn,
                action("RevokeAccessGrant"),
                "access_grant",
                str(grant_id),
                {
                    "reason": reason,
                    "traces_cancelled": len(traces),
                    "notifications_cancelled": len(notes),
                },
                case_id=row["case_id"],
                grant_id=grant_id,
            )
        log.info("grant_revoked", grant_id=str(grant_id), traces_cancelled=len(traces))
        return pb.RevokeAccessGrantResponse(grant=grant_to_proto(row))

    async def _check_grant(
        self,
        conn: Conn,
        *,
        method: str,
        resource_type: str,
        resource_id: str,
        grant_id: uuid.UUID | None,
        case_id: uuid.UUID,
    ) -> asyncpg.Record:
        """The active grant, or the refusal, audited as denied, raised."""
        try:
            return await grants.check(conn, grant_id, case_id)
        except errors.PermissionDenied as refused:
            await audit.record_refusal(
                self._pool,
                action(method),
                resource_type,
                resource_id,
                error_reason=refused.reason,
                details={"grant_case_id": refused.metadata.get("case_id", "")}
                if refused.reason == "GRANT_SCOPE_MISMATCH"
                else None,
                case_id=case_id,
                grant_id=grant_id,
            )
            raise

    # -- traces ------------------------------------------------------------------

    async def StartTrace(
        self, request: pb.StartTraceRequest, context: Context
    ) -> pb.StartTraceResponse:
        case_id = validation.uuid_id(request.case_id, "case_id")
        grant_id = validation.optional_uuid(request.grant_id, "grant_id")
        request_id = validation.optional_uuid(request.request_id, "request_id")
        principal = current_principal()
        if request_id is not None:
            done = await self._pool.fetchrow(Q["trace_by_request"], request_id)
            if done is not None:
                return pb.StartTraceResponse(trace=trace_to_proto(done))
        async with self._pool.acquire() as conn, conn.transaction():
            if await conn.fetchrow(Q["get_case"], case_id) is None:
                raise _not_found("case")
            grant = await self._check_grant(
                conn,
                method="StartTrace",
                resource_type="case",
                resource_id=str(case_id),
                grant_id=grant_id,
                case_id=case_id,
            )
            grant_id = grant["grant_id"]
            row = await conn.fetchrow(
                Q["insert_trace"],
                uuid.uuid4(),
                case_id,
                grant_id,
                grant["window_start"],
                grant["window_end"],
                principal.name,
                request_id,
            )
            if row is None:
                # The grant's queued or running trace (traces_one_active), or the
                # trace a concurrent call with this request_id just made.
                found = await conn.fetchrow(Q["active_trace_of_grant"], grant_id)
                if found is None and request_id is not None:
                    found = await conn.fetchrow(Q["trace_by_request"], request_id)
                if found is None:
                    raise errors.Unavailable(
                        "the grant's trace finished while this one was being started; retry"
                    )
                return pb.StartTraceResponse(trace=trace_to_proto(found))
            await conn.execute(Q["wake_trace_workers"], str(row["trace_id"]))
            await audit.record(
                conn,
                action("StartTrace"),
                "trace",
                str(row["trace_id"]),
                case_id=case_id,
                grant_id=grant_id,
            )
        log.info("trace_queued", trace_id=str(row["trace_id"]), grant_id=str(grant_id))
        return pb.StartTraceResponse(trace=trace_to_proto(row))

    async def GetTrace(self, request: pb.GetTraceRequest, context: Context) -> pb.GetTraceResponse:
        trace_id = validation.uuid_id(request.trace_id, "trace_id")
        row = await self._pool.fetchrow(Q["get_trace"], trace_id)
        if row is None:
            raise _not_found("trace")
        return pb.GetTraceResponse(trace=trace_to_proto(row))

    async def ListTraces(
        self, request: pb.ListTracesRequest, context: Context
    ) -> pb.ListTracesResponse:
        size = pagination.page_size(request.page_size)
        case_id = validation.optional_uuid(request.case_id, "case_id")
        state = _enum(request.state, _TRACE_STATES, "state", "TraceState")
        filters = {"case_id": str(case_id) if case_id else None, "state": state}
        after_time, after_id = pagination.time_and_id(request.page_token, filters)
        found = await self._pool.fetch(
            Q["list_traces"], case_id, state, after_time, after_id, size + 1
        )
        rows, token = pagination.page(
            found, size, filters, pagination.time_id_key("create_time", "trace_id")
        )
        return pb.ListTracesResponse(
            traces=[trace_to_proto(r) for r in rows], next_page_token=token
        )

    async def ListTraceContacts(
        self, request: pb.ListTraceContactsRequest, context: Context
    ) -> pb.ListTraceContactsResponse:
        trace_id = validation.uuid_id(request.trace_id, "trace_id")
        size = pagination.page_size(request.page_size)
        if request.min_risk_level and request.min_risk_level not in risk.LEVELS.values():
            raise errors.InvalidArgument(
                "min_risk_level is not a known RiskLevel", field="min_risk_level"
            )
        min_rank = max(request.min_risk_level, common_pb2.RISK_LEVEL_LOW)
        identify = request.include_person_ids
        filters = {"trace_id": str(trace_id), "min": min_rank, "ids": identify}
        after = pagination.decode(request.page_token, filters)
        after_rank: int | None = None
        after_row: int | None = None
        if after is not None:
            if len(after) != 2 or not all(type(p) is int and 0 <= p < 2**31 for p in after):
                raise pagination.invalid_token()
            after_rank, after_row = after
        async with self._pool.acquire() as conn, conn.transaction(readonly=not identify):
            trace = await conn.fetchrow(Q["get_trace"], trace_id)
            if trace is None:
                raise _not_found("trace")
            case_id: uuid.UUID = trace["case_id"]
            grant = None
            if identify:
                grant = await self._check_grant(
                    conn,
                    method="ListTraceContacts",
                    resource_type="trace",
                    resource_id=str(trace_id),
                    grant_id=None,
                    case_id=case_id,
                )
            if trace["state"] != "succeeded":
                raise errors.FailedPrecondition(
                    "the trace has not succeeded; poll GetTrace until it has",
                    metadata={"state": trace["state"]},
                )
            rows, token = pagination.page(
                await conn.fetch(
                    Q["list_trace_contacts"], trace_id, min_rank, after_rank, after_row, size + 1
                ),
                size,
                filters,
                lambda last: [last["level_rank"], last["row_number"]],
            )
            ids = [""] * len(rows)
            if grant is not None:
                try:
                    key = self._keys.case_key(case_id)
                except keys.KeyError_:
                    raise errors.FailedPrecondition(
                        "the case's key was destroyed with its records; identities are gone",
                        metadata={"case_id": str(case_id)},
                    ) from None
                aad = b"contact|" + trace_id.bytes
                ids = [str(uuid.UUID(bytes=key.decrypt(r["person_enc"], aad))) for r in rows]
                await audit.record(
                    conn,
                    action("ListTraceContacts"),
                    "trace",
                    str(trace_id),
                    {"person_ids_decrypted": len(rows)},
                    case_id=case_id,
                    grant_id=grant["grant_id"],
                )
        return pb.ListTraceContactsResponse(
            trace_contacts=[contact_to_proto(r, pid) for r, pid in zip(rows, ids, strict=True)],
            next_page_token=token,
        )

    # -- risk status -------------------------------------------------------------

    async def GetRiskStatus(
        self, request: pb.GetRiskStatusRequest, context: Context
    ) -> pb.GetRiskStatusResponse:
        person_id = await self._person(request.person)
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(Q["get_risk_status"], person_id)
            status = risk.status_to_proto(row, dt.datetime.now(dt.UTC))
            await audit.record(
                conn,
                action("GetRiskStatus"),
                "person",
                str(person_id),
                {"risk_level": common_pb2.RiskLevel.Name(status.level)},
            )
        return pb.GetRiskStatusResponse(risk_status=status)

    async def ClearRiskStatus(
        self, request: pb.ClearRiskStatusRequest, context: Context
    ) -> pb.ClearRiskStatusResponse:
        reason = risk.CLEAR_REASONS.get(request.reason)
        if reason is None:
            raise errors.InvalidArgument("reason must be a known RiskClearReason", field="reason")
        note = validation.text(
            request.note, "note", min_len=1 if reason == "other" else 0, max_len=500
        )
        person_id = await self._person(request.person)
        async with self._pool.acquire() as conn, conn.transaction():
            now = dt.datetime.now(dt.UTC)
            row = await conn.fetchrow(Q["get_risk_status"], person_id)
            before = risk.status_to_proto(row, now)
            if before.level == common_pb2.RISK_LEVEL_NONE:
                return pb.ClearRiskStatusResponse(risk_status=before)
            row = one(await conn.fetchrow(Q["clear_risk_status"], person_id, reason))
            await audit.record(
                conn,
                action("ClearRiskStatus"),
                "person",
                str(person_id),
                {
                    "previous_level": common_pb2.RiskLevel.Name(before.level),
                    "reason": reason,
                    "note": note,
                },
            )
        log.info("risk_cleared", reason=reason)
        return pb.ClearRiskStatusResponse(risk_status=risk.status_to_proto(row, now))

    # -- notifications -----------------------------------------------------------

    async def ListNotifications(
        self, request: pb.ListNotificationsRequest, context: Context
    ) -> pb.ListNotificationsResponse:
        size = pagination.page_size(request.page_size)
        trace_id = validation.optional_uuid(request.trace_id, "trace_id")
        state = _enum(request.state, _NOTIFICATION_STATES, "state", "NotificationState")
        filters = {"trace_id": str(trace_id) if trace_id else None, "state": state}
        after_time, after_id = pagination.time_and_id(request.page_token, filters)
        rows, token = pagination.page(
            await self._pool.fetch(
                Q["list_notifications"], trace_id, state, after_time, after_id, size + 1
            ),
            size,
            filters,
            pagination.time_id_key("create_time", "notification_id"),
        )
        return pb.ListNotificationsResponse(
            notifications=[notification_to_proto(r) for r in rows], next_page_token=token
        )

    # -- the export for health departments -----------------------------------------

    async def ExportTraceContacts(
        self, request: pb.ExportTraceContactsRequest, context: Context
    ) -> AsyncIterator[pb.ExportTraceContactsResponse]:
        """The contacts as CSV chunks (services/exposure/export.py), under an active
        grant, audited with the row count before the first byte leaves. The last
        chunk is held back one step so it can carry the row count."""
        trace_id = validation.uuid_id(request.trace_id, "trace_id")
        min_rank = export.min_rank(request.min_risk_level)
        async with self._pool.acquire() as conn, conn.transaction():
            trace = await conn.fetchrow(Q["get_trace"], trace_id)
            if trace is None:
                raise _not_found("trace")
            case_id: uuid.UUID = trace["case_id"]
            grant = await self._check_grant(
                conn,
                method="ExportTraceContacts",
                resource_type="trace",
                resource_id=str(trace_id),
                grant_id=None,
                case_id=case_id,
            )
            if trace["state"] != "succeeded":
                raise errors.FailedPrecondition(
                    "the trace has not succeeded; poll GetTrace until it has",
                    metadata={"state": trace["state"]},
                )
            key = None
            if request.include_person_ids:
                try:
                    key = self._keys.case_key(case_id)
                except keys.KeyError_:
                    raise errors.FailedPrecondition(
                        "the case's key was destroyed with its records; identities are gone",
                        metadata={"case_id": str(case_id)},
                    ) from None
            count = await export.count_rows(conn, trace_id, min_rank)
            await audit.record(
                conn,
                action("ExportTraceContacts"),
                "trace",
                str(trace_id),
                {"rows": count, "person_ids_decrypted": count if key else 0, "format": "csv"},
                case_id=case_id,
                grant_id=grant["grant_id"],
            )
        plan = export.ExportPlan(trace_id, min_rank, count, key)
        held: bytes | None = None
        first = True
        sent = 0
        async for content, rows in export.chunks(self._pool, plan):
            if held is not None:
                yield pb.ExportTraceContactsResponse(
                    content=held, content_type=export.CONTENT_TYPE if first else ""
                )
                first = False
            held = content
            sent += rows
        yield pb.ExportTraceContactsResponse(
            content=held or b"",
            content_type=export.CONTENT_TYPE if first else "",
            row_count=sent,
        )
        log.info("trace_contacts_exported", rows=sent, audited_rows=count)
