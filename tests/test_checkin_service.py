"""CheckInService against a real server and Postgres: enrollment, tokens, the scan
stream's per-scan answers, entry decisions and self check-in."""

from __future__ import annotations

import datetime as dt
import itertools
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
import stopcovid.client as clients
from stopcovid.checkin.v1 import checkin_service_pb2 as pb
from stopcovid.client import ClientConfig, RetryPolicy
from stopcovid.common.v1 import common_pb2
from stopcovid.venue.v1 import venue_service_pb2 as vpb

from services.domain.people.tokens import PersonalTokens
from services.kernel.config import Settings
from services.kernel.keys import open_keystore
from tests.support.checkin_helpers import (
    ENTRY,
    EXIT,
    DeviceStream,
    add_device,
    batch,
    config,
    create_venue,
    denied_door,
    enroll,
    erasures_applied,
    now,
    open_stream,
    scan,
)
from tests.support.database import Query
from tests.support.metrics import changes as metric_changes
from tests.support.metrics import samples as metric_samples
from tests.support.servers import Pki, Servers, running_servers
from tests.support.waits import wait_for

R = pb.ScanRejectReason
BATCHES = "stopcovid_checkin_batch_scans_count"
"""Batches a CheckIn server took (the count of its histogram of scans per batch)."""


def test_enrolling_a_number_twice_returns_the_same_person(servers: Servers, db_conn: Query) -> None:
    first = enroll(servers, "+85512000001")
    again = enroll(servers, "+85512000001")
    other = enroll(servers, "+85512000002")
    assert first.newly_enrolled and not again.newly_enrolled
    assert again.person_id == first.person_id != other.person_id
    assert first.personal_token.token == again.personal_token.token
    rows = db_conn("SELECT phone_index, phone_enc FROM people")
    assert len(rows) == 2
    for row in rows:
        # Neither the index nor the ciphertext carries the number in the clear.
        assert b"85512000001" not in row["phone_enc"] + row["phone_index"]
    actions = [r["action"] for r in db_conn("SELECT action FROM audit_events ORDER BY sequence")]
    # A new number: a code, then the enrollment; the caller's own number: at once.
    assert actions == [
        "person.enroll.code_sent",
        "person.enroll",
        "person.enroll",
        "person.enroll.code_sent",
        "person.enroll",
    ]
    assert not db_conn("SELECT 1 FROM enrollment_challenges")  # used, so deleted


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"phone_number": "012345678", "consent_given": True}, "phone_number"),
        ({"phone_number": "+855 12 345", "consent_given": True}, "phone_number"),
        ({"phone_number": "+85512000003", "consent_given": False}, "consent_given"),
        (
            {"phone_number": "+85512000003", "consent_given": True, "language_code": "k m"},
            "language_code",
        ),
    ],
)
def test_enrollment_refuses_bad_input(
    servers: Servers, request_fields: dict[str, object], field: str
) -> None:
    fields = {"consent_text_version": "v1", **request_fields}
    with (
        clients.CheckInClient(config(servers, "checkin", "dev-registrar")) as checkin,
        pytest.raises(clients.InvalidArgument) as caught,
    ):
        checkin.rpc.EnrollPerson(pb.EnrollPersonRequest(**fields))  # type: ignore[arg-type]
    assert caught.value.metadata.get("field") == field


def test_tokens_by_every_selector_and_both_forms(servers: Servers) -> None:
    person = enroll(servers, "+85512000010")
    with clients.CheckInClient(config(servers, "checkin", "dev-registrar")) as checkin:
        for selector in (
            common_pb2.PersonSelector(person_id=person.person_id),
            common_pb2.PersonSelector(phone_number="+85512000010"),
            common_pb2.PersonSelector(personal_token=person.personal_token.token),
        ):
            static = checkin.rpc.IssuePersonalToken(
                pb.IssuePersonalTokenRequest(person=selector, form=pb.PERSONAL_TOKEN_FORM_STATIC)
            ).personal_tokens
            assert [t.token for t in static] == [person.personal_token.token]
        rotating = checkin.rpc.IssuePersonalToken(
            pb.IssuePersonalTokenRequest(
                person=common_pb2.PersonSelector(person_id=person.person_id),
                form=pb.PERSONAL_TOKEN_FORM_ROTATING,
                window_count=3,
            )
        )
        tokens = rotating.personal_tokens
        assert len({t.token for t in tokens}) == 3
        assert tokens[0].expire_time == tokens[1].start_time
        assert rotating.window.seconds == 60
        with pytest.raises(clients.NotFound):
            checkin.rpc.IssuePersonalToken(
                pb.IssuePersonalTokenRequest(
                    person=common_pb2.PersonSelector(phone_number="+85512999999"),
                    form=pb.PERSONAL_TOKEN_FORM_STATIC,
                )
            )
        with pytest.raises(clients.InvalidArgument):
            checkin.rpc.IssuePersonalToken(
                pb.IssuePersonalTokenRequest(
                    person=common_pb2.PersonSelector(person_id=person.person_id),
                    form=pb.PERSONAL_TOKEN_FORM_ROTATING,
                    window_count=97,
                )
            )


