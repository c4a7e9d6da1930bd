"""ExposureService end to end: typed clients -> mutual TLS -> auth -> service -> Postgres.

Cases, the two-person rule for access, every refusal of access (each audited), traces
queued under a grant, contacts listed and identified only under an active grant, risk
levels that reach the venue doors, and notifications without phone numbers. Trace
results are written here as the migrator where a worker would write them, with the
encryption conventions the workers use, spelt out as bytes (services/kernel/keys.py
Sealed writes and reads the same), so data stored before Sealed still opens."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import secrets
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import asyncpg
import pytest
import stopcovid.client as clients
from google.protobuf import duration_pb2
from stopcovid.checkin.v1 import checkin_service_pb2 as cpb
from stopcovid.common.v1 import common_pb2
from stopcovid.exposure.v1 import exposure_service_pb2 as pb

from services.exposure import service
from services.kernel import db, keys
from tests.support import exposure_helpers as h
from tests.support.checkin_helpers import (
    add_device,
    batch,
    config,
    create_venue,
    enroll,
    open_stream,
    scan,
    ts,
)
from tests.support.database import Query
from tests.support.fleet import stop_gracefully, worker_process
from tests.support.servers import Servers, process_env
from tests.support.waits import every_page, wait_for

HIGH = common_pb2.RISK_LEVEL_HIGH
MEDIUM = common_pb2.RISK_LEVEL_MEDIUM
LOW = common_pb2.RISK_LEVEL_LOW
NONE = common_pb2.RISK_LEVEL_NONE


def phone() -> str:
    return f"+8551{secrets.randbelow(10**7):07d}"


def person(servers: Servers) -> tuple[str, common_pb2.PersonSelector]:
    """Enroll a synthetic person; (person id, selector by phone)."""
    number = phone()
    return enroll(servers, number).person_id, h.by_phone(number)


def audit_rows(db_conn: Query, action: str) -> list[asyncpg.Record]:
    return db_conn(
        "SELECT principal, role, resource_type, resource_id, case_id, grant_id, outcome,"
        " error_reason, details FROM audit_events WHERE action = $1 ORDER BY event_id",
        f"{service.SERVICE}/{action}",
    )


def expire_grant(db_conn: Query, grant_id: str) -> None:
    """Age a grant past its expiry (as the superuser can; the API cannot)."""
    db_conn(
        "UPDATE access_grants SET create_time = create_time - interval '10 days',"
        " expire_time = now() - interval '1 second' WHERE grant_id = $1",
        uuid.UUID(grant_id),
    )


@pytest.fixture
def official(servers: Servers) -> Iterator[clients.ExposureClient]:
    with h.exposure(servers) as client:
        yield client


@pytest.fixture
def approver(servers: Servers) -> Iterator[clients.ExposureClient]:
    with h.exposure(servers, h.APPROVER) as client:
        yield client


# -- cases ---------------------------------------------------------------------------


def test_report_case_derives_window_sets_high_and_audits(servers: Servers, db_conn: Query) -> None:
    person_id, selector = person(servers)
    test_date = h.today() - dt.timedelta(days=1)
    onset = h.today() - dt.timedelta(days=3)
    case = h.report_case(servers, selector, test_date=test_date, onset=onset)
    start = case.infectious_window.start_time.ToDatetime(dt.UTC)
    expected = dt.datetime.combine(onset - dt.timedelta(days=2), dt.time(), h.CAMBODIA)
    assert start == expected.astimezone(dt.UTC)
    assert case.infectious_window.end_time == case.report_time
    assert case.reporter == h.OFFICIAL
    assert case.test_date == test_date.isoformat()
    assert case.symptom_onset_date == onset.isoformat()
    assert case.external_reference == "LAB-0001"

    status = h.risk_status(servers, h.by_id(person_id))
    assert status.level == HIGH
    assert status.basis.reason == common_pb2.RISK_REASON_CONFIRMED_CASE
    assert status.basis.exposure_time == case.infectious_window.start_time
    assert status.expire_time.ToDatetime(dt.UTC) == start + dt.timedelta(days=14)
    assert not status.basis.venue_id  # the basis never names the case

    [row] = audit_rows(db_conn, "ReportCase")
    assert (row["principal"], row["resource_type"], row["resource_id"]) == (
        h.OFFICIAL,
        "case",
        case.case_id,
    )
    assert str(row["case_id"]) == case.case_id
    assert person_id not in row["details"]
    # The case row holds no person id in clear; the case key opens it, with the
    # associated data written out as stored before Sealed (byte-identical).
    [stored] = db_conn("SELECT * FROM cases WHERE case_id = $1", uuid.UUID(case.case_id))
    assert uuid.UUID(person_id).bytes not in bytes(stored["person_enc"])
    store = keys.open_keystore(servers.settings.keystore_dir, servers.settings.secrets_dir)
    key = store.case_key(uuid.UUID(case.case_id))
    opened = key.decrypt(stored["person_enc"], b"case|" + uuid.UUID(case.case_id).bytes)
    assert opened == uuid.UUID(person_id).bytes
    assert stored["person_index"] == store.person_index(uuid.UUID(person_id).bytes)


def test_window_without_onset_starts_two_days_before_the_test(servers: Servers) -> None:
    _, selector = person(servers)
    test_date = h.today() - dt.timedelta(days=4)
    case = h.report_case(servers, selector, test_date=test_date)
    expected = dt.datetime.combine(test_date - dt.timedelta(days=2), dt.time(), h.CAMBODIA)
    assert case.infectious_window.start_time.ToDatetime(dt.UTC) == expected.astimezone(dt.UTC)
    assert case.symptom_onset_date == ""


def test_report_case_by_token_and_by_id(servers: Servers, db_conn: Query) -> None:
    enrolled = enroll(servers, phone())
    by_token = common_pb2.PersonSelector(personal_token=enrolled.personal_token.token)
    first = h.report_case(servers, by_token, test_date=h.today() - dt.timedelta(days=30))
    # A case reported long ago: its window ended at that report.
    db_conn(
        "UPDATE cases SET window_end = window_start + interval '3 days',"
        " report_time = window_start + interval '3 days' WHERE case_id = $1",
        uuid.UUID(first.case_id),
    )
    second = h.report_case(servers, h.by_id(enrolled.person_id))
    assert first.case_id != second.case_id


def test_report_case_is_idempotent_by_request_id(servers: Servers, db_conn: Query) -> None:
    _, selector = person(servers)
    request_id = str(uuid.uuid4())
    first = h.report_case(servers, selector, request_id=request_id)
    second = h.report_case(servers, selector, request_id=request_id)
    assert first == second
    assert db_conn("SELECT count(*) FROM cases")[0][0] == 1
    assert len(audit_rows(db_conn, "ReportCase")) == 1


def test_overlapping_case_is_already_exists_naming_it(servers: Servers) -> None:
    _, selector = person(servers)
    first = h.report_case(servers, selector, test_date=h.today() - dt.timedelta(days=2))
    with pytest.raises(clients.AlreadyExists) as caught:
        h.report_case(servers, selector)
    assert caught.value.reason == "ALREADY_EXISTS"
    assert caught.value.metadata["case_id"] == first.case_id


def test_concurrent_reports_and_requests_make_one_each(servers: Servers, db_conn: Query) -> None:
    _, selector = person(servers)

    def race(call: Callable[[], object]) -> list[object]:
        results: list[object] = []

        def run() -> None:
            try:
                results.append(call())
            except clients.StopCovidError as err:
                results.append(err)

        threads = [threading.Thread(target=run) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        return results

    reports = race(lambda: h.report_case(servers, selector))
    made = [r for r in reports if isinstance(r, pb.Case)]
    assert len(made) == 1
    assert all(isinstance(r, clients.AlreadyExists) for r in reports if r not in made)
    asks = race(lambda: h.request_access(servers, made[0].case_id))
    pending = [r for r in asks if isinstance(r, pb.AccessRequest)]
    assert len(pending) == 1
    assert all(isinstance(r, clients.AlreadyExists) for r in asks if r not in pending)
    assert db_conn("SELECT count(*) FROM cases")[0][0] == 1
    assert db_conn("SELECT count(*) FROM access_requests")[0][0] == 1


def test_a_symptom_onset_after_the_test_date_is_refused(servers: Servers, db_conn: Query) -> None:
    _, selector = person(servers)
    test_date = h.today() - dt.timedelta(days=3)
    for onset in (test_date + dt.timedelta(days=1), h.today()):
        with pytest.raises(clients.InvalidArgument) as caught:
            h.report_case(servers, selector, test_date=test_date, onset=onset)
        assert caught.value.reason == "INVALID_ARGUMENT"
        [(field, description)] = caught.value.field_violations
        assert field == "case.symptom_onset_date"
        assert "after case.test_date" in description
    assert db_conn("SELECT count(*) FROM cases")[0][0] == 0
    # The same day is fine: symptoms began the day of the test.
    case = h.report_case(servers, selector, test_date=test_date, onset=test_date)
    expected = dt.datetime.combine(test_date - dt.timedelta(days=2), dt.time(), h.CAMBODIA)
    assert case.infectious_window.start_time.ToDatetime(dt.UTC) == expected.astimezone(dt.UTC)


def test_report_case_for_unknown_person_is_not_found(servers: Servers) -> None:
    for selector in (h.by_phone(phone()), h.by_id(str(uuid.uuid4()))):
        with pytest.raises(clients.NotFound) as caught:
            h.report_case(servers, selector)
        assert caught.value.reason == "NOT_FOUND"


@pytest.mark.parametrize(
    ("test_date", "onset", "field"),
    [
        ("", "", "case.test_date"),
        ("2021-13-01", "", "case.test_date"),
        ("2021-02-30", "", "case.test_date"),
        ("21-02-03", "", "case.test_date"),
        ("tomorrow", "", "case.test_date"),
        ("+1", "", "case.test_date"),
        ("1900-01-01", "", "case.test_date"),
        ("FUTURE", "", "case.test_date"),
        ("TODAY", "FUTURE", "case.symptom_onset_date"),
        ("TODAY", "2021/01/01", "case.symptom_onset_date"),
    ],
)
def test_report_case_refuses_bad_dates(
    official: clients.ExposureClient, test_date: str, onset: str, field: str
) -> None:
    dates = {"TODAY": h.today(), "FUTURE": h.today() + dt.timedelta(days=2)}
    fix = {k: v.isoformat() for k, v in dates.items()}
    with pytest.raises(clients.InvalidArgument) as caught:
        official.rpc.ReportCase(
            pb.ReportCaseRequest(
                person=h.by_phone("+85512345678"),
                case=pb.Case(
                    test_date=fix.get(test_date, test_date),
                    symptom_onset_date=fix.get(onset, onset),
                ),
            )
        )
    assert caught.value.metadata["field"] == field


@pytest.mark.parametrize(
    ("selector", "field"),
    [
        (common_pb2.PersonSelector(), "person"),
        (common_pb2.PersonSelector(phone_number="12345"), "person.phone_number"),
        (common_pb2.PersonSelector(person_id="not-a-uuid"), "person.person_id"),
        (common_pb2.PersonSelector(personal_token="S1.t1.forged"), "person.personal_token"),
        (common_pb2.PersonSelector(personal_token="x" * 5000), "person.personal_token"),
    ],
)
def test_report_case_refuses_bad_selectors(
    official: clients.ExposureClient, selector: common_pb2.PersonSelector, field: str
) -> None:
    with pytest.raises(clients.InvalidArgument) as caught:
        official.rpc.ReportCase(
            pb.ReportCaseRequest(person=selector, case=pb.Case(test_date=h.today().isoformat()))
        )
    assert caught.value.metadata["field"] == field


def test_report_case_refuses_long_reference_and_bad_request_id(
    official: clients.ExposureClient,
) -> None:
    case = pb.Case(test_date=h.today().isoformat(), external_reference="x" * 101)
    with pytest.raises(clients.InvalidArgument) as caught:
        official.rpc.ReportCase(pb.ReportCaseRequest(person=h.by_phone(phone()), case=case))
    assert caught.value.metadata["field"] == "case.external_reference"
    case.external_reference = ""
    with pytest.raises(clients.InvalidArgument) as caught:
        official.rpc.ReportCase(
            pb.ReportCaseRequest(person=h.by_phone(phone()), case=case, request_id="nope")
        )
    assert caught.value.metadata["field"] == "request_id"


def test_get_and_list_cases_newest_first_with_pages(
    servers: Servers, official: clients.ExposureClient, approver: clients.ExposureClient
) -> None:
    made = [h.report_case(servers, person(servers)[1]) for _ in range(5)]
    got = approver.rpc.GetCase(pb.GetCaseRequest(case_id=made[0].case_id)).case
    assert got == made[0]
    seen: list[pb.Case] = []
    for page in every_page(
        lambda token: official.rpc.ListCases(pb.ListCasesRequest(page_size=2, page_token=token))
    ):
        assert len(page.cases) <= 2
        seen.extend(page.cases)
    assert [c.case_id for c in seen] == [c.case_id for c in reversed(made)]
    # A report-time filter, and a token reused with another filter is refused.
    window = common_pb2.TimeRange(start_time=made[2].report_time)
    filtered = official.rpc.ListCases(pb.ListCasesRequest(report_time_range=window))
    assert [c.case_id for c in filtered.cases] == [c.case_id for c in reversed(made[2:])]
    first = official.rpc.ListCases(pb.ListCasesRequest(page_size=1))
    with pytest.raises(clients.InvalidArgument) as caught:
        official.rpc.ListCases(
            pb.ListCasesRequest(
                page_size=1, page_token=first.next_page_token, report_time_range=window
            )
        )
    assert caught.value.reason == "INVALID_PAGE_TOKEN"
    with pytest.raises(clients.NotFound):
        official.rpc.GetCase(pb.GetCaseRequest(case_id=str(uuid.uuid4())))


# -- access requests -----------------------------------------------------------------


def test_request_approve_two_people_and_audit(servers: Servers, db_conn: Query) -> None:
    _, selector = person(servers)
    case = h.report_case(servers, selector)
    made = h.request_access(servers, case.case_id)
    assert made.state == pb.ACCESS_REQUEST_STATE_PENDING
    assert made.requester == h.OFFICIAL
    assert made.window == case.infectious_window  # the default window
    assert not made.HasField("grant")

    approved = h.approve(servers, made.access_request_id)
    assert approved.state == pb.ACCESS_REQUEST_STATE_APPROVED
    assert approved.decider == h.APPROVER
    grant = approved.grant
    assert grant.state == pb.ACCESS_GRANT_STATE_ACTIVE
    assert grant.case_id == case.case_id
    assert grant.window == made.window
    span = grant.expire_time.ToDatetime() - grant.create_time.ToDatetime()
    assert span == dt.timedelta(hours=72)

    # Approving again by the same approver returns it unchanged, audited once.
    assert h.approve(servers, made.access_request_id) == approved
    with h.exposure(servers, h.AUDITOR) as auditor:
        read = auditor.rpc.GetAccessRequest(
            pb.GetAccessRequestRequest(access_request_id=made.access_request_id)
        ).access_request
    assert read == approved

    [asked] = audit_rows(db_conn, "CreateAccessRequest")
    assert (asked["principal"], str(asked["case_id"])) == (h.OFFICIAL, case.case_id)
    [decided] = audit_rows(db_conn, "ApproveAccessRequest")
    assert decided["principal"] == h.APPROVER
    assert str(decided["case_id"]) == case.case_id
    assert str(decided["grant_id"]) == grant.grant_id
    assert decided["outcome"] == "succeeded"


def test_one_pending_or_active_access_per_case(servers: Servers) -> None:
    case = h.report_case(servers, person(servers)[1])
    made = h.request_access(servers, case.case_id)
    with pytest.raises(clients.AlreadyExists) as caught:
        h.request_access(servers, case.case_id)
    assert caught.value.metadata["access_request_id"] == made.access_request_id
    grant = h.approve(servers, made.access_request_id).grant
    with pytest.raises(clients.AlreadyExists) as caught:
        h.request_access(servers, case.case_id)
    assert caught.value.metadata["access_request_id"] == made.access_request_id
    h.revoke(servers, grant.grant_id)
    again = h.request_access(servers, case.case_id)  # revoked: ask again
    assert again.state == pb.ACCESS_REQUEST_STATE_PENDING


def test_create_access_request_is_idempotent_by_request_id(
    servers: Servers, official: clients.ExposureClient, db_conn: Query
) -> None:
    case = h.report_case(servers, person(servers)[1])
    request = pb.CreateAccessRequestRequest(
        access_request=pb.AccessRequest(
            case_id=case.case_id, outbreak_reference="PP-1", justification=h.JUSTIFICATION
        ),
        request_id=str(uuid.uuid4()),
    )
    first = official.rpc.CreateAccessRequest(request).access_request
    assert official.rpc.CreateAccessRequest(request).access_request == first
    assert len(audit_rows(db_conn, "CreateAccessRequest")) == 1


def test_access_request_window_and_fields_are_checked(
    servers: Servers, official: clients.ExposureClient
) -> None:
    case = h.report_case(servers, person(servers)[1])
    start = case.infectious_window.start_time.ToDatetime(dt.UTC)
    end = case.infectious_window.end_time.ToDatetime(dt.UTC)

    def ask(**fields: object) -> pb.AccessRequest:
        base: dict[str, object] = {
            "case_id": case.case_id,
            "outbreak_reference": "PP-2021-04-12",
            "justification": h.JUSTIFICATION,
        }
        base.update(fields)
        return official.rpc.CreateAccessRequest(
            pb.CreateAccessRequestRequest(access_request=pb.AccessRequest(**base))  # type: ignore[arg-type]
        ).access_request

    bad: list[tuple[dict[str, object], str]] = [
        ({"case_id": "nope"}, "access_request.case_id"),
        ({"outbreak_reference": ""}, "access_request.outbreak_reference"),
        ({"outbreak_reference": "x" * 101}, "access_request.outbreak_reference"),
        ({"justification": "too short"}, "access_request.justification"),
        ({"justification": "y" * 2001}, "access_request.justification"),
        (
            {"window": common_pb2.TimeRange(start_time=ts(start - dt.timedelta(hours=1)))},
            "access_request.window",
        ),
        (
            {"window": common_pb2.TimeRange(end_time=ts(end + dt.timedelta(hours=1)))},
            "access_request.window",
        ),
        (
            {"window": common_pb2.TimeRange(start_time=ts(end), end_time=ts(start))},
            "access_request.window",
        ),
    ]
    for fields, field in bad:
        with pytest.raises(clients.InvalidArgument) as caught:
            ask(**fields)
        assert caught.value.metadata["field"] == field, fields
    with pytest.raises(clients.NotFound):
        ask(case_id=str(uuid.uuid4()))
    narrow = common_pb2.TimeRange(
        start_time=ts(start + dt.timedelta(hours=1)), end_time=ts(end - dt.timedelta(hours=1))
    )
    made = ask(window=narrow)
    assert made.window == narrow
    grant = h.approve(servers, made.access_request_id).grant
    assert grant.window == narrow


def test_self_approval_and_self_denial_are_refused_and_audited(
    servers: Servers, db_conn: Query
) -> None:
    """The same principal (CN) with an approver certificate may not decide its own request."""
    case = h.report_case(servers, person(servers)[1])
    made = h.request_access(servers, case.case_id)
    same = h.principal(servers.pki, h.OFFICIAL, "ROLE_APPROVER")
    with pytest.raises(clients.PermissionDenied) as caught:
        h.approve(servers, made.access_request_id, as_principal=same)
    assert caught.value.reason == "SELF_APPROVAL"
    with h.exposure(servers, same) as client, pytest.raises(clients.PermissionDenied) as caught:
        client.rpc.DenyAccessRequest(
            pb.DenyAccessRequestRequest(access_request_id=made.access_request_id, comment="no")
        )
    assert caught.value.reason == "SELF_APPROVAL"
    for method in ("ApproveAccessRequest", "DenyAccessRequest"):
        [row] = audit_rows(db_conn, method)
        assert (row["principal"], row["role"]) == (h.OFFICIAL, "ROLE_APPROVER")
        assert (row["outcome"], row["error_reason"]) == ("denied", "SELF_APPROVAL")
        assert str(row["case_id"]) == case.case_id
        assert row["resource_id"] == made.access_request_id
    with h.exposure(servers, h.AUDITOR) as auditor:
        still = auditor.rpc.GetAccessRequest(
            pb.GetAccessRequestRequest(access_request_id=made.access_request_id)
        ).access_request
    assert still.state == pb.ACCESS_REQUEST_STATE_PENDING


def test_schema_refuses_self_decision_whatever_the_code_does(
    servers: Servers, db_conn: Query
) -> None:
    case = h.report_case(servers, person(servers)[1])
    made = h.request_access(servers, case.case_id)
    with pytest.raises(asyncpg.CheckViolationError):
        db_conn(
            "UPDATE access_requests SET state = 'approved', decider = requester,"
            " decide_time = now() WHERE access_request_id = $1",
            uuid.UUID(made.access_request_id),
        )


def test_deny_needs_a_comment_is_idempotent_and_final(
    servers: Servers, approver: clients.ExposureClient, db_conn: Query
) -> None:
    case = h.report_case(servers, person(servers)[1])
    made = h.request_access(servers, case.case_id)
    deny = approver.rpc.DenyAccessRequest
    with pytest.raises(clients.InvalidArgument) as caught:
        deny(pb.DenyAccessRequestRequest(access_request_id=made.access_request_id))
    assert caught.value.metadata["field"] == "comment"
    request = pb.DenyAccessRequestRequest(
        access_request_id=made.access_request_id, comment="No outbreak reference on file."
    )
    denied = deny(request).access_request
    assert denied.state == pb.ACCESS_REQUEST_STATE_DENIED
    assert denied.decision_comment == "No outbreak reference on file."
    assert deny(request).access_request == denied
    assert len(audit_rows(db_conn, "DenyAccessRequest")) == 1
    with pytest.raises(clients.FailedPrecondition):
        h.approve(servers, made.access_request_id)
    # A denied request no longer blocks a new one.
    assert h.request_access(servers, case.case_id).state == pb.ACCESS_REQUEST_STATE_PENDING


def test_approved_cannot_be_denied_nor_approved_by_another(
    servers: Servers, approver: clients.ExposureClient
) -> None:
    case = h.report_case(servers, person(servers)[1])
    made = h.request_access(servers, case.case_id)
    h.approve(servers, made.access_request_id)
    with pytest.raises(clients.FailedPrecondition):
        approver.rpc.DenyAccessRequest(
            pb.DenyAccessRequestRequest(access_request_id=made.access_request_id, comment="late")
        )
    other = h.principal(servers.pki, "approver-two", "ROLE_APPROVER")
    with pytest.raises(clients.FailedPrecondition):
        h.approve(servers, made.access_request_id, as_principal=other)


def test_grant_duration_bounds(servers: Servers, approver: clients.ExposureClient) -> None:
    case = h.report_case(servers, person(servers)[1])
    made = h.request_access(servers, case.case_id)
    for seconds in (-1, 0, 30, 169 * 3600, 10**11):
        with pytest.raises(clients.InvalidArgument) as caught:
            approver.rpc.ApproveAccessRequest(
                pb.ApproveAccessRequestRequest(
                    access_request_id=made.access_request_id,
                    grant_duration=duration_pb2.Duration(seconds=seconds),
                )
            )
        assert caught.value.metadata["field"] == "grant_duration"
    with pytest.raises(clients.NotFound):
        h.approve(servers, str(uuid.uuid4()))
    grant = h.approve(servers, made.access_request_id, duration=dt.timedelta(hours=2)).grant
    span = grant.expire_time.ToDatetime() - grant.create_time.ToDatetime()
    assert span == dt.timedelta(hours=2)


def test_list_access_requests_oldest_first_with_filters(
    servers: Servers, approver: clients.ExposureClient
) -> None:
    cases = [h.report_case(servers, person(servers)[1]) for _ in range(4)]
    made = [h.request_access(servers, c.case_id) for c in cases]
    h.approve(servers, made[1].access_request_id)
    seen: list[str] = []
    for page in every_page(
        lambda token: approver.rpc.ListAccessRequests(
            pb.ListAccessRequestsRequest(page_size=1, page_token=token)
        )
    ):
        seen.extend(r.access_request_id for r in page.access_requests)
    assert seen == [m.access_request_id for m in made]
    pending = approver.rpc.ListAccessRequests(
        pb.ListAccessRequestsRequest(state=pb.ACCESS_REQUEST_STATE_PENDING)
    )
    assert [r.access_request_id for r in pending.access_requests] == [
        made[i].access_request_id for i in (0, 2, 3)
    ]
    one_case = approver.rpc.ListAccessRequests(
        pb.ListAccessRequestsRequest(case_id=cases[1].case_id)
    )
    [only] = one_case.access_requests
    assert only.grant.state == pb.ACCESS_GRANT_STATE_ACTIVE
    with pytest.raises(clients.InvalidArgument):
        approver.rpc.ListAccessRequests(pb.ListAccessRequestsRequest(state=42))  # type: ignore[arg-type]


# -- grants and traces ---------------------------------------------------------------


def _refusals(db_conn: Query, action: str) -> list[tuple[str, str | None]]:
    return [
        (r["error_reason"], str(r["grant_id"]) if r["grant_id"] else None)
        for r in audit_rows(db_conn, action)
        if r["outcome"] == "denied"
    ]


def test_start_trace_without_grant_is_refused_and_audited(
    servers: Servers, official: clients.ExposureClient, db_conn: Query
) -> None:
    case = h.report_case(servers, person(servers)[1])
    h.request_access(servers, case.case_id)  # pending is not a grant
    for grant_id in ("", str(uuid.uuid4())):
        with pytest.raises(clients.PermissionDenied) as caught:
            official.rpc.StartTrace(pb.StartTraceRequest(case_id=case.case_id, grant_id=grant_id))
        assert caught.value.reason == "NO_ACTIVE_GRANT"
    rows = audit_rows(db_conn, "StartTrace")
    assert [(r["outcome"], r["error_reason"]) for r in rows] == [("denied", "NO_ACTIVE_GRANT")] * 2
    assert all(str(r["case_id"]) == case.case_id for r in rows)
    assert all(r["principal"] == h.OFFICIAL for r in rows)
    assert db_conn("SELECT count(*) FROM traces")[0][0] == 0


def test_start_trace_with_expired_grant_is_refused_and_audited(
    servers: Servers, official: clients.ExposureClient, db_conn: Query
) -> None:
    case = h.report_case(servers, person(servers)[1])
    grant = h.grant_access(servers, case.case_id)
    expire_grant(db_conn, grant.grant_id)
    for grant_id in (grant.grant_id, ""):
        with pytest.raises(clients.PermissionDenied) as caught:
            official.rpc.StartTrace(pb.StartTraceRequest(case_id=case.case_id, grant_id=grant_id))
        assert caught.value.reason == "GRANT_EXPIRED"
    assert _refusals(db_conn, "StartTrace") == [
        ("GRANT_EXPIRED", grant.grant_id),
        ("GRANT_EXPIRED", None),
    ]
    with h.exposure(servers, h.AUDITOR) as auditor:
        read = auditor.rpc.GetAccessRequest(
            pb.GetAccessRequestRequest(access_request_id=grant_request_id(db_conn, grant))
        ).access_request
    assert read.grant.state == pb.ACCESS_GRANT_STATE_EXPIRED
    # Revoking an expired grant changes nothing.
    assert h.revoke(servers, grant.grant_id).state == pb.ACCESS_GRANT_STATE_EXPIRED
    assert audit_rows(db_conn, "RevokeAccessGrant") == []


def grant_request_id(db_conn: Query, grant: pb.AccessGrant) -> str:
    rows = db_conn(
        "SELECT access_request_id FROM access_grants WHERE grant_id = $1",
        uuid.UUID(grant.grant_id),
    )
    return str(rows[0][0])


def test_start_trace_with_revoked_grant_is_refused_and_audited(
    servers: Servers, official: clients.ExposureClient, db_conn: Query
) -> None:
    case = h.report_case(servers, person(servers)[1])
    grant = h.grant_access(servers, case.case_id)
    revoked = h.revoke(servers, grant.grant_id, as_principal=h.OFFICIAL)  # either side may
    assert revoked.state == pb.ACCESS_GRANT_STATE_REVOKED
    assert revoked.revoker == h.OFFICIAL
    assert revoked.revoke_reason == "investigation closed"
    assert revoked.HasField("revoke_time")
    with pytest.raises(clients.PermissionDenied) as caught:
        official.rpc.StartTrace(pb.StartTraceRequest(case_id=case.case_id, grant_id=grant.grant_id))
    assert caught.value.reason == "GRANT_REVOKED"
    assert _refusals(db_conn, "StartTrace") == [("GRANT_REVOKED", grant.grant_id)]
    [row] = audit_rows(db_conn, "RevokeAccessGrant")
    assert (str(row["case_id"]), str(row["grant_id"])) == (case.case_id, grant.grant_id)
    assert h.revoke(servers, grant.grant_id) == revoked  # again: unchanged
    assert len(audit_rows(db_conn, "RevokeAccessGrant")) == 1


def test_grant_for_another_case_is_scope_mismatch_and_audited(
    servers: Servers, official: clients.ExposureClient, db_conn: Query
) -> None:
    case_a = h.report_case(servers, person(servers)[1])
    case_b = h.report_case(servers, person(servers)[1])
    grant_a = h.grant_access(servers, case_a.case_id)
    with pytest.raises(clients.PermissionDenied) as caught:
        official.rpc.StartTrace(
            pb.StartTraceRequest(case_id=case_b.case_id, grant_id=grant_a.grant_id)
        )
    assert caught.value.reason == "GRANT_SCOPE_MISMATCH"
    assert caught.value.metadata["case_id"] == case_a.case_id
    [row] = [r for r in audit_rows(db_conn, "StartTrace") if r["outcome"] == "denied"]
    assert row["error_reason"] == "GRANT_SCOPE_MISMATCH"
    assert (str(row["case_id"]), str(row["grant_id"])) == (case_b.case_id, grant_a.grant_id)
    assert json.loads(row["details"])["grant_case_id"] == case_a.case_id


def test_start_trace_queues_once_per_grant_and_wakes_workers(
    servers: Servers, official: clients.ExposureClient, db_conn: Query
) -> None:
    case = h.report_case(servers, person(servers)[1])
    grant = h.grant_access(servers, case.case_id)
    with listening(servers, "stopcovid_trace") as heard:
        trace = h.start_trace(servers, case.case_id, grant.grant_id)
        wait_for(lambda: trace.trace_id in heard, 10, "the trace wake-up")
    assert trace.state == pb.TRACE_STATE_QUEUED
    assert (trace.case_id, trace.grant_id, trace.starter) == (
        case.case_id,
        grant.grant_id,
        h.OFFICIAL,
    )
    assert trace.window == grant.window
    # While it is queued, starting again returns it, also without naming the grant.
    assert h.start_trace(servers, case.case_id, grant.grant_id) == trace
    assert h.start_trace(servers, case.case_id, "") == trace
    [row] = audit_rows(db_conn, "StartTrace")
    assert (row["resource_id"], str(row["grant_id"])) == (trace.trace_id, grant.grant_id)
    got = official.rpc.GetTrace(pb.GetTraceRequest(trace_id=trace.trace_id)).trace
    assert got == trace
    with pytest.raises(clients.NotFound):
        official.rpc.GetTrace(pb.GetTraceRequest(trace_id=str(uuid.uuid4())))
    with pytest.raises(clients.NotFound):
        official.rpc.StartTrace(pb.StartTraceRequest(case_id=str(uuid.uuid4())))


def test_start_trace_is_idempotent_by_request_id(servers: Servers, db_conn: Query) -> None:
    case = h.report_case(servers, person(servers)[1])
    grant = h.grant_access(servers, case.case_id)
    request_id = str(uuid.uuid4())
    first = h.start_trace(servers, case.case_id, grant.grant_id, request_id)
    db_conn("UPDATE traces SET state = 'succeeded', end_time = now()")
    again = h.start_trace(servers, case.case_id, grant.grant_id, request_id)
    assert again.trace_id == first.trace_id
    assert again.state == pb.TRACE_STATE_SUCCEEDED
    fresh = h.start_trace(servers, case.case_id, grant.grant_id)  # a new trace of the grant
    assert fresh.trace_id != first.trace_id


def test_revoke_cancels_queued_traces_and_notifications(
    servers: Servers, official: clients.ExposureClient, db_conn: Query
) -> None:
    case = h.report_case(servers, person(servers)[1])
    grant = h.grant_access(servers, case.case_id)
    trace = h.start_trace(servers, case.case_id, grant.grant_id)
    add_notifications(db_conn, trace, grant, ["queued", "sent"])
    h.revoke(servers, grant.grant_id)
    got = official.rpc.GetTrace(pb.GetTraceRequest(trace_id=trace.trace_id)).trace
    assert got.state == pb.TRACE_STATE_CANCELLED
    assert got.HasField("end_time")
    states = official.rpc.ListNotifications(pb.ListNotificationsRequest(trace_id=trace.trace_id))
    assert [n.state for n in states.notifications] == [
        pb.NOTIFICATION_STATE_CANCELLED,
        pb.NOTIFICATION_STATE_SENT,
    ]
    [row] = audit_rows(db_conn, "RevokeAccessGrant")
    details = json.loads(row["details"])
    assert (details["traces_cancelled"], details["notifications_cancelled"]) == (1, 1)


def test_list_traces_newest_first_with_filters(
    servers: Servers, official: clients.ExposureClient, db_conn: Query
) -> None:
    traces = []
    for _ in range(3):
        case = h.report_case(servers, person(servers)[1])
        grant = h.grant_access(servers, case.case_id)
        traces.append(h.start_trace(servers, case.case_id, grant.grant_id))
    db_conn("UPDATE traces SET state = 'failed' WHERE trace_id = $1", uuid.UUID(traces[0].trace_id))
    seen: list[str] = []
    for page in every_page(
        lambda token: official.rpc.ListTraces(pb.ListTracesRequest(page_size=2, page_token=token))
    ):
        seen.extend(t.trace_id for t in page.traces)
    assert seen == [t.trace_id for t in reversed(traces)]
    queued = official.rpc.ListTraces(pb.ListTracesRequest(state=pb.TRACE_STATE_QUEUED))
    assert [t.trace_id for t in queued.traces] == [traces[2].trace_id, traces[1].trace_id]
    of_case = official.rpc.ListTraces(pb.ListTracesRequest(case_id=traces[0].case_id))
    assert [t.trace_id for t in of_case.traces] == [traces[0].trace_id]


# -- trace contacts ------------------------------------------------------------------


def succeed_trace(
    servers: Servers, db_conn: Query, trace: pb.Trace, levels: Sequence[int]
) -> list[str]:
    """Write a finished trace's contacts the way the trace worker does; returns the
    contacts' person ids in row order."""
    store = keys.open_keystore(servers.settings.keystore_dir, servers.settings.secrets_dir)
    trace_id, case_id = uuid.UUID(trace.trace_id), uuid.UUID(trace.case_id)
    key = store.case_key(case_id)
    start = trace.window.start_time.ToDatetime(dt.UTC)
    people = []
    venue = uuid.uuid4()
    for row, level in enumerate(levels):
        person_id = uuid.uuid4()
        people.append(str(person_id))
        db_conn(
            "INSERT INTO trace_contacts (trace_id, row_number, case_id, contact_ref, level_rank,"
            " venue_id, case_visit_start, case_visit_end, contact_stay_start, contact_stay_end,"
            " overlap, stay_end_estimated, rule, person_index, person_enc)"
            " SELECT $1, $2, $3, $4, $5, $6, t, t + interval '1 hour', t,"
            " t + interval '30 minutes', interval '30 minutes', true,"
            " 'indoor overlap of 15 minutes or more', $8, $9 FROM (SELECT $7::timestamptz) AS v(t)",
            trace_id,
            row,
            case_id,
            f"c{row}",
            level,
            venue,
            start + dt.timedelta(minutes=row),
            store.person_index(person_id.bytes),
            key.encrypt(person_id.bytes, b"contact|" + trace_id.bytes),
        )
    counts = {"high": levels.count(HIGH), "medium": levels.count(MEDIUM), "low": levels.count(LOW)}
    db_conn(
        "UPDATE traces SET state = 'succeeded', start_time = now(), end_time = now(),"
        " visits_found = 2, visits_searched = 2, contacts_found = $2, level_counts = $3::jsonb"
        " WHERE trace_id = $1",
        trace_id,
        len(levels),
        json.dumps(counts),
    )
    return people


