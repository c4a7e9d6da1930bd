"""EnrollPerson's two steps, through real servers with the certificates of two
organisations: a front-end cannot tell another organisation's number (or a case's,
or an erased one's) from a fresh one, the code it cannot read is the only way to
that person, and every way of not having the code is the same refusal."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
import stopcovid.client as clients
from stopcovid.checkin.v1 import checkin_service_pb2 as cpb
from stopcovid.common.v1 import common_pb2
from stopcovid.retention.v1 import retention_service_pb2 as rpb

from services.domain.people import verification
from services.kernel.config import Settings
from tests.support.checkin_helpers import (
    config,
    enroll_as,
    enroll_request,
    org_principal,
    sent_code,
    with_code,
)
from tests.support.database import Query
from tests.support.exposure_helpers import by_phone, report_case
from tests.support.servers import Pki, Servers, running_servers

REGISTRAR = "ROLE_REGISTRAR"
FAILED = "VERIFICATION_FAILED"


_config = config


def _front_end(servers: Servers, name: str, org: str) -> str:
    return org_principal(servers, name, REGISTRAR, org)


def _checkin(servers: Servers, stem: str) -> clients.CheckInClient:
    return clients.CheckInClient(_config(servers, "checkin", stem))


def _ask(servers: Servers, stem: str, phone: str) -> tuple[cpb.EnrollPersonResponse, Any]:
    """Step one, with the call: its initial and trailing metadata are compared too."""
    with _checkin(servers, stem) as checkin:
        answer, call = checkin.rpc.EnrollPerson.with_call(enroll_request(phone))
        return answer, (tuple(call.initial_metadata()), tuple(call.trailing_metadata()))


def _enroll(servers: Servers, stem: str, phone: str) -> cpb.EnrollPersonResponse:
    with _checkin(servers, stem) as checkin:
        return enroll_as(checkin, servers.settings, enroll_request(phone))


def _refusal(call: Callable[[], Any]) -> clients.StopCovidError:
    with pytest.raises(clients.StopCovidError) as caught:
        call()
    return caught.value


def _shape(answer: cpb.EnrollPersonResponse) -> cpb.EnrollPersonResponse:
    """The answer without its random parts: the verification id and expire time."""
    out = cpb.EnrollPersonResponse()
    out.CopyFrom(answer)
    assert uuid.UUID(out.verification_id)
    out.ClearField("verification_id")
    assert out.HasField("verification_expire_time")
    out.ClearField("verification_expire_time")
    return out


def _sms(settings: Settings) -> list[dict[str, str]]:
    path = settings.notify_file
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _sms_to(settings: Settings, phone: str) -> list[dict[str, str]]:
    return [m for m in _sms(settings) if m["to"] == phone]


def _audited(db_conn: Query, principal: str) -> list[tuple[Any, ...]]:
    rows = db_conn(
        "SELECT action, resource_type, outcome, error_reason, details FROM audit_events"
        " WHERE principal = $1 ORDER BY sequence",
        principal,
    )
    return [tuple(r) for r in rows]


def test_another_organisations_number_a_case_and_an_erased_one_answer_as_a_fresh_one(
    servers: Servers, db_conn: Query
) -> None:
    """Front-end B asks to enroll: a number A enrolled, A's number that is a
    confirmed case, a number whose person withdrew, and a number nobody enrolled.
    Every answer is CODE_SENT, equal field for field and in its metadata but for
    the random verification id and its time; each number gets one code; B's audit
    trail is the same for each; nothing of A's person changes."""
    a = _front_end(servers, "fe-a", "org-a")
    b = _front_end(servers, "fe-b", "org-b")
    theirs, case, erased, fresh = "+85516300001", "+85516300002", "+85516300003", "+85516300004"
    for phone in (theirs, case, erased):
        _enroll(servers, a, phone)
    report_case(servers, by_phone(case))
    with clients.RetentionClient(_config(servers, "retention", a)) as retention:
        retention.rpc.WithdrawConsent(rpb.WithdrawConsentRequest(person=by_phone(erased)))
    before = db_conn("SELECT * FROM people ORDER BY person_id")
    sent_before = len(_sms(servers.settings))

    answers = {phone: _ask(servers, b, phone) for phone in (fresh, theirs, case, erased)}
    shapes = {phone: (_shape(answer), meta) for phone, (answer, meta) in answers.items()}
    assert shapes[fresh][0].state == cpb.ENROLLMENT_STATE_CODE_SENT
    assert shapes[fresh][0] == cpb.EnrollPersonResponse(state=cpb.ENROLLMENT_STATE_CODE_SENT)
    for phone in (theirs, case, erased):
        assert shapes[phone] == shapes[fresh], phone
    lifetimes = {
        phone: answer.verification_expire_time.ToDatetime(dt.UTC) - dt.datetime.now(dt.UTC)
        for phone, (answer, _) in answers.items()
    }
    assert all(dt.timedelta(0) < life <= dt.timedelta(minutes=10) for life in lifetimes.values())
    assert len({answer.verification_id for answer, _ in answers.values()}) == 4

    sent = _sms(servers.settings)[sent_before:]  # one code to each number, and no more
    assert [m["to"] for m in sent] == list(answers)
    for message, (answer, _) in zip(sent, answers.values(), strict=True):
        assert message["notification_id"] == answer.verification_id
        code = sent_code(servers.settings, answer)
        assert message["text"] == verification.text(code, servers.settings.enrollment_code_ttl_s)

    audited = _audited(db_conn, "fe-b")
    assert (
        audited
        == [("person.enroll.code_sent", "enrollment_challenge", "succeeded", "", audited[0][4])] * 4
    )
    assert json.loads(audited[0][4]) == {"caller_organization": "org-b"}
    assert db_conn("SELECT * FROM people ORDER BY person_id") == before
    assert not db_conn("SELECT 1 FROM person_organizations")