def test_a_stream_acks_each_batch_with_a_result_per_scan(servers: Servers, db_conn: Query) -> None:
    venue = create_venue(servers)
    device = add_device(servers, db_conn, venue)
    people = [enroll(servers, f"+8551200010{i}") for i in range(3)]
    stream = open_stream(servers, device)
    assert stream.settings is not None
    assert stream.settings.device_id == device
    assert stream.settings.venue_id == venue
    assert stream.settings.last_stored_sequence == 0
    stream.send(batch("b1", *(scan(i + 1, p.personal_token.token) for i, p in enumerate(people))))
    stream.send(batch("b2", scan(4, people[0].personal_token.token, direction=EXIT)))
    acks = {a.batch_id: a for a in (stream.ack(), stream.ack())}
    assert [r.outcome for r in acks["b1"].results] == [pb.SCAN_OUTCOME_ADMITTED] * 3
    assert [r.sequence for r in acks["b1"].results] == [1, 2, 3]
    assert acks["b1"].highest_sequence == 3
    assert acks["b2"].results[0].outcome == pb.SCAN_OUTCOME_ADMITTED
    assert stream.end() is None
    # Acknowledged means committed: the rows are in the inbox now.
    rows = db_conn("SELECT * FROM scan_inbox ORDER BY sequence")
    assert [r["sequence"] for r in rows] == [1, 2, 3, 4]
    assert {r["venue_id"] for r in rows} == {uuid.UUID(venue)}
    person_bytes = {uuid.UUID(p.person_id).bytes for p in people}
    for row in rows:
        assert row["person_ref"] not in person_bytes
        assert not any(pb_ in row["person_enc"] for pb_ in person_bytes)
    # Same person, same day: same pseudonym; different people: different ones.
    assert rows[0]["person_ref"] == rows[3]["person_ref"] != rows[1]["person_ref"]


def test_each_bad_scan_gets_its_precise_reason_and_the_rest_is_stored(
    servers: Servers, db_conn: Query
) -> None:
    venue = create_venue(servers)
    device = add_device(servers, db_conn, venue)
    good = enroll(servers, "+85512000201").personal_token.token
    erased = enroll(servers, "+85512000202")
    db_conn("INSERT INTO erased_people (person_id) VALUES ($1)", uuid.UUID(erased.person_id))
    erasures_applied(servers, db_conn, device)
    kind, kid, body = good.split(".")
    # A canonical spelling with one character changed: genuine-looking, wrong MAC.
    forged = f"{kind}.{kid}.{body[:10]}{'A' if body[10] != 'A' else 'B'}{body[11:]}"
    unknown_key = f"{kind}.t999.{body}"
    with clients.CheckInClient(config(servers, "checkin", "dev-registrar")) as checkin:
        old_rotating = (
            checkin.rpc.IssuePersonalToken(
                pb.IssuePersonalTokenRequest(
                    person=common_pb2.PersonSelector(personal_token=good),
                    form=pb.PERSONAL_TOKEN_FORM_ROTATING,
                )
            )
            .personal_tokens[0]
            .token
        )
    t = now()
    scans = [
        scan(1, good),  # admitted
        scan(2, forged),
        scan(3, unknown_key),
        scan(4, "not a token"),
        scan(5, good, at=t - dt.timedelta(days=4)),
        scan(6, good, at=t + dt.timedelta(hours=1)),
        scan(7, old_rotating, at=t + dt.timedelta(minutes=4)),
        scan(8, erased.personal_token.token),
        pb.Scan(sequence=9, personal_token=good, direction=ENTRY),  # no time
        pb.Scan(
            sequence=0, personal_token=good, scan_time=scan(1, good).scan_time, direction=ENTRY
        ),
        scan(1, good),  # the same scan again in the batch
        scan(10, good),  # admitted
    ]
    scans[10].scan_time.CopyFrom(scans[0].scan_time)
    stream = open_stream(servers, device)
    stream.send(batch("hostile", *scans))
    results = stream.ack().results
    got = [(r.outcome, r.reject_reason) for r in results]
    rej = pb.SCAN_OUTCOME_REJECTED
    assert got == [
        (pb.SCAN_OUTCOME_ADMITTED, 0),
        (rej, R.Value("SCAN_REJECT_REASON_BAD_TOKEN_SIGNATURE")),
        (rej, R.Value("SCAN_REJECT_REASON_UNKNOWN_KEY_ID")),
        (rej, R.Value("SCAN_REJECT_REASON_MALFORMED_TOKEN")),
        (rej, R.Value("SCAN_REJECT_REASON_SCAN_TIME_TOO_OLD")),
        (rej, R.Value("SCAN_REJECT_REASON_SCAN_TIME_IN_FUTURE")),
        (rej, R.Value("SCAN_REJECT_REASON_TOKEN_EXPIRED")),
        (rej, R.Value("SCAN_REJECT_REASON_PERSON_NOT_ENROLLED")),
        (rej, R.Value("SCAN_REJECT_REASON_MALFORMED_SCAN")),
        (rej, R.Value("SCAN_REJECT_REASON_MALFORMED_SCAN")),
        (pb.SCAN_OUTCOME_DUPLICATE, 0),
        (pb.SCAN_OUTCOME_ADMITTED, 0),
    ]
    # A reused sequence number (different scan, same number) on a new stream.
    assert stream.end() is None
    again = open_stream(servers, device)
    assert again.settings is not None and again.settings.last_stored_sequence == 10
    resent = scan(1, good)
    resent.scan_time.CopyFrom(scans[0].scan_time)
    again.send(batch("resend", resent, scan(10, good, at=t - dt.timedelta(minutes=1))))
    results = again.ack().results
    assert results[0].outcome == pb.SCAN_OUTCOME_DUPLICATE
    assert results[1].reject_reason == R.Value("SCAN_REJECT_REASON_SEQUENCE_REUSED")
    assert again.end() is None
    assert [r["sequence"] for r in db_conn("SELECT sequence FROM scan_inbox ORDER BY 1")] == [1, 10]