def test_list_trace_contacts_highest_first_paginated_without_identities(
    servers: Servers, official: clients.ExposureClient, db_conn: Query
) -> None:
    case = h.report_case(servers, person(servers)[1])
    grant = h.grant_access(servers, case.case_id)
    trace = h.start_trace(servers, case.case_id, grant.grant_id)
    with pytest.raises(clients.FailedPrecondition):
        official.rpc.ListTraceContacts(pb.ListTraceContactsRequest(trace_id=trace.trace_id))
    levels = [LOW, HIGH, MEDIUM, HIGH, LOW, MEDIUM, HIGH]
    succeed_trace(servers, db_conn, trace, levels)
    h.revoke(servers, grant.grant_id)  # listing without identities needs no grant
    got = official.rpc.GetTrace(pb.GetTraceRequest(trace_id=trace.trace_id)).trace
    assert got.state == pb.TRACE_STATE_SUCCEEDED
    assert [(c.risk_level, c.people) for c in got.level_counts] == [
        (HIGH, 3),
        (MEDIUM, 2),
        (LOW, 2),
    ]
    seen: list[pb.TraceContact] = []
    for page in every_page(
        lambda token: official.rpc.ListTraceContacts(
            pb.ListTraceContactsRequest(trace_id=trace.trace_id, page_size=2, page_token=token)
        )
    ):
        seen.extend(page.trace_contacts)
    assert [c.contact_ref for c in seen] == ["c1", "c3", "c6", "c2", "c5", "c0", "c4"]
    assert all(c.person_id == "" for c in seen)
    assert seen[0].overlap.ToTimedelta() == dt.timedelta(minutes=30)
    assert seen[0].stay_end_estimated
    at_least = official.rpc.ListTraceContacts(
        pb.ListTraceContactsRequest(trace_id=trace.trace_id, min_risk_level=MEDIUM)
    )
    assert [c.risk_level for c in at_least.trace_contacts] == [HIGH] * 3 + [MEDIUM] * 2
    assert audit_rows(db_conn, "ListTraceContacts") == []


