"""Data-subject requests against real servers: an export holds exactly the
person's data (and nobody else's, though they were at the same venues at the same
times), and after withdrawal of consent nothing left can be tied to them."""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path

import pytest
import stopcovid.client as clients
from stopcovid.checkin.v1 import checkin_service_pb2 as cpb
from stopcovid.common.v1 import common_pb2
from stopcovid.retention.v1 import retention_service_pb2 as pb

from services.kernel import keys
from services.retention.data_subject import exported_check_ins, exported_denials, pseudonyms
from services.retention.queries.data_subject import CaseRecord, Visit
from tests.support.accountability_helpers import (
    Door,
    deny_entry,
    keystore,
    move_inbox,
    retention,
    seed_trace,
    set_high_risk,
)
from tests.support.checkin_helpers import add_device, config, create_venue, enroll, now, open_stream
from tests.support.database import Query
from tests.support.servers import Servers
from tests.support.waits import wait_for

PHONE_A, PHONE_B, PHONE_CASE = "+85512000301", "+85512000302", "+85512000303"


def export(servers: Servers, **selector: str) -> pb.ExportPersonDataResponse:
    with retention(servers, "dev-registrar") as front:
        reply: pb.ExportPersonDataResponse = front.rpc.ExportPersonData(
            pb.ExportPersonDataRequest(person=common_pb2.PersonSelector(**selector))
        )
        return reply


def visits(reply: pb.ExportPersonDataResponse) -> list[tuple[str, int, bool]]:
    return [(c.venue_id, c.scan_time.seconds, c.case_record) for c in reply.check_ins]