def test_batch_level_refusals_end_the_stream_precisely(servers: Servers, db_conn: Query) -> None:
    venue = create_venue(servers)
    device = add_device(servers, db_conn, venue)
    token = enroll(servers, "+85512000301").personal_token.token
    empty = open_stream(servers, device)
    empty.send(batch("empty"))
    err = empty.ended_with()
    assert isinstance(err, clients.InvalidArgument) and err.metadata["field"] == "scans"
    big = open_stream(servers, device)
    big.send(batch("big", *(scan(i, token) for i in range(1, 1002))))
    err = big.ended_with()
    assert isinstance(err, clients.InvalidArgument) and err.metadata["field"] == "scans"
    with clients.CheckInClient(config(servers, "checkin", "dev-device")) as checkin:
        with pytest.raises(clients.PermissionDenied) as caught:
            list(checkin.rpc.StreamScans(iter([batch("x", scan(1, token))]), timeout=10))
        assert caught.value.reason == "DEVICE_REVOKED"


def test_a_revoked_device_is_cut_off_mid_stream(servers: Servers, db_conn: Query) -> None:
    venue = create_venue(servers)
    device = add_device(servers, db_conn, venue)
    token = enroll(servers, "+85512000401").personal_token.token
    stream = open_stream(servers, device)
    stream.send(batch("b1", scan(1, token)))
    assert stream.ack().results[0].outcome == pb.SCAN_OUTCOME_ADMITTED
    db_conn(
        "UPDATE devices SET state = 'revoked', revoke_time = now() WHERE device_id = $1",
        uuid.UUID(device),
    )
    err = stream.ended_with(timeout=5)
    assert isinstance(err, clients.PermissionDenied) and err.reason == "DEVICE_REVOKED"
    with (
        clients.CheckInClient(config(servers, "checkin", device)) as checkin,
        pytest.raises(clients.PermissionDenied),
    ):
        checkin.rpc.CheckIn(pb.CheckInRequest(scan=scan(2, token)))


def test_a_high_risk_person_is_denied_by_notify_and_others_admitted(
    settings: Settings, pki: Pki, db_conn: Query
) -> None:
    """The caches' full reload is an hour away: a risk set HIGH reaches the door by
    the risk NOTIFY (push, sub-second by design; the delay is printed with -s)."""
    with running_servers(replace(settings, cache_refresh_s=3600.0), pki) as servers:
        _deny_high_risk(servers, db_conn)