def test_contact_identities_only_under_an_active_grant_each_audited(
    servers: Servers, official: clients.ExposureClient, db_conn: Query
) -> None:
    case = h.report_case(servers, person(servers)[1])
    grant = h.grant_access(servers, case.case_id)
    trace = h.start_trace(servers, case.case_id, grant.grant_id)
    people = succeed_trace(servers, db_conn, trace, [HIGH, LOW, MEDIUM])
    request = pb.ListTraceContactsRequest(trace_id=trace.trace_id, include_person_ids=True)
    listed = official.rpc.ListTraceContacts(request).trace_contacts
    assert [c.person_id for c in listed] == [people[0], people[2], people[1]]
    [row] = audit_rows(db_conn, "ListTraceContacts")
    assert json.loads(row["details"]) == {"person_ids_decrypted": 3}
    assert (str(row["case_id"]), str(row["grant_id"])) == (case.case_id, grant.grant_id)

    expire_grant(db_conn, grant.grant_id)
    with pytest.raises(clients.PermissionDenied) as caught:
        official.rpc.ListTraceContacts(request)
    assert caught.value.reason == "GRANT_EXPIRED"
    fresh = h.grant_access(servers, case.case_id)
    assert len(official.rpc.ListTraceContacts(request).trace_contacts) == 3  # a new grant
    h.revoke(servers, fresh.grant_id)
    with pytest.raises(clients.PermissionDenied) as caught:
        official.rpc.ListTraceContacts(request)
    assert caught.value.reason == "GRANT_REVOKED"
    assert _refusals(db_conn, "ListTraceContacts") == [
        ("GRANT_EXPIRED", None),
        ("GRANT_REVOKED", None),
    ]