def test_the_right_code_makes_another_organisations_person_the_callers_too(
    servers: Servers, db_conn: Query
) -> None:
    """With the code sent to A's person's number, B gets the same person (and a
    token of theirs), linked and not moved; from then on B finds the person by
    number, a second ask is answered at once, and withdrawal through B erases the
    person and the links."""
    a = _front_end(servers, "fe-a", "org-a")
    b = _front_end(servers, "fe-b", "org-b")
    phone = "+85516300011"
    first = _enroll(servers, a, phone)
    assert first.state == cpb.ENROLLMENT_STATE_ENROLLED and first.newly_enrolled

    linked = _enroll(servers, b, phone)
    assert linked.state == cpb.ENROLLMENT_STATE_ENROLLED
    assert linked.person_id == first.person_id and not linked.newly_enrolled
    assert linked.personal_token.token == first.personal_token.token
    assert linked.enroll_time == first.enroll_time
    assert not linked.verification_id and not linked.HasField("verification_expire_time")
    person = uuid.UUID(first.person_id)
    assert db_conn("SELECT enrolled_by FROM people")[0][0] == "org-a"
    links = db_conn("SELECT person_id, organization FROM person_organizations")
    assert [tuple(r) for r in links] == [(person, "org-b")]
    assert not db_conn("SELECT 1 FROM enrollment_challenges")

    again, _ = _ask(servers, b, phone)  # now one of B's people: no code
    assert (again.state, again.person_id) == (cpb.ENROLLMENT_STATE_ENROLLED, first.person_id)
    assert len(_sms_to(servers.settings, phone)) == 2  # A's code, and B's
    with _checkin(servers, b) as checkin:
        tokens = checkin.rpc.IssuePersonalToken(
            cpb.IssuePersonalTokenRequest(
                person=by_phone(phone), form=cpb.PERSONAL_TOKEN_FORM_STATIC
            )
        )
    assert tokens.personal_tokens[0].token == first.personal_token.token
    # A's person still: A finds them as before.
    with _checkin(servers, a) as checkin:
        checkin.rpc.IssuePersonalToken(
            cpb.IssuePersonalTokenRequest(
                person=common_pb2.PersonSelector(person_id=first.person_id),
                form=cpb.PERSONAL_TOKEN_FORM_STATIC,
            )
        )

    with clients.RetentionClient(_config(servers, "retention", b)) as retention:
        retention.rpc.WithdrawConsent(rpb.WithdrawConsentRequest(person=by_phone(phone)))
    assert not db_conn("SELECT 1 FROM people")
    assert not db_conn("SELECT 1 FROM person_organizations")