def _deny_high_risk(servers: Servers, db_conn: Query) -> None:
    venue = create_venue(servers)
    device = add_device(servers, db_conn, venue)
    risky = enroll(servers, "+85512000501")
    fine = enroll(servers, "+85512000502")
    stream = open_stream(servers, device)
    db_conn(
        "INSERT INTO risk_status (person_id, level, expire_time)"
        " VALUES ($1, 'high', now() + interval '14 days')",
        uuid.UUID(risky.person_id),
    )
    set_at = time.monotonic()
    seq = 0

    def is_denied() -> bool:
        nonlocal seq
        seq += 1
        stream.send(batch(f"b{seq}", scan(seq, risky.personal_token.token)))
        return stream.ack().results[0].outcome == pb.SCAN_OUTCOME_DENIED

    wait_for(is_denied, timeout=30, what="the HIGH person denied at the door")
    print(f"denied {time.monotonic() - set_at:.3f}s after the risk was set")
    stream.send(
        batch(
            "after",
            scan(seq + 1, risky.personal_token.token),
            scan(seq + 2, risky.personal_token.token, direction=EXIT),
            scan(seq + 3, fine.personal_token.token),
        )
    )
    results = stream.ack().results
    assert results[0].outcome == pb.SCAN_OUTCOME_DENIED
    uuid.UUID(results[0].decision_id)
    assert [r.outcome for r in results[1:]] == [pb.SCAN_OUTCOME_ADMITTED] * 2
    with clients.CheckInClient(config(servers, "checkin", device)) as checkin:
        decide = checkin.rpc.GetEntryDecision
        assert (
            decide(pb.GetEntryDecisionRequest(personal_token=risky.personal_token.token)).outcome
            == pb.SCAN_OUTCOME_DENIED
        )
        assert (
            decide(pb.GetEntryDecisionRequest(personal_token=fine.personal_token.token)).outcome
            == pb.SCAN_OUTCOME_ADMITTED
        )
        refused = decide(pb.GetEntryDecisionRequest(personal_token="S1.t1.xyz"))
        assert refused.outcome == pb.SCAN_OUTCOME_REJECTED
    db_conn("UPDATE risk_status SET level = 'low' WHERE person_id = $1", uuid.UUID(risky.person_id))
    seq += 3
    denials = 2  # the first scan denied above, and the one in "after"

    def admitted() -> bool:
        nonlocal seq, denials
        seq += 1
        stream.send(batch(f"cleared{seq}", scan(seq, risky.personal_token.token)))
        if stream.ack().results[0].outcome == pb.SCAN_OUTCOME_ADMITTED:
            return True
        denials += 1
        return False

    wait_for(admitted, timeout=30, what="the cleared person admitted")
    denied = db_conn("SELECT outcome, decision_id FROM scan_inbox WHERE outcome = 'denied'")
    assert len(denied) == denials
    assert results[0].decision_id in {str(r["decision_id"]) for r in denied}


def test_unary_check_in_is_stored_once_when_retried(servers: Servers, db_conn: Query) -> None:
    venue = create_venue(servers)
    device = add_device(servers, db_conn, venue)
    token = enroll(servers, "+85512000601").personal_token.token
    one = scan(7, token)
    with clients.CheckInClient(config(servers, "checkin", device)) as checkin:
        first = checkin.rpc.CheckIn(pb.CheckInRequest(scan=one)).result
        again = checkin.rpc.CheckIn(pb.CheckInRequest(scan=one)).result
    assert first.outcome == pb.SCAN_OUTCOME_ADMITTED
    assert again.outcome == pb.SCAN_OUTCOME_DUPLICATE
    assert len(db_conn("SELECT 1 FROM scan_inbox")) == 1


def test_self_check_in_verifies_the_venue_signature(servers: Servers, db_conn: Query) -> None:
    from services.domain.people.tokens import VenueCodes
    from services.kernel.keys import open_keystore

    venue = create_venue(servers, "Riverside Cafe")
    store = open_keystore(servers.settings.keystore_dir, servers.settings.secrets_dir)
    code, _ = VenueCodes(store.venue_public_keys(), store.venue_signing_key()).sign(
        uuid.UUID(venue)
    )
    token = enroll(servers, "+85512000701").personal_token.token
    request_id = str(uuid.uuid4())
    with clients.CheckInClient(config(servers, "checkin", "dev-registrar")) as checkin:

        def check_in(venue_code: str, rid: str = "") -> pb.SelfCheckInResponse:
            reply: pb.SelfCheckInResponse = checkin.rpc.SelfCheckIn(
                pb.SelfCheckInRequest(
                    venue_code=venue_code,
                    personal_token=token,
                    scan_time=scan(0, token).scan_time,
                    direction=ENTRY,
                    request_id=rid,
                )
            )
            return reply

        ok = check_in(code, request_id)
        assert ok.result.outcome == pb.SCAN_OUTCOME_ADMITTED
        assert (ok.venue_id, ok.venue_display_name) == (venue, "Riverside Cafe")
        assert check_in(code, request_id).result.outcome == pb.SCAN_OUTCOME_ADMITTED
        other_venue = uuid.uuid4().bytes
        kind, kid, body = code.split(".")
        import base64

        raw = base64.urlsafe_b64decode(body + "==")
        tampered = base64.urlsafe_b64encode(other_venue + raw[16:]).rstrip(b"=").decode()
        bad = check_in(f"{kind}.{kid}.{tampered}")
        assert bad.result.reject_reason == R.Value("SCAN_REJECT_REASON_BAD_VENUE_SIGNATURE")
        assert bad.venue_id == ""
        garbage = check_in("https://example.org/not-a-venue")
        assert garbage.result.reject_reason == R.Value("SCAN_REJECT_REASON_MALFORMED_VENUE_CODE")
    # The retry with the same request id stored nothing more.
    assert len(db_conn("SELECT 1 FROM scan_inbox")) == 1
    assert db_conn("SELECT device_id, sequence FROM scan_inbox")[0]["device_id"] is None