def test_identities_of_a_case_without_any_grant_are_refused(
    servers: Servers, official: clients.ExposureClient, db_conn: Query
) -> None:
    """A trace row whose case never had a grant (written behind the API's back)."""
    case = h.report_case(servers, person(servers)[1])
    other = h.report_case(servers, person(servers)[1])
    grant = h.grant_access(servers, other.case_id)
    trace = h.start_trace(servers, other.case_id, grant.grant_id)
    db_conn(
        "UPDATE traces SET case_id = $2 WHERE trace_id = $1",
        uuid.UUID(trace.trace_id),
        uuid.UUID(case.case_id),
    )
    with pytest.raises(clients.PermissionDenied) as caught:
        official.rpc.ListTraceContacts(
            pb.ListTraceContactsRequest(trace_id=trace.trace_id, include_person_ids=True)
        )
    assert caught.value.reason == "NO_ACTIVE_GRANT"
    assert _refusals(db_conn, "ListTraceContacts") == [("NO_ACTIVE_GRANT", None)]


def test_list_trace_contacts_refuses_bad_input(
    servers: Servers, official: clients.ExposureClient
) -> None:
    bad = [
        (pb.ListTraceContactsRequest(), "trace_id"),
        (pb.ListTraceContactsRequest(trace_id="x"), "trace_id"),
        (pb.ListTraceContactsRequest(trace_id=str(uuid.uuid4()), page_size=1001), "page_size"),
        (pb.ListTraceContactsRequest(trace_id=str(uuid.uuid4()), page_size=-1), "page_size"),
        (pb.ListTraceContactsRequest(trace_id=str(uuid.uuid4()), page_token="!!"), "page_token"),
        (
            pb.ListTraceContactsRequest(trace_id=str(uuid.uuid4()), min_risk_level=9),  # type: ignore[arg-type]
            "min_risk_level",
        ),
    ]
    for request, field in bad:
        with pytest.raises(clients.InvalidArgument) as caught:
            official.rpc.ListTraceContacts(request)
        assert caught.value.metadata["field"] == field, request
    with pytest.raises(clients.NotFound):
        official.rpc.ListTraceContacts(pb.ListTraceContactsRequest(trace_id=str(uuid.uuid4())))