def test_every_way_of_not_having_the_code_is_the_same_refusal(
    servers: Servers, db_conn: Query
) -> None:
    """A wrong code, a used one, an expired one, one spent by too many wrong codes,
    another organisation's verification id, and the right id and code for another
    number: PERMISSION_DENIED VERIFICATION_FAILED with the same message and
    metadata, each audited, and nothing enrolled by any."""
    a = _front_end(servers, "fe-a", "org-a")
    b = _front_end(servers, "fe-b", "org-b")
    phone, other = "+85516300021", "+85516300022"
    attempts = servers.settings.enrollment_code_attempts

    def wrong(code: str) -> str:
        return f"{(int(code) + 1) % 10**6:06d}"

    with _checkin(servers, b) as checkin:

        def ask(number: str = phone) -> tuple[cpb.EnrollPersonRequest, Any, str]:
            request = enroll_request(number)
            answer = checkin.rpc.EnrollPerson(request)
            return request, answer, sent_code(servers.settings, answer)

        def answer_with(request: Any, answer: Any, code: str) -> Callable[[], Any]:
            return lambda: checkin.rpc.EnrollPerson(with_code(request, answer, code))

        refusals: dict[str, clients.StopCovidError] = {}
        request, answer, code = ask()
        refusals["wrong code"] = _refusal(answer_with(request, answer, wrong(code)))
        assert checkin.rpc.EnrollPerson(with_code(request, answer, code)).person_id
        refusals["used"] = _refusal(answer_with(request, answer, code))

        request, answer, code = ask(other)
        db_conn(
            "UPDATE enrollment_challenges SET create_time = now() - interval '1 hour',"
            " expire_time = now() - interval '1 second' WHERE verification_id = $1",
            uuid.UUID(answer.verification_id),
        )
        refusals["expired"] = _refusal(answer_with(request, answer, code))

        request, answer, code = ask(other)
        for i in range(attempts):
            refusals[f"wrong code {i}"] = _refusal(answer_with(request, answer, wrong(code)))
        refusals["spent"] = _refusal(answer_with(request, answer, code))

        request, answer, code = ask(other)
        refusals["another number"] = _refusal(answer_with(enroll_request(phone), answer, code))
        # That attempt counted against the challenge, and the challenge still works.
        survivor = (request, answer, code)

    with _checkin(servers, a) as checkin:
        refusals["another organisation's id"] = _refusal(
            lambda: checkin.rpc.EnrollPerson(with_code(*survivor))
        )
    for cause, err in refusals.items():
        assert isinstance(err, clients.PermissionDenied), cause
        assert (err.reason, err.message, dict(err.metadata)) == (
            FAILED,
            refusals["wrong code"].message,
            dict(refusals["wrong code"].metadata),
        ), cause
    assert [r[0] for r in db_conn("SELECT count(*) FROM people")] == [1]  # `phone` only
    denied = db_conn(
        "SELECT principal, error_reason, resource_type FROM audit_events WHERE outcome = 'denied'"
    )
    assert sorted(tuple(r) for r in denied) == sorted(
        [("fe-b", FAILED, "enrollment_challenge")] * (len(refusals) - 1)
        + [("fe-a", FAILED, "enrollment_challenge")]
    )
    with _checkin(servers, b) as checkin:
        assert checkin.rpc.EnrollPerson(with_code(*survivor)).person_id


@pytest.fixture
def bounded(settings: Settings, pki: Pki) -> Iterator[Servers]:
    """Servers that allow 2 codes per number and 4 per organisation."""
    own = replace(settings, enrollment_codes_per_number=2, enrollment_codes_per_organization=4)
    with running_servers(own, pki) as servers:
        yield servers