def test_a_flooding_device_is_cut_off_and_others_keep_being_served(
    settings: Settings, pki: Pki, db_conn: Query
) -> None:
    # Slow commits and a window of 2 make "more than the window unacknowledged"
    # certain rather than a race.
    slow = replace(settings, commit_interval_ms=400.0, max_in_flight_batches=2)
    with running_servers(slow, pki) as servers:
        venue = create_venue(servers)
        flooder, calm = add_device(servers, db_conn, venue), add_device(servers, db_conn, venue)
        token = enroll(servers, "+85512000801").personal_token.token
        flood = open_stream(servers, flooder)
        assert flood.settings is not None and flood.settings.max_in_flight_batches == 2
        for i in range(1, 4):
            flood.send(batch(f"f{i}", scan(i, token)))
        err = flood.ended_with()
        assert isinstance(err, clients.ResourceExhausted) and err.reason == "RATE_LIMITED"
        other = open_stream(servers, calm)
        other.send(batch("c1", scan(1, token)))
        assert other.ack().results[0].outcome == pb.SCAN_OUTCOME_ADMITTED
        assert other.end() is None
    # The flooder's first two batches were accepted before the cut: committed once
    # each; the third was refused and is not stored.
    stored = db_conn("SELECT device_id, sequence FROM scan_inbox ORDER BY 1, 2")
    assert sorted((str(r["device_id"]), r["sequence"]) for r in stored) == sorted(
        [(flooder, 1), (flooder, 2), (calm, 1)]
    )


def test_a_lagging_inbox_slows_acks_and_tells_the_device(
    settings: Settings, pki: Pki, db_conn: Query
) -> None:
    # No workers run here, so the inbox only grows; past the limit the server
    # holds each batch before its commit and sends flow-control hints.
    lagging = replace(settings, inbox_lag_limit=20)
    with running_servers(lagging, pki) as servers:
        venue = create_venue(servers)
        device = add_device(servers, db_conn, venue)
        token = enroll(servers, "+85512000901").personal_token.token
        stream = open_stream(servers, device)
        stream.send(batch("fill", *(scan(i, token) for i in range(1, 101))))
        assert len(stream.ack().results) == 100
        # The server reads the lag twice a second: a scan at a time until a batch
        # arrives after it has seen the lag, and is answered with a hint first.
        sequences = itertools.count(101)
        hints: list[pb.FlowControlHint] = []

        def hinted() -> bool:
            sequence = next(sequences)
            stream.send(batch(f"next-{sequence}", scan(sequence, token)))
            while (message := stream.recv()).WhichOneof("kind") != "ack":
                if message.WhichOneof("kind") == "flow_control":
                    hints.append(message.flow_control)
            return bool(hints)

        wait_for(hinted, timeout=30, what="a flow-control hint once the server sees the lag")
        assert stream.end() is None
    hint = hints[0]
    assert hint.retry_after.ToTimedelta() > dt.timedelta(0)
    assert 1 <= hint.max_in_flight_batches < 8


def test_registered_device_streams_and_revoking_it_closes_its_stream(servers: Servers) -> None:
    """The operator's flow, through the RPCs only: register a device, stream with the
    credential it got, revoke it; the open stream ends (by NOTIFY, not at the next
    cache reload, which is a minute away)."""
    venue = create_venue(servers)
    token = enroll(servers, "+85512001001").personal_token.token
    with clients.VenueClient(config(servers, "venue", "dev-venue-operator")) as venues:
        registered = venues.rpc.RegisterDevice(
            vpb.RegisterDeviceRequest(device=vpb.Device(venue_id=venue, display_name="Gate 1"))
        )
        credential = registered.credential
        device_config = ClientConfig(
            target=servers.target("checkin"),
            ca_cert_pem=credential.ca_certificate_pem.encode(),
            client_cert_pem=credential.certificate_pem.encode(),
            client_key_pem=credential.private_key_pem.encode(),
            retry=RetryPolicy(max_attempts=1),
        )
        stream = DeviceStream(clients.CheckInClient(device_config)).start()
        stream.send(batch("b1", scan(1, token)))
        assert stream.ack().results[0].outcome == pb.SCAN_OUTCOME_ADMITTED
        venues.rpc.RevokeDevice(
            vpb.RevokeDeviceRequest(device_id=registered.device.device_id, reason="stolen")
        )
        err = stream.ended_with(timeout=30)
    assert isinstance(err, clients.PermissionDenied) and err.reason == "DEVICE_REVOKED"