# -- risk status ---------------------------------------------------------------------


def test_risk_status_none_by_default_and_reads_are_audited(
    servers: Servers, db_conn: Query
) -> None:
    person_id, selector = person(servers)
    status = h.risk_status(servers, selector)
    assert status.level == NONE
    assert not status.HasField("basis")
    with h.exposure(servers, h.REGISTRAR) as registrar:
        assert (
            registrar.rpc.GetRiskStatus(pb.GetRiskStatusRequest(person=selector)).risk_status
            == status
        )
    rows = audit_rows(db_conn, "GetRiskStatus")
    assert [(r["principal"], r["resource_id"]) for r in rows] == [
        (h.OFFICIAL, person_id),
        (h.REGISTRAR, person_id),
    ]
    # An expired status reads as none.
    db_conn(
        "INSERT INTO risk_status (person_id, level, expire_time, reason) VALUES"
        " ($1, 'high', now() - interval '1 minute', 'venue_contact')",
        uuid.UUID(person_id),
    )
    assert h.risk_status(servers, selector).level == NONE
    with pytest.raises(clients.NotFound):
        h.risk_status(servers, h.by_phone(phone()))


def test_clear_risk_status_needs_reason_and_note_for_other(
    servers: Servers, official: clients.ExposureClient
) -> None:
    _, selector = person(servers)
    for reason, note, field in [
        (common_pb2.RISK_CLEAR_REASON_UNSPECIFIED, "", "reason"),
        (77, "", "reason"),
        (common_pb2.RISK_CLEAR_REASON_OTHER, "", "note"),
        (common_pb2.RISK_CLEAR_REASON_NEGATIVE_TEST, "n" * 501, "note"),
    ]:
        with pytest.raises(clients.InvalidArgument) as caught:
            official.rpc.ClearRiskStatus(
                pb.ClearRiskStatusRequest(person=selector, reason=reason, note=note)  # type: ignore[arg-type]
            )
        assert caught.value.metadata["field"] == field