def test_export_holds_exactly_the_persons_data(servers: Servers, db_conn: Query) -> None:
    market = create_venue(servers, "Night Market")
    cafe = create_venue(servers, "Riverside Cafe")
    doors = {v: Door(open_stream(servers, add_device(servers, db_conn, v))) for v in (market, cafe)}
    a, b, case = enroll(servers, PHONE_A), enroll(servers, PHONE_B), enroll(servers, PHONE_CASE)
    a_id, b_id = uuid.UUID(a.person_id), uuid.UUID(b.person_id)
    base = now().replace(microsecond=0) - dt.timedelta(hours=5)
    expected_a: list[tuple[str, int, bool]] = []
    # Both visit both venues at the same times; A once more, yesterday.
    for step, venue in enumerate([market, cafe, market]):
        at = base + dt.timedelta(minutes=30 * step)
        for person in (a, b):
            assert doors[venue].scan(person.personal_token.token, at).outcome == (
                cpb.SCAN_OUTCOME_ADMITTED
            )
        expected_a.append((venue, int(at.timestamp()), False))
    yesterday = base - dt.timedelta(days=1)
    doors[cafe].scan(a.personal_token.token, yesterday)
    expected_a.append((cafe, int(yesterday.timestamp()), False))
    move_inbox(db_conn)
    # One more of each, after the move (stored directly, or in the inbox if refused).
    late = base + dt.timedelta(hours=2)
    doors[market].scan(a.personal_token.token, late)
    doors[market].scan(b.personal_token.token, late)
    expected_a.append((market, int(late.timestamp()), False))
    # A denial of A, then a lower level.
    set_high_risk(db_conn, a.person_id, cafe, "Riverside Cafe")
    device = db_conn("SELECT device_id FROM devices WHERE venue_id = $1", uuid.UUID(market))[0][0]
    decision = deny_entry(servers, doors[market], str(device), a.personal_token.token)
    denial_time = db_conn(
        "SELECT scan_time FROM checkins WHERE decision_id = $1"
        " UNION ALL SELECT scan_time FROM scan_inbox WHERE decision_id = $1",
        uuid.UUID(decision),
    )[0][0]
    # A denied scan is not a check-in: it is exported once, as the denial below.
    db_conn("UPDATE risk_status SET level = 'medium' WHERE person_id = $1", a_id)

    ks = keystore(servers.settings)
    kept_at = base - dt.timedelta(days=3)  # a case record whose day partition is gone
    ids = seed_trace(
        db_conn,
        ks,
        case_person=uuid.UUID(case.person_id),
        venue=market,
        contacts=[(a_id, "sent"), (b_id, "queued")],
        records=[(a_id, kept_at), (b_id, kept_at)],
    )
    expected_a.append((market, int(kept_at.timestamp()), True))
    expected_a.sort(key=lambda v: v[1])

    by_phone = export(servers, phone_number=PHONE_A)
    by_token = export(servers, personal_token=a.personal_token.token)
    by_id = export(servers, person_id=a.person_id)
    for reply in (by_phone, by_token, by_id):
        reply.ClearField("export_time")
    assert by_phone == by_token == by_id
    reply = export(servers, person_id=a.person_id)
    assert reply.enrollment.person_id == a.person_id
    assert reply.enrollment.phone_number == PHONE_A
    assert reply.enrollment.consent_text_version == "2026-11-km-1"
    assert visits(reply) == expected_a
    assert {c.venue_display_name for c in reply.check_ins} == {"Night Market", "Riverside Cafe"}
    assert [d.decision_id for d in reply.denials] == [decision]
    assert reply.denials[0].venue_id == market
    assert reply.denials[0].decision_time.ToDatetime(dt.UTC) == denial_time
    assert reply.risk_status.level == common_pb2.RISK_LEVEL_MEDIUM
    assert reply.risk_status.basis.venue_display_name == "Riverside Cafe"
    assert [n.risk_level for n in reply.notifications] == [common_pb2.RISK_LEVEL_MEDIUM]
    assert [(x.grant_id, x.outbreak_reference) for x in reply.data_accesses] == [
        (str(ids["grant"]), "OB-2026-017")
    ]
    assert reply.data_accesses[0].action == "stopcovid.exposure.v1.ExposureService/StartTrace"
    age = dt.datetime.now(dt.UTC) - reply.export_time.ToDatetime(dt.UTC)
    assert dt.timedelta(0) <= age < dt.timedelta(minutes=5)

    other = export(servers, phone_number=PHONE_B)
    assert other.enrollment.person_id == b.person_id
    # Same venues, same times; B had no denial, a queued (unsent) notification.
    assert len(other.check_ins) == 5
    assert not other.denials and not other.notifications
    assert other.risk_status.level == common_pb2.RISK_LEVEL_NONE
    raw = other.SerializeToString()
    for secret in (a.person_id, PHONE_A, decision):
        assert secret.encode() not in raw

    exports = db_conn(
        "SELECT details::text AS d, resource_id FROM audit_events WHERE action = $1",
        "stopcovid.retention.v1.RetentionService/ExportPersonData",
    )
    assert len(exports) == 5
    for row in exports:
        for secret in (a.person_id, b.person_id, PHONE_A, PHONE_B, "85512000301"):
            assert secret not in row["d"] + row["resource_id"]

    with retention(servers, "dev-registrar") as front:
        with pytest.raises(clients.NotFound) as caught:
            front.rpc.ExportPersonData(
                pb.ExportPersonDataRequest(
                    person=common_pb2.PersonSelector(phone_number="+85512999999")
                )
            )
        assert caught.value.reason == "NOT_FOUND"
        with pytest.raises(clients.InvalidArgument) as bad:
            front.rpc.ExportPersonData(
                pb.ExportPersonDataRequest(person=common_pb2.PersonSelector(phone_number="12"))
            )
        assert bad.value.metadata["field"] == "person.phone_number"
        with pytest.raises(clients.InvalidArgument):
            front.rpc.ExportPersonData(pb.ExportPersonDataRequest())