def test_out_of_order_and_repeated_sequence_numbers(servers: Servers, db_conn: Query) -> None:
    """Resends arrive out of order: each new number is stored, each repeat is a
    DUPLICATE, on the same stream and on the next one."""
    venue = create_venue(servers)
    device = add_device(servers, db_conn, venue)
    token = enroll(servers, "+85512001101").personal_token.token
    at = now()
    scans = {n: scan(n, token, at=at - dt.timedelta(seconds=n)) for n in (1, 2, 3, 5, 8, 9)}
    stream = open_stream(servers, device)
    stream.send(batch("b1", scans[9], scans[2], scans[5]))
    stream.send(batch("b2", scans[1], scans[9], scans[8], scans[2]))
    acks = {a.batch_id: a for a in (stream.ack(), stream.ack())}
    assert [r.outcome for r in acks["b1"].results] == [pb.SCAN_OUTCOME_ADMITTED] * 3
    assert [r.outcome for r in acks["b2"].results] == [
        pb.SCAN_OUTCOME_ADMITTED,
        pb.SCAN_OUTCOME_DUPLICATE,
        pb.SCAN_OUTCOME_ADMITTED,
        pb.SCAN_OUTCOME_DUPLICATE,
    ]
    assert stream.end() is None
    again = open_stream(servers, device)
    again.send(batch("b3", scans[3], scans[8], scans[1]))
    assert [r.outcome for r in again.ack().results] == [
        pb.SCAN_OUTCOME_ADMITTED,
        pb.SCAN_OUTCOME_DUPLICATE,
        pb.SCAN_OUTCOME_DUPLICATE,
    ]
    assert again.end() is None
    stored = db_conn("SELECT sequence FROM scan_inbox ORDER BY 1")
    assert [r["sequence"] for r in stored] == [1, 2, 3, 5, 8, 9]


def test_a_revocation_whose_notification_was_lost_is_caught_by_the_reload(
    settings: Settings, pki: Pki, db_conn: Query
) -> None:
    """With the triggers' NOTIFY gone (as if the listener had been down), the
    periodic full reload still ends a revoked device's open stream."""
    quick = replace(settings, cache_refresh_s=1.0)
    with running_servers(quick, pki) as servers:
        venue = create_venue(servers)
        device = add_device(servers, db_conn, venue)
        token = enroll(servers, "+85512001201").personal_token.token
        stream = open_stream(servers, device)
        stream.send(batch("b1", scan(1, token)))
        assert stream.ack().results[0].outcome == pb.SCAN_OUTCOME_ADMITTED
        db_conn("ALTER TABLE devices DISABLE TRIGGER devices_notify")
        db_conn(
            "UPDATE devices SET state = 'revoked', revoke_time = now() WHERE device_id = $1",
            uuid.UUID(device),
        )
        err = stream.ended_with(timeout=30)
    assert isinstance(err, clients.PermissionDenied) and err.reason == "DEVICE_REVOKED"


def test_a_suspended_venue_refuses_scans_until_resumed(servers: Servers, db_conn: Query) -> None:
    venue = create_venue(servers)
    device = add_device(servers, db_conn, venue)
    token = enroll(servers, "+85512001301").personal_token.token
    stream = open_stream(servers, device)
    with clients.VenueClient(config(servers, "venue", "dev-venue-operator")) as venues:
        venues.rpc.SuspendVenue(vpb.SuspendVenueRequest(venue_id=venue, reason="inspection"))
        answers: list[tuple[int, int]] = []

        def outcome() -> tuple[int, int]:
            seq = len(answers) + 1
            stream.send(batch(f"b{seq}", scan(seq, token)))
            result = stream.ack().results[0]
            answers.append((result.outcome, result.reject_reason))
            return answers[-1]

        refused = (pb.SCAN_OUTCOME_REJECTED, R.Value("SCAN_REJECT_REASON_VENUE_SUSPENDED"))
        wait_for(lambda: outcome() == refused, timeout=30)  # the suspension arrives by NOTIFY
        venues.rpc.ResumeVenue(vpb.ResumeVenueRequest(venue_id=venue))
        wait_for(lambda: outcome() == (pb.SCAN_OUTCOME_ADMITTED, 0), timeout=30)
    assert stream.end() is None
    # Stored: exactly the admitted scans (one before the suspension arrived, maybe).
    admitted = answers.count((pb.SCAN_OUTCOME_ADMITTED, 0))
    assert db_conn("SELECT count(*) FROM scan_inbox")[0][0] == admitted