def test_a_reported_case_is_denied_at_the_door_and_admitted_once_cleared(
    servers: Servers, official: clients.ExposureClient, db_conn: Query
) -> None:
    venue = create_venue(servers)
    device = add_device(servers, db_conn, venue)
    enrolled = enroll(servers, phone())
    token = enrolled.personal_token.token
    with clients.CheckInClient(config(servers, "checkin", device)) as checkin:

        def outcome() -> int:
            request = cpb.GetEntryDecisionRequest(personal_token=token)
            return checkin.rpc.GetEntryDecision(request).outcome

        assert outcome() == cpb.SCAN_OUTCOME_ADMITTED
        h.report_case(servers, h.by_id(enrolled.person_id))
        wait_for(lambda: outcome() == cpb.SCAN_OUTCOME_DENIED, 5, "the case denied at the door")

        cleared = official.rpc.ClearRiskStatus(
            pb.ClearRiskStatusRequest(
                person=h.by_id(enrolled.person_id),
                reason=common_pb2.RISK_CLEAR_REASON_NEGATIVE_TEST,
            )
        ).risk_status
        assert cleared.level == NONE
        assert cleared.clear_reason == common_pb2.RISK_CLEAR_REASON_NEGATIVE_TEST
        assert cleared.HasField("clear_time")
        assert not cleared.HasField("expire_time")
        wait_for(lambda: outcome() == cpb.SCAN_OUTCOME_ADMITTED, 5, "admitted once cleared")

    again = official.rpc.ClearRiskStatus(
        pb.ClearRiskStatusRequest(
            person=h.by_id(enrolled.person_id), reason=common_pb2.RISK_CLEAR_REASON_OTHER, note="x"
        )
    ).risk_status
    assert again == cleared  # already none: nothing changes
    [row] = audit_rows(db_conn, "ClearRiskStatus")
    assert row["resource_id"] == enrolled.person_id
    assert json.loads(row["details"]) == {
        "previous_level": "RISK_LEVEL_HIGH",
        "reason": "negative_test",
        "note": "",
    }
    history = db_conn(
        "SELECT level FROM risk_history WHERE person_id = $1 ORDER BY change_id",
        uuid.UUID(enrolled.person_id),
    )
    assert [r["level"] for r in history] == ["high", "none"]