def test_after_withdrawal_the_person_is_gone(servers: Servers, db_conn: Query) -> None:
    market = create_venue(servers, "Night Market")
    device = add_device(servers, db_conn, market)
    door = Door(open_stream(servers, device))
    a, b, case = enroll(servers, PHONE_A), enroll(servers, PHONE_B), enroll(servers, PHONE_CASE)
    a_id, b_id = uuid.UUID(a.person_id), uuid.UUID(b.person_id)
    base = now().replace(microsecond=0) - dt.timedelta(hours=3)
    for step in range(3):
        for person in (a, b):
            door.scan(person.personal_token.token, base + dt.timedelta(minutes=20 * step))
    move_inbox(db_conn)
    door.scan(a.personal_token.token, base + dt.timedelta(hours=1))  # still in the inbox
    door.scan(b.personal_token.token, base + dt.timedelta(hours=1))
    db_conn(
        "INSERT INTO risk_status (person_id, level, expire_time, reason)"
        " VALUES ($1, 'low', now() + interval '10 days', 'venue_contact')",
        a_id,
    )
    ks = keystore(servers.settings)
    record_at = base - dt.timedelta(days=2)
    seed_trace(
        db_conn,
        ks,
        case_person=uuid.UUID(case.person_id),
        venue=market,
        contacts=[(a_id, "queued"), (b_id, "queued")],
        records=[(a_id, record_at)],
    )
    before_b = export(servers, person_id=b.person_id)

    with retention(servers, "dev-registrar") as front:
        reply = front.rpc.WithdrawConsent(
            pb.WithdrawConsentRequest(person=common_pb2.PersonSelector(phone_number=PHONE_A))
        )
        assert reply.unlinked_check_in_count == 4
        assert reply.retained_case_record_count == 1
        created = db_conn("SELECT max(create_time) FROM case_records")[0][0]
        assert reply.retained_until_time.ToDatetime(dt.UTC) == created + dt.timedelta(days=90)
        for selector in (
            common_pb2.PersonSelector(phone_number=PHONE_A),
            common_pb2.PersonSelector(person_id=a.person_id),
        ):
            with pytest.raises(clients.NotFound):
                front.rpc.ExportPersonData(pb.ExportPersonDataRequest(person=selector))
            with pytest.raises(clients.NotFound):
                front.rpc.WithdrawConsent(pb.WithdrawConsentRequest(person=selector))

    # Their tokens are refused at the door.
    with clients.CheckInClient(config(servers, "checkin", device)) as checkin:
        wait_for(
            lambda: (
                checkin.rpc.GetEntryDecision(
                    cpb.GetEntryDecisionRequest(personal_token=a.personal_token.token)
                ).reject_reason
                == cpb.SCAN_REJECT_REASON_PERSON_NOT_ENROLLED
            ),
            timeout=30,
            what="the CheckIn server to see the erasure",
        )
    refused = door.scan(a.personal_token.token)
    assert refused.reject_reason == cpb.SCAN_REJECT_REASON_PERSON_NOT_ENROLLED

    # Nothing linkable is left: no enrollment, no risk, no row under their
    # pseudonym, no ciphertext of their id; queued messages cancelled.
    assert not db_conn("SELECT 1 FROM people WHERE person_id = $1", a_id)
    assert not db_conn("SELECT 1 FROM risk_status WHERE person_id = $1", a_id)
    assert db_conn("SELECT 1 FROM erased_people WHERE person_id = $1", a_id)
    move_inbox(db_conn)
    rows = db_conn("SELECT * FROM checkins")
    assert len(rows) == 8
    # Each row under its own day's key: the scans three hours back fall on
    # the previous UTC day when the test runs just after midnight.
    day_keys = {day: ks.day_key(day, create=False) for day in {r["day"] for r in rows}}
    assert not [r for r in rows if r["person_ref"] == day_keys[r["day"]].pseudonym(a_id.bytes)]
    owners: list[uuid.UUID | None] = []
    for r in rows:
        if not r["person_enc"]:
            owners.append(None)
            continue
        owner = keys.open_row(
            day_keys[r["day"]],
            r["person_enc"],
            venue_id=r["venue_id"].bytes,
            device_id=r["device_id"].bytes,
            sequence=r["sequence"],
            day=r["day"],
        )
        owners.append(uuid.UUID(bytes=owner))
    assert owners.count(None) == 4 and owners.count(b_id) == 4 and a_id not in owners
    states = {
        r["person_index"]: r["state"]
        for r in db_conn("SELECT person_index, state FROM notifications")
    }
    assert states == {
        ks.person_index(a_id.bytes): "cancelled",
        ks.person_index(b_id.bytes): "queued",
    }
    assert len(db_conn("SELECT 1 FROM case_records")) == 1  # kept for the investigation

    # Somebody else's data is untouched.
    after_b = export(servers, person_id=b.person_id)
    before_b.ClearField("export_time")
    after_b.ClearField("export_time")
    assert after_b == before_b
    withdrawals = db_conn(
        "SELECT outcome, error_reason, details FROM audit_events WHERE action = $1"
        " ORDER BY sequence",
        "stopcovid.retention.v1.RetentionService/WithdrawConsent",
    )
    # The withdrawal, then the two tries after it: nobody's number, audited alike.
    assert [(w["outcome"], w["error_reason"]) for w in withdrawals] == [
        ("succeeded", ""),
        ("denied", "NOT_FOUND"),
        ("denied", "NOT_FOUND"),
    ]
    assert all(a.person_id not in str(w["details"]) for w in withdrawals)