def test_scans_and_tokens_record_activity_for_retention(
    settings: Settings, pki: Pki, db_conn: Query
) -> None:
    """Inactive enrollments expire by people.last_activity_time: a scan or a token
    issued counts as activity, recorded by the server in the background and when it
    stops."""
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=40)
    with running_servers(settings, pki) as servers:
        venue = create_venue(servers)
        device = add_device(servers, db_conn, venue)
        scanned = enroll(servers, "+85512000901")
        idle = enroll(servers, "+85512000902")
        db_conn("UPDATE people SET last_activity_time = $1", old)
        stream = open_stream(servers, device)
        stream.send(batch("a1", scan(1, scanned.personal_token.token)))
        assert stream.ack().results[0].outcome == pb.SCAN_OUTCOME_ADMITTED
        assert stream.end() is None
    rows = db_conn("SELECT person_id::text, last_activity_time FROM people")
    activity = {r["person_id"]: r["last_activity_time"] for r in rows}
    assert activity[idle.person_id] == old
    assert activity[scanned.person_id] > old + dt.timedelta(days=39)


def test_a_photographed_phone_code_cannot_be_replayed_with_a_back_dated_scan(
    settings: Settings, pki: Pki, db_conn: Query
) -> None:
    """The device reports the scan time; the server judges a rotating token by its own
    clock at receipt as well (3 s windows and no offline allowance here, so that the
    test need not wait an hour)."""
    fast = replace(settings, token_window_s=3, rotating_token_offline_s=0.0)
    with running_servers(fast, pki) as servers:
        venue = create_venue(servers)
        device = add_device(servers, db_conn, venue)
        good = enroll(servers, "+85512009901").personal_token.token
        with clients.CheckInClient(config(servers, "checkin", "dev-registrar")) as checkin:
            issued = checkin.rpc.IssuePersonalToken(
                pb.IssuePersonalTokenRequest(
                    person=common_pb2.PersonSelector(personal_token=good),
                    form=pb.PERSONAL_TOKEN_FORM_ROTATING,
                )
            ).personal_tokens[0]
        photographed_at = issued.start_time.ToDatetime(dt.UTC)
        stream = open_stream(servers, device)
        stream.send(batch("now", scan(1, issued.token, at=photographed_at)))
        fresh = stream.ack().results[0]
        ended = issued.expire_time.ToDatetime(dt.UTC).timestamp()
        wait_for(lambda: time.time() > ended + 4, what="the token's window to be long over")
        stream.send(batch("replayed", scan(2, issued.token, at=photographed_at)))
        replayed = stream.ack().results[0]
        assert stream.end() is None
    assert fresh.outcome == pb.SCAN_OUTCOME_ADMITTED
    assert replayed.outcome == pb.SCAN_OUTCOME_REJECTED
    assert replayed.reject_reason == R.Value("SCAN_REJECT_REASON_TOKEN_EXPIRED")


def test_a_cached_rotating_token_is_judged_again_at_every_scan(
    settings: Settings, pki: Pki, db_conn: Query
) -> None:
    """The server caches what a token verified to (the decryption is the costly part),
    never its freshness: a phone code taken once, for a scan recorded offline inside
    its window, is refused when it comes again outside the window, by every path that
    takes one (the stream, the unary CheckIn, GetEntryDecision)."""
    windowed = replace(settings, token_window_s=60, rotating_token_offline_s=3600.0)
    with running_servers(windowed, pki) as servers:
        venue = create_venue(servers)
        device = add_device(servers, db_conn, venue)
        person = uuid.UUID(enroll(servers, "+85512009911").person_id)
        store = open_keystore(settings.keystore_dir, settings.secrets_dir)
        codes = PersonalTokens(*store.token_keys(), windowed.token_window_s)
        recorded_at = now() - dt.timedelta(minutes=5)
        code = codes.issue_rotating(person, codes.window_of(recorded_at))
        stream = open_stream(servers, device)
        stream.send(batch("offline", scan(1, code, at=recorded_at)))
        taken = stream.ack().results[0]
        stream.send(batch("again", scan(2, code)))
        again = stream.ack().results[0]
        assert stream.end() is None
        with clients.CheckInClient(config(servers, "checkin", device)) as door:
            unary = door.rpc.CheckIn(pb.CheckInRequest(scan=scan(3, code))).result
            decision = door.rpc.GetEntryDecision(pb.GetEntryDecisionRequest(personal_token=code))
    assert taken.outcome == pb.SCAN_OUTCOME_ADMITTED
    expired = (pb.SCAN_OUTCOME_REJECTED, R.Value("SCAN_REJECT_REASON_TOKEN_EXPIRED"))
    assert (again.outcome, again.reject_reason) == expired
    assert (unary.outcome, unary.reject_reason) == expired
    assert (decision.outcome, decision.reject_reason) == expired