@pytest.mark.parametrize(
    ("reason", "changed"), [("venue_contact", True), ("confirmed_case", False)]
)
def test_report_case_never_shortens_a_longer_high_status(
    servers: Servers, db_conn: Query, reason: str, changed: bool
) -> None:
    person_id, selector = person(servers)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=30)
    db_conn(
        "INSERT INTO risk_status (person_id, level, expire_time, reason, rule) VALUES"
        " ($1, 'high', $2, $3, 'confirmed case')",
        uuid.UUID(person_id),
        later,
        reason,
    )
    h.report_case(servers, selector)
    status = h.risk_status(servers, selector)
    # A contact reported as a case is a confirmed case from then on (the basis an
    # appeal shows), and their HIGH lasts as long as it already did; a confirmed
    # case already HIGH for longer is left as it is.
    assert status.level == HIGH
    assert status.basis.reason == common_pb2.RISK_REASON_CONFIRMED_CASE
    assert status.basis.rule == "confirmed case"
    assert status.expire_time.ToDatetime(dt.UTC) == later.replace(microsecond=later.microsecond)
    [row] = audit_rows(db_conn, "ReportCase")
    assert json.loads(row["details"])["risk_changed"] is changed
    [last] = db_conn(
        "SELECT reason, level FROM risk_history WHERE person_id = $1"
        " ORDER BY change_id DESC LIMIT 1",
        uuid.UUID(person_id),
    )
    assert (last["reason"], last["level"]) == ("confirmed_case", "high")


def test_report_case_raises_a_lower_status(servers: Servers, db_conn: Query) -> None:
    person_id, selector = person(servers)
    db_conn(
        "INSERT INTO risk_status (person_id, level, expire_time, reason) VALUES"
        " ($1, 'medium', now() + interval '30 days', 'venue_contact')",
        uuid.UUID(person_id),
    )
    h.report_case(servers, selector)
    status = h.risk_status(servers, selector)
    assert (status.level, status.basis.reason) == (HIGH, common_pb2.RISK_REASON_CONFIRMED_CASE)


# -- notifications -------------------------------------------------------------------


def add_notifications(
    db_conn: Query, trace: pb.Trace, grant: pb.AccessGrant, states: list[str]
) -> list[str]:
    made = []
    for i, state in enumerate(states):
        notification_id = uuid.uuid4()
        made.append(str(notification_id))
        db_conn(
            "INSERT INTO notifications (notification_id, trace_id, grant_id, case_id, contact_ref,"
            " person_index, person_enc, risk_level, template, state, create_time)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, 'high', 'exposure-high-km-1', $8,"
            " now() + $9 * interval '1 millisecond')",
            notification_id,
            uuid.UUID(trace.trace_id),
            uuid.UUID(grant.grant_id),
            uuid.UUID(trace.case_id),
            f"c{i}",
            secrets.token_bytes(32),
            secrets.token_bytes(40),
            state,
            i,
        )
    return made


def test_list_notifications_oldest_first_without_recipients(
    servers: Servers, official: clients.ExposureClient, db_conn: Query
) -> None:
    case = h.report_case(servers, person(servers)[1])
    grant = h.grant_access(servers, case.case_id)
    trace = h.start_trace(servers, case.case_id, grant.grant_id)
    made = add_notifications(db_conn, trace, grant, ["queued", "sent", "failed", "queued"])
    seen: list[pb.Notification] = []
    for page in every_page(
        lambda token: official.rpc.ListNotifications(
            pb.ListNotificationsRequest(page_size=3, page_token=token)
        )
    ):
        seen.extend(page.notifications)
    assert [n.notification_id for n in seen] == made
    assert [n.state for n in seen] == [
        pb.NOTIFICATION_STATE_QUEUED,
        pb.NOTIFICATION_STATE_SENT,
        pb.NOTIFICATION_STATE_FAILED,
        pb.NOTIFICATION_STATE_QUEUED,
    ]
    assert seen[0].HasField("next_attempt_time")
    assert not seen[1].HasField("next_attempt_time")
    assert {n.trace_id for n in seen} == {trace.trace_id}
    assert {n.template for n in seen} == {"exposure-high-km-1"}
    assert "phone" not in str(pb.Notification.DESCRIPTOR.fields_by_name)
    queued = official.rpc.ListNotifications(
        pb.ListNotificationsRequest(state=pb.NOTIFICATION_STATE_QUEUED, trace_id=trace.trace_id)
    )
    assert [n.notification_id for n in queued.notifications] == [made[0], made[3]]
    other = official.rpc.ListNotifications(pb.ListNotificationsRequest(trace_id=str(uuid.uuid4())))
    assert list(other.notifications) == []