def test_withdrawal_counts_the_case_records_the_export_shows(
    servers: Servers, db_conn: Query
) -> None:
    """A scan kept by two cases' traces is one case record to the person: the export
    lists it once, and withdrawal reports the same number as retained."""
    market = create_venue(servers, "Night Market")
    a = enroll(servers, PHONE_A)
    first, second = enroll(servers, PHONE_B), enroll(servers, PHONE_CASE)
    a_id = uuid.UUID(a.person_id)
    ks = keystore(servers.settings)
    at = now().replace(microsecond=0) - dt.timedelta(days=2)
    later = at + dt.timedelta(hours=1)
    for case, records in ((first, [(a_id, at)]), (second, [(a_id, at), (a_id, later)])):
        seed_trace(
            db_conn,
            ks,
            case_person=uuid.UUID(case.person_id),
            venue=market,
            contacts=[(a_id, "sent")],
            records=records,
        )
    assert db_conn("SELECT count(*) FROM case_records")[0][0] == 3

    shown = [c for c in export(servers, person_id=a.person_id).check_ins if c.case_record]
    assert [(c.venue_id, c.scan_time.seconds) for c in shown] == [
        (market, int(at.timestamp())),
        (market, int(later.timestamp())),
    ]
    with retention(servers, "dev-registrar") as front:
        reply = front.rpc.WithdrawConsent(
            pb.WithdrawConsentRequest(person=common_pb2.PersonSelector(person_id=a.person_id))
        )
    assert reply.retained_case_record_count == len(shown) == 2
    created = db_conn("SELECT max(create_time) FROM case_records")[0][0]
    assert reply.retained_until_time.ToDatetime(dt.UTC) == created + dt.timedelta(days=90)


# -- the seams: the export's check-ins and denials, the pseudonyms, stored phones -----

MARKET, CAFE = uuid.UUID(int=1), uuid.UUID(int=2)
T0 = dt.datetime(2026, 11, 20, 9, tzinfo=dt.UTC)


def visit(venue: uuid.UUID, minutes: int, outcome: str = "admitted") -> Visit:
    decision = uuid.UUID(int=100 + minutes) if outcome == "denied" else None
    at = T0 + dt.timedelta(minutes=minutes)
    return Visit(venue, at, "entry", outcome, decision, "Night Market")


def kept(venue: uuid.UUID, minutes: int) -> CaseRecord:
    at = T0 + dt.timedelta(minutes=minutes)
    return CaseRecord(venue, at, "entry", "Riverside Cafe", T0 + dt.timedelta(days=90))


def test_the_export_lists_each_scan_once_and_a_denial_only_as_one() -> None:
    visits = [visit(CAFE, 30), visit(MARKET, 0), visit(MARKET, 10, "denied"), visit(CAFE, 50)]
    records = [kept(CAFE, 30), kept(MARKET, -600)]
    listed = [
        (uuid.UUID(c.venue_id), c.scan_time.ToDatetime(dt.UTC), c.case_record)
        for c in exported_check_ins(visits, records)
    ]
    assert listed == [
        (MARKET, T0 - dt.timedelta(minutes=600), True),  # its day has left the store
        (MARKET, T0, False),  # the denied scan at 10 is no check-in
        (CAFE, T0 + dt.timedelta(minutes=30), True),
        (CAFE, T0 + dt.timedelta(minutes=50), False),
    ]
    denials = exported_denials([visit(CAFE, 40, "denied"), *visits])
    assert [(d.decision_id, d.venue_id) for d in denials] == [
        (str(uuid.UUID(int=110)), str(MARKET)),
        (str(uuid.UUID(int=140)), str(CAFE)),
    ]


def test_pseudonyms_are_those_of_days_whose_key_is_alive(tmp_path: Path) -> None:
    ks = keys.KeyStore(tmp_path, bytes(32))
    today = dt.date(2026, 11, 20)
    person = uuid.uuid4()
    alive = [today + dt.timedelta(days=1), today, today - dt.timedelta(days=90)]
    for day in [*alive, today - dt.timedelta(days=3), today - dt.timedelta(days=91)]:
        ks.day_key(day)
    ks.destroy_day_key(today - dt.timedelta(days=3))
    days, refs = pseudonyms(ks, person, today)
    assert days == alive  # tomorrow (clock skew) to the longest period back, newest first
    assert refs == [ks.day_key(d, create=False).pseudonym(person.bytes) for d in alive]
    assert len(set(refs)) == 3


def test_a_phone_sealed_before_the_sealed_kinds_still_opens(
    servers: Servers, db_conn: Query
) -> None:
    a = enroll(servers, PHONE_A)
    person_id = uuid.UUID(a.person_id)
    (row,) = db_conn("SELECT people_key_id FROM people WHERE person_id = $1", person_id)
    key = keystore(servers.settings).people_key(row["people_key_id"])
    db_conn(
        "UPDATE people SET phone_enc = $2 WHERE person_id = $1",
        person_id,
        key.encrypt(b"+85512000399", b"phone|" + person_id.bytes),
    )
    assert export(servers, person_id=a.person_id).enrollment.phone_number == "+85512000399"