def test_a_device_that_never_reads_its_acks_is_cut_off(
    settings: Settings, pki: Pki, db_conn: Query, tmp_path: Path
) -> None:
    """gRPC holds what it cannot send; a device that sends its window's batches and
    then reads nothing would keep their acks in the server's memory for as long as
    it liked. Here the device is a process stopped (SIGSTOP) once the server has
    taken two of its batches: its window fills, the server's write blocks (and its
    reader stops at the stream's held bytes), and the write timeout ends the stream.
    Denied scans make the acks big (a decision id each), so the socket does fill.
    The device cannot be told why (the status waits behind the acks it does not
    read): the server counts how its streams ended (its metrics)."""
    bounded = replace(settings, max_in_flight_batches=64, stream_write_timeout_s=1.0)
    endings = metric_samples("stopcovid_checkin_stream_endings_total")
    decided = metric_samples(BATCHES)
    with running_servers(bounded, pki) as servers:
        device, token = denied_door(servers, db_conn, "+85512009801")
        checkin = servers.servicers["checkin"]
        ca, cert, key = servers.pki.files(device)
        how_ended = tmp_path / "ended"
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _NEVER_READS,
                servers.target("checkin"),
                str(ca),
                str(cert),
                str(key),
                token,
                str(how_ended),
            ],
        )
        try:
            # Stopped once the server has taken two batches: the second's ack cannot
            # follow the first's through the device's 64 KB window, so its write
            # waits. Stopped after one batch only, the device would hold just one
            # ack, which its window takes, and nothing would be slow.
            wait_for(
                lambda: sum(metric_changes(decided, metric_samples(BATCHES)).values()) >= 2,
                what="the server to take two batches",
            )
            child.send_signal(signal.SIGSTOP)
            wait_for(lambda: not checkin._streams, timeout=60, what="the stream to be ended")
            child.send_signal(signal.SIGCONT)
            assert child.wait(timeout=60) == 0
        finally:
            child.kill()
            child.wait(timeout=30)  # reaped, so a failure above is reported as itself
    assert how_ended.read_text() != "OK"
    ended = metric_changes(endings, metric_samples("stopcovid_checkin_stream_endings_total"))
    assert ended == {(("reason", "SLOW_READER"),): 1}


_NEVER_READS = """
import asyncio, datetime as dt, signal, sys
from pathlib import Path
import grpc, grpc.aio
from google.protobuf import timestamp_pb2
from stopcovid.checkin.v1 import checkin_service_pb2 as pb
from stopcovid.checkin.v1 import checkin_service_pb2_grpc as pb_grpc
from stopcovid.client.errors import from_rpc_error
target, ca, cert, key, token, ended = sys.argv[1:]
async def main():
    creds = grpc.ssl_channel_credentials(
        Path(ca).read_bytes(), Path(key).read_bytes(), Path(cert).read_bytes())
    # No BDP probing: the client's flow-control windows stay small, so what it does
    # not read stays on the server's side.
    options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 65535)]
    async with grpc.aio.secure_channel(target, creds, options) as channel:
        call = pb_grpc.CheckInServiceStub(channel).StreamScans(timeout=120)
        at = timestamp_pb2.Timestamp()
        at.FromDatetime(dt.datetime.now(dt.UTC))
        # Writes wait once the server stops reading (its held-bytes bound), so they
        # go on in a task; the device reads only once it is continued (SIGCONT).
        resume = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGCONT, resume.set)
        async def send():
            for b in range(64):
                scans = [pb.Scan(sequence=b * 1000 + i + 1, personal_token=token, scan_time=at,
                                 direction=1) for i in range(1000)]
                batch = pb.ScanBatch(batch_id=str(b), scans=scans)
                await call.write(pb.StreamScansRequest(batch=batch))
        writer = asyncio.create_task(send())
        await resume.wait()
        try:
            async for _ in call:
                pass
            Path(ended).write_text("OK")
        except grpc.aio.AioRpcError as err:
            mapped = from_rpc_error(err)
            Path(ended).write_text(f"{err.code().name} {mapped.reason}")
asyncio.run(main())
"""