# -- hostile input -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "request_", "field"),
    [
        ("GetCase", pb.GetCaseRequest(case_id="1; DROP TABLE cases"), "case_id"),
        ("GetCase", pb.GetCaseRequest(), "case_id"),
        ("ListCases", pb.ListCasesRequest(page_size=5000), "page_size"),
        ("ListCases", pb.ListCasesRequest(page_token="garbage"), "page_token"),
        (
            "GetAccessRequest",
            pb.GetAccessRequestRequest(access_request_id="x"),
            "access_request_id",
        ),
        ("ListAccessRequests", pb.ListAccessRequestsRequest(case_id="x"), "case_id"),
        ("RevokeAccessGrant", pb.RevokeAccessGrantRequest(grant_id="x", reason="r"), "grant_id"),
        ("RevokeAccessGrant", pb.RevokeAccessGrantRequest(grant_id=str(uuid.uuid4())), "reason"),
        ("StartTrace", pb.StartTraceRequest(case_id="x"), "case_id"),
        ("StartTrace", pb.StartTraceRequest(case_id=str(uuid.uuid4()), grant_id="x"), "grant_id"),
        (
            "StartTrace",
            pb.StartTraceRequest(case_id=str(uuid.uuid4()), request_id="x"),
            "request_id",
        ),
        ("GetTrace", pb.GetTraceRequest(trace_id="\x00"), "trace_id"),
        ("ListTraces", pb.ListTracesRequest(state=17), "state"),  # type: ignore[arg-type]
        ("ListTraces", pb.ListTracesRequest(case_id="x"), "case_id"),
        ("ListNotifications", pb.ListNotificationsRequest(trace_id="x"), "trace_id"),
        ("ListNotifications", pb.ListNotificationsRequest(state=-3), "state"),  # type: ignore[arg-type]
        ("GetRiskStatus", pb.GetRiskStatusRequest(), "person"),
    ],
)
def test_hostile_input_is_refused_precisely(
    module_servers: Servers, method: str, request_: object, field: str
) -> None:
    with h.exposure(module_servers) as client, pytest.raises(clients.InvalidArgument) as caught:
        getattr(client.rpc, method)(request_)
    assert caught.value.metadata["field"] == field


def test_forged_page_tokens_are_refused(module_servers: Servers) -> None:
    """A token with the right filter fingerprint but a forged key is still refused."""
    from services.kernel import pagination

    forged = pagination.encode(["not a time", "x"], {"start": None, "end": None})
    with h.exposure(module_servers) as client, pytest.raises(clients.InvalidArgument) as caught:
        client.rpc.ListCases(pb.ListCasesRequest(page_token=forged))
    assert caught.value.reason == "INVALID_PAGE_TOKEN"
    contacts = pagination.encode(
        ["a", 1], {"trace_id": str(uuid.UUID(int=1)), "min": 2, "ids": False}
    )
    with h.exposure(module_servers) as client, pytest.raises(clients.InvalidArgument) as caught:
        client.rpc.ListTraceContacts(
            pb.ListTraceContactsRequest(trace_id=str(uuid.UUID(int=1)), page_token=contacts)
        )
    assert caught.value.reason == "INVALID_PAGE_TOKEN"


# -- the Ministry's flow, as the docs show it ----------------------------------------

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "ministry_flow.py"


def test_ministry_flow_example_runs_end_to_end(
    servers: Servers, db_conn: Query, tmp_path: Path
) -> None:
    """docs/examples/ministry_flow.py against running servers and a worker process:
    a case and a contact who stayed at the same indoor venue at the same time."""
    venue = create_venue(servers)
    device = add_device(servers, db_conn, venue)
    case_phone = phone()
    case_person = enroll(servers, case_phone)
    contact = enroll(servers, phone())
    bystander = enroll(servers, phone())  # at another venue: never a contact
    elsewhere = add_device(servers, db_conn, create_venue(servers, "Riverside Cafe"))
    now = dt.datetime.now(dt.UTC)
    stream = open_stream(servers, device)
    stream.send(
        batch(
            "b1",
            scan(1, case_person.personal_token.token, now - dt.timedelta(minutes=50)),
            scan(2, contact.personal_token.token, now - dt.timedelta(minutes=45)),
        )
    )
    assert [r.outcome for r in stream.ack().results] == [cpb.SCAN_OUTCOME_ADMITTED] * 2
    assert stream.end() is None
    stream.client.close()
    other = open_stream(servers, elsewhere)
    other.send(batch("b2", scan(1, bystander.personal_token.token, now - dt.timedelta(minutes=45))))
    assert other.ack().results[0].outcome == cpb.SCAN_OUTCOME_ADMITTED
    assert other.end() is None
    other.client.close()
    env = process_env(servers.settings)
    with worker_process(servers.settings, tmp_path / "worker.log") as worker:
        try:
            wait_for(
                lambda: db_conn("SELECT count(*) FROM checkins")[0][0] == 3, 60, "scans stored"
            )
            run = subprocess.run(
                [
                    sys.executable,
                    str(EXAMPLE),
                    "--exposure",
                    servers.target("exposure"),
                    "--pki-dir",
                    str(servers.pki.dir),
                    "--phone",
                    case_phone,
                    "--identify",
                    "--timeout",
                    "90",
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=150,
                check=False,
            )
        finally:
            stop_gracefully(worker, timeout=20)
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert "TRACE_STATE_SUCCEEDED" in out
    assert f"person {contact.person_id}" in out
    assert bystander.person_id not in out and case_person.person_id not in out
    assert "notifications: 1" in out
    assert case_phone not in out
    status = h.risk_status(servers, h.by_id(contact.person_id))
    assert status.level == HIGH
    assert h.risk_status(servers, h.by_id(bystander.person_id)).level == NONE
    actions = {r["action"].rsplit("/", 1)[-1] for r in db_conn("SELECT action FROM audit_events")}
    assert {"ReportCase", "CreateAccessRequest", "ApproveAccessRequest", "StartTrace"} <= actions
    assert "ListTraceContacts" in actions  # the identities decrypted, audited


# -- helpers -------------------------------------------------------------------------


class listening:
    """LISTEN on a channel as the migrator in a background loop; collects payloads."""

    def __init__(self, servers: Servers, channel: str) -> None:
        self.settings = servers.settings
        self.channel = channel
        self.heard: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> list[str]:
        self.thread.start()

        async def listen() -> asyncpg.Connection:
            conn: asyncpg.Connection = await asyncpg.connect(
                **db.connect_args(self.settings, db.MIGRATOR).kwargs()
            )
            await conn.add_listener(self.channel, lambda *args: self.heard.append(args[3]))
            return conn

        self.conn = asyncio.run_coroutine_threadsafe(listen(), self.loop).result(10)
        return self.heard

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.conn.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
