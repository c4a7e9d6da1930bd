"""Transparency figures against a known seeded history: every count, for the
whole life of the platform and for a period, and no personal data in them."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
import stopcovid.client as clients
from stopcovid.common.v1 import common_pb2
from stopcovid.retention.v1 import retention_service_pb2 as pb

from services.domain.places import regions
from services.retention.transparency import by_province
from tests.support.accountability_helpers import (
    Door,
    deny_entry,
    keystore,
    move_inbox,
    report,
    retention,
    seed_trace,
    set_high_risk,
)
from tests.support.checkin_helpers import add_device, create_venue, enroll, now, open_stream
from tests.support.database import Query
from tests.support.servers import Servers


def test_figures_match_a_known_history(servers: Servers, db_conn: Query) -> None:
    market = create_venue(servers, "Night Market")
    device = add_device(servers, db_conn, market)
    door = Door(open_stream(servers, device))
    people = [enroll(servers, f"+8551200040{i}") for i in range(6)]
    ids = [uuid.UUID(p.person_id) for p in people]
    ks = keystore(servers.settings)
    # Two cases traced (one grant later revoked): notifications sent 3, failed 1,
    # one still queued.
    seed_trace(
        db_conn,
        ks,
        case_person=ids[0],
        venue=market,
        contacts=[(ids[1], "sent"), (ids[2], "sent"), (ids[3], "failed")],
    )
    seed_trace(
        db_conn,
        ks,
        case_person=ids[4],
        venue=market,
        contacts=[(ids[1], "sent"), (ids[5], "queued")],
        revoked=True,
    )
    # A third case whose request was denied, a fourth with one pending.
    for state in ("denied", "pending"):
        case_id = uuid.uuid4()
        db_conn(
            "INSERT INTO cases (case_id, person_index, person_enc, test_date, window_start,"
            " window_end, reporter) VALUES ($1, $2, '\\x00', current_date, now(), now(), 'moh')",
            case_id,
            uuid.uuid4().bytes,
        )
        db_conn(
            "INSERT INTO access_requests (access_request_id, case_id, outbreak_reference,"
            " justification, window_start, window_end, state, requester, decider, decide_time)"
            " VALUES ($1, $2, 'OB-9', 'A justification long enough.', now(), now(), $3, 'moh',"
            " CASE WHEN $3 = 'denied' THEN 'committee-1' END,"
            " CASE WHEN $3 = 'denied' THEN now() END)",
            uuid.uuid4(),
            case_id,
            state,
        )
    # Two denials at the door: one moved into the store, one still in the inbox.
    set_high_risk(db_conn, people[1].person_id, market, "Night Market")
    deny_entry(servers, door, device, people[1].personal_token.token)
    move_inbox(db_conn)
    deny_entry(servers, door, device, people[1].personal_token.token)
    door.scan(people[2].personal_token.token)  # admitted: not counted
    # Grievances: one resolved, one in progress, two open of which one overdue.
    with retention(servers, "dev-registrar") as front:
        filed = [
            front.rpc.FileGrievance(
                pb.FileGrievanceRequest(
                    grievance=pb.Grievance(
                        category=pb.GRIEVANCE_CATEGORY_OTHER, description=f"Complaint {i}"
                    )
                )
            ).tracking_id
            for i in range(4)
        ]
        front.rpc.WithdrawConsent(
            pb.WithdrawConsentRequest(person=common_pb2.PersonSelector(person_id=str(ids[3])))
        )
    with retention(servers, "dev-grievance-officer") as officer:
        officer.rpc.ResolveGrievance(
            pb.ResolveGrievanceRequest(
                tracking_id=filed[0],
                outcome=pb.GRIEVANCE_OUTCOME_NOT_UPHELD,
                resolution_summary="Examined.",
            )
        )
        officer.rpc.AssignGrievance(pb.AssignGrievanceRequest(tracking_id=filed[1]))
    db_conn(
        "UPDATE grievances SET due_time = now() - interval '1 day' WHERE tracking_id = $1",
        filed[2],
    )
    # Deletion reports as expiry writes them.
    run = uuid.uuid4()
    for data_class, rows, key_ids in (
        ("check_ins", 1200, ["day-2026-10-01", "day-2026-10-02"]),
        ("case_records", 30, ["case-x"]),
    ):
        db_conn(
            "INSERT INTO deletion_reports (deletion_report_id, run_id, data_class, period_days,"
            " row_count, destroyed_key_ids, trigger) VALUES ($1, $2, $3, 28, $4, $5, 'scheduled')",
            uuid.uuid4(),
            run,
            data_class,
            rows,
            key_ids,
        )
    db_conn(
        "INSERT INTO deletion_reports (deletion_report_id, run_id, data_class, period_days,"
        " row_count, trigger) VALUES ($1, $2, 'check_ins', 28, 300, 'on_demand')",
        uuid.uuid4(),
        uuid.uuid4(),
    )

    figures = report(servers)
    assert figures.case_count == 4
    assert figures.access_request_count == 4
    assert figures.approval_count == 2
    assert figures.denial_count == 1
    assert figures.revoked_grant_count == 1
    assert figures.trace_count == 2
    assert figures.notification_sent_count == 3
    assert figures.notification_failed_count == 1
    assert figures.entry_denial_count == 2
    assert {g.state: g.count for g in figures.grievances_by_state} == {
        pb.GRIEVANCE_STATE_OPEN: 2,
        pb.GRIEVANCE_STATE_IN_PROGRESS: 1,
        pb.GRIEVANCE_STATE_RESOLVED: 1,
    }
    assert figures.overdue_grievance_count == 1
    assert [
        (d.data_class, d.report_count, d.row_count, d.destroyed_key_count)
        for d in figures.deletions
    ] == [
        (pb.DATA_CLASS_CHECK_INS, 2, 1500, 2),
        (pb.DATA_CLASS_CASE_RECORDS, 1, 30, 1),
    ]
    assert figures.consent_withdrawal_count == 1
    assert not figures.period.HasField("start_time")
    assert figures.period.end_time == figures.generate_time
    raw = figures.SerializeToString()
    for person in people:
        assert person.person_id.encode() not in raw

    # A period before any of it counts nothing but what is overdue now.
    past = report(
        servers,
        "dev-registrar",
        start=now() - dt.timedelta(days=30),
        end=now() - dt.timedelta(days=20),
    )
    assert (past.case_count, past.trace_count, past.entry_denial_count) == (0, 0, 0)
    assert sum(g.count for g in past.grievances_by_state) == 0
    assert not past.deletions and past.consent_withdrawal_count == 0
    assert past.overdue_grievance_count == 1
    # Backdating a case moves it out of a recent period.
    db_conn(
        "UPDATE cases SET report_time = now() - interval '10 days' WHERE case_id ="
        " (SELECT case_id FROM cases ORDER BY report_time LIMIT 1)"
    )
    recent = report(servers, start=now() - dt.timedelta(days=1))
    assert recent.case_count == 3
    assert recent.period.start_time.ToDatetime() < now().replace(tzinfo=None)


def test_only_auditors_and_front_ends_may_read_figures(servers: Servers) -> None:
    with pytest.raises(clients.PermissionDenied):
        report(servers, "dev-grievance-officer")
    with pytest.raises(clients.InvalidArgument) as caught:
        report(servers, start=now(), end=now() - dt.timedelta(days=1))
    assert caught.value.metadata["field"] == "period"
    assert report(servers, "dev-registrar").case_count == 0


def test_every_province_has_its_row_and_unknown_codes_share_one() -> None:
    rows = by_province(
        {
            "KH-12": {"venue_count": 2, "entry_denial_count": 1},
            "KH-1": {"contact_count": 4},
            "KH-99": {"venue_count": 1},  # stored before codes were checked
            "TH-10": {"venue_count": 1, "notification_sent_count": 3},
        }
    )
    assert [r.region_code for r in rows] == [*(p.code for p in regions.PROVINCES), ""]
    counts = {
        r.region_code: (
            r.venue_count,
            r.contact_count,
            r.notification_sent_count,
            r.entry_denial_count,
        )
        for r in rows
    }
    assert counts["KH-12"] == (2, 0, 0, 1)
    assert counts["KH-1"] == (0, 4, 0, 0)
    assert counts[""] == (2, 0, 3, 0)
    assert sum(sum(c) for c in counts.values()) == 12  # nothing lost, nothing counted twice
    named = {r.region_code: r.name_en for r in rows}
    assert named["KH-12"] == regions.BY_CODE["KH-12"].name_en and named[""] == ""
    assert [r.region_code for r in by_province({})] == [p.code for p in regions.PROVINCES]