def test_a_front_end_cannot_flood_a_number_or_the_gateway_with_codes(
    bounded: Servers, db_conn: Query
) -> None:
    """Codes outstanding are bounded per (organisation, number) and per organisation:
    one more is RESOURCE_EXHAUSTED VERIFICATION_LIMIT, audited, and sends nothing.
    The bound is the asker's own: another organisation may still ask; a code that
    expired frees its place."""
    servers = bounded
    a = _front_end(servers, "fe-a", "org-a")
    b = _front_end(servers, "fe-b", "org-b")
    target = "+85516300031"
    for _ in range(2):
        _ask(servers, b, target)
    err = _refusal(lambda: _ask(servers, b, target))
    assert isinstance(err, clients.ResourceExhausted)
    assert err.reason == "VERIFICATION_LIMIT"
    assert err.metadata["limit"] == "per_number"
    assert 0 < int(err.metadata["retry_after_s"]) <= 600
    assert target not in err.message
    assert len(_sms_to(servers.settings, target)) == 2
    _ask(servers, a, target)  # A's bound is A's

    _ask(servers, b, "+85516300032")
    _ask(servers, b, "+85516300033")
    err = _refusal(lambda: _ask(servers, b, "+85516300034"))
    assert (err.reason, err.metadata["limit"]) == ("VERIFICATION_LIMIT", "per_organization")
    assert not _sms_to(servers.settings, "+85516300034")

    db_conn(
        "UPDATE enrollment_challenges SET create_time = now() - interval '1 hour',"
        " expire_time = now() - interval '1 second' WHERE organization = 'org-b'"
        " AND verification_id IN (SELECT verification_id FROM enrollment_challenges"
        " WHERE organization = 'org-b' ORDER BY create_time LIMIT 1)"
    )
    answer, _ = _ask(servers, b, target)
    assert answer.state == cpb.ENROLLMENT_STATE_CODE_SENT
    denied = db_conn(
        "SELECT error_reason, details FROM audit_events WHERE outcome = 'denied' ORDER BY sequence"
    )
    assert [(r[0], json.loads(r[1])["limit"]) for r in denied] == [
        ("VERIFICATION_LIMIT", "per_number"),
        ("VERIFICATION_LIMIT", "per_organization"),
    ]


def test_expiry_deletes_dead_challenges_and_an_inactive_persons_links(
    servers: Servers, db_conn: Query
) -> None:
    """Challenges past their expire time are deleted by every expiry run (live ones
    stay); a linked person expired as an inactive enrollment takes their links."""
    a = _front_end(servers, "fe-a", "org-a")
    b = _front_end(servers, "fe-b", "org-b")
    dead, live = (_ask(servers, b, p)[0] for p in ("+85516300041", "+85516300042"))
    db_conn(
        "UPDATE enrollment_challenges SET create_time = now() - interval '1 hour',"
        " expire_time = now() - interval '1 second' WHERE verification_id = $1",
        uuid.UUID(dead.verification_id),
    )
    config = _config(servers, "retention", "dev-retention-officer")
    with clients.RetentionClient(config) as retention:
        retention.rpc.RunExpiry(rpb.RunExpiryRequest(data_classes=[rpb.DATA_CLASS_GRIEVANCES]))
    left = db_conn("SELECT verification_id FROM enrollment_challenges")
    assert [str(r[0]) for r in left] == [live.verification_id]

    phone = "+85516300043"
    _enroll(servers, a, phone)
    _enroll(servers, b, phone)
    assert len(db_conn("SELECT 1 FROM person_organizations")) == 1
    db_conn("UPDATE people SET last_activity_time = now() - interval '400 days'")
    with clients.RetentionClient(config) as retention:
        retention.rpc.RunExpiry(
            rpb.RunExpiryRequest(data_classes=[rpb.DATA_CLASS_INACTIVE_ENROLLMENTS])
        )
    assert not db_conn("SELECT 1 FROM people")
    assert not db_conn("SELECT 1 FROM person_organizations")


def test_no_number_and_no_code_in_logs_audit_errors_or_the_challenge_table(
    servers: Servers, db_conn: Query, capsys: pytest.CaptureFixture[str]
) -> None:
    """A whole run (codes asked, a wrong one, a limit, the right one): the numbers
    and codes are nowhere but in the SMS file; the challenge rows hold a 32-byte
    index and hash, neither of which is (or contains) the number or the code."""
    b = _front_end(servers, "fe-b", "org-b")
    phone = "+85516300051"
    with _checkin(servers, b) as checkin:
        request = enroll_request(phone)
        answer = checkin.rpc.EnrollPerson(request)
        code = sent_code(servers.settings, answer)
        rows = db_conn("SELECT * FROM enrollment_challenges")
        (row,) = rows
        stored = b"".join(v if isinstance(v, bytes) else str(v).encode() for v in row.values())
        for secret in (phone, phone[1:], code):
            assert secret.encode() not in stored
        assert len(row["phone_index"]) == len(row["code_hash"]) == 32
        assert "code" not in row.keys() and "phone" not in row.keys()  # noqa: SIM118
        wrong = f"{(int(code) + 1) % 10**6:06d}"
        errors = [
            _refusal(lambda: checkin.rpc.EnrollPerson(with_code(request, answer, wrong))),
        ]
        for _ in range(2):
            checkin.rpc.EnrollPerson(request)
        errors.append(_refusal(lambda: checkin.rpc.EnrollPerson(request)))
        assert checkin.rpc.EnrollPerson(with_code(request, answer, code)).person_id
    said = capsys.readouterr()
    texts = [said.out, said.err]
    texts += [f"{e.message} {e.metadata}" for e in errors]
    texts += [json.dumps([str(v) for v in r]) for r in db_conn("SELECT * FROM audit_events")]
    for text in texts:
        for secret in (phone, phone[1:], code):
            assert secret not in text


def test_the_code_sms_is_khmer_then_english_within_its_segments() -> None:
    for ttl in (60, 600, 3599, 3600):
        text = verification.text("012345", ttl)
        khmer, english = text.split("\n")
        assert "012345" in khmer and "012345" in english
        assert any("\u1780" <= c <= "\u17ff" for c in khmer)
        assert english.startswith("Your Stop COVID code is 012345.")
        assert f"{ttl // 60} minutes" in english
        assert verification.segments(ttl) <= verification.MAX_SEGMENTS


def test_codes_are_six_digits_and_their_hash_binds_id_and_number() -> None:
    key = verification.code_key(b"k" * 32)
    one, two = uuid.uuid4(), uuid.uuid4()
    index, other = b"i" * 32, b"j" * 32
    codes = {verification.new_code() for _ in range(200)}
    assert all(verification.CODE.match(c) for c in codes) and len(codes) > 150
    digest = verification.code_hash(key, one, index, "123456")
    ok = verification.matches(key, one, index, "123456", stored_index=index, stored_hash=digest)
    assert ok
    for vid, idx, code in ((two, index, "123456"), (one, other, "123456"), (one, index, "123457")):
        assert not verification.matches(key, vid, idx, code, stored_index=index, stored_hash=digest)


def test_the_first_question_reads_as_much_for_another_organisations_number_as_for_none(
    servers: Servers, db_conn: Query
) -> None:
    """EnrollPerson's first statement ("is this one of the caller's people") reads
    the same number of buffers for numbers another organisation enrolled (or linked)
    as for numbers nobody enrolled: no row of theirs is found and then rejected, so
    its time says nothing either. (Reading people by phone_index and filtering on
    enrolled_by read 5 buffers against 2.)"""
    a = _front_end(servers, "fe-a", "org-a")
    c = _front_end(servers, "fe-c", "org-c")
    with _checkin(servers, a) as checkin:
        for i in range(200):
            enroll_as(checkin, servers.settings, enroll_request(f"+855164{i:06d}"))
    _enroll(servers, c, "+855164000000")  # linked to org-c as well
    theirs = [
        r[0]
        for r in db_conn(
            "SELECT phone_index FROM people WHERE person_id NOT IN"
            " (SELECT person_id FROM person_organizations) ORDER BY person_id LIMIT 20"
        )
    ]
    nobodys = [verification.code_key(bytes([i]) * 32) for i in range(20)]  # 32 bytes each
    # Settle what autovacuum would otherwise change mid-test (the visibility map an
    # index-only probe consults, the statistics the plan is chosen by), so the
    # counts below compare the statement's work, not the tables' housekeeping.
    for table in ("people", "person_organizations"):
        db_conn(f"VACUUM (ANALYZE) {table}")

    def buffers(index: bytes, org: str) -> int:
        (plan,) = db_conn(
            "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + verification.Q["enrolled_here"],
            index,
            "v1",
            "km",
            org,
        )[0]
        top = json.loads(plan)[0]["Plan"]
        return int(top["Shared Hit Blocks"]) + int(top.get("Shared Read Blocks", 0))

    for org in ("org-b", "org-c"):
        read = {buffers(index, org) for index in theirs}
        assert read == {buffers(index, org) for index in nobodys}, org
        assert len(read) == 1, org
