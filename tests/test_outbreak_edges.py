"""A synthetic outbreak at the edges a real one has, end to end.

The case spends 23:30-00:40 UTC at a bar (07:00 in Cambodia falls in the middle:
the day pseudonym changes under everyone's feet) and then half an hour on a
terrace. Around them: people whose stay crosses midnight at its exit, one who
scanned in just before midnight and again just after, one who came in after it,
one who scanned in twice at the door, one whose exit comes more than 12 hours
after the entry; a person who withdrew consent, one whose enrollment expired,
and one who is a confirmed case themselves; and ordinary contacts, short, late
and outdoors.

Their scans go through the real CheckIn stream and the worker's ingest, the
withdrawal through the Retention RPC, the case and the trace through the
Exposure RPCs; the trace runs in a real worker process. It must find exactly the
expected people with the expected levels, overlaps and stays; skip the withdrawn
rows and say so; keep nothing about the erased person; list the confirmed case
but neither raise nor notify them; deny the HIGH contacts at the door; and send
one message to each contact it raised.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import stopcovid.client as clients
from stopcovid.checkin.v1 import checkin_service_pb2 as cpb
from stopcovid.common.v1 import common_pb2
from stopcovid.exposure.v1 import exposure_service_pb2 as pb
from stopcovid.retention.v1 import retention_service_pb2 as rpb

from services.kernel.config import Settings
from tests.support import exposure_helpers as ex
from tests.support.checkin_helpers import ENTRY, EXIT, config, enroll
from tests.support.database import Query
from tests.support.fleet import worker_process
from tests.support.servers import Pki, Servers, running_servers
from tests.support.trace_helpers import (
    Door,
    entry_decision,
    finished_trace,
    stored_all,
    trace_contacts,
    venue,
)
from tests.support.waits import wait_for

HIGH, MEDIUM, LOW = (
    common_pb2.RISK_LEVEL_HIGH,
    common_pb2.RISK_LEVEL_MEDIUM,
    common_pb2.RISK_LEVEL_LOW,
)

# Scans as (venue, minutes from 00:00 UTC, in/out). The case:
CASE = [("bar", -30, "in"), ("bar", 40, "out"), ("terrace", 90, "in")]  # terrace: 30 min

# Everyone else: their scans, and the contact rows the trace must give:
# (venue, level, overlap minutes, stay start, stay end, end estimated).
PEOPLE: dict[str, tuple[list[tuple[str, int, str]], list[tuple[str, int, int, int, int, bool]]]] = {
    # 22:40-00:20: 50 minutes with the case. Unlinked, the entry alone would be an
    # estimated hour to 23:40, ten minutes of overlap: MEDIUM.
    "exit_after_midnight": (
        [("bar", -80, "in"), ("bar", 20, "out")],
        [("bar", HIGH, 50, -80, 20, False)],
    ),
    "came_after_midnight": (
        [("bar", 5, "in"), ("bar", 25, "out")],
        [("bar", HIGH, 20, 5, 25, False)],
    ),
    # In at 23:58 and again at 00:03 (two day pseudonyms), out at 00:12: 14 minutes.
    "entry_across_midnight": (
        [("bar", -2, "in"), ("bar", 3, "in"), ("bar", 12, "out")],
        [("bar", MEDIUM, 14, -2, 12, False)],
    ),
    # Scanned in twice at the door, out at 00:50: 20 minutes, one stay.
    "double_entry": (
        [("bar", 20, "in"), ("bar", 27, "in"), ("bar", 50, "out")],
        [("bar", HIGH, 20, 20, 50, False)],
    ),
    # In at 11:00 the day before, out 13.5 hours later: the exit does not count.
    "exit_too_late": ([("bar", -13 * 60, "in"), ("bar", 30, "out")], []),
    "brief": ([("bar", 35, "in"), ("bar", 60, "out")], [("bar", MEDIUM, 5, 35, 60, False)]),
    "arrived_after": ([("bar", 60, "in"), ("bar", 80, "out")], [("bar", LOW, 0, 60, 80, False)]),
    "arrived_late": ([("bar", 75, "in"), ("bar", 95, "out")], []),
    "left_before": ([("bar", -120, "in"), ("bar", -35, "out")], []),
    "outdoors": (
        [("terrace", 80, "in"), ("terrace", 110, "out")],
        [("terrace", MEDIUM, 20, 80, 110, True)],  # the case's end there is estimated
    ),
    # Would be HIGH contacts, but: a withdrawal, an expired enrollment, a case.
    "withdrew": ([("bar", -10, "in"), ("bar", 30, "out")], []),
    "erased": ([("bar", -25, "in"), ("bar", 15, "out")], []),
    "also_a_case": (
        [("bar", -20, "in"), ("bar", 10, "out")],
        [("bar", HIGH, 30, -20, 10, False)],
    ),
}
NOT_RAISED = {"withdrew", "erased", "also_a_case"}


def phone(number: int) -> str:
    return f"+8551500{number:04d}"


def last_midnight_with_the_night_past() -> dt.datetime:
    """The latest 00:00 UTC whose night (21:00 the day before to 02:00) is in the
    past and within the 3-day scan age; 11:00 the day before too."""
    now = dt.datetime.now(dt.UTC)
    midnight = dt.datetime.combine(now.date(), dt.time(), dt.UTC)
    if now - midnight < dt.timedelta(hours=2, minutes=30):
        midnight -= dt.timedelta(days=1)
    return midnight


@pytest.fixture
def servers(settings: Settings, pki: Pki) -> Iterator[Servers]:
    """The four servers, with the CheckIn caches' full reload an hour away: a risk
    change reaches the door by NOTIFY or not at all."""
    with running_servers(replace(settings, cache_refresh_s=3600.0), pki) as running:
        yield running


def test_an_outbreak_at_the_edges_finds_exactly_the_expected_contacts(
    servers: Servers, db_conn: Query, tmp_path: Path
) -> None:
    sms = tmp_path / "sms.jsonl"
    midnight = last_midnight_with_the_night_past()

    def at(minutes: int) -> dt.datetime:
        return midnight + dt.timedelta(minutes=minutes)

    with worker_process(servers.settings, tmp_path / "w.log", STOPCOVID_NOTIFY_FILE=str(sms)):
        venues = {
            "bar": venue(servers, "Riverside Bar", indoor=True, default_stay_min=60),
            "terrace": venue(servers, "Night Terrace", indoor=False, default_stay_min=30),
        }
        names = {v: k for k, v in venues.items()}
        doors = {name: Door(servers, db_conn, venue_id) for name, venue_id in venues.items()}
        case = enroll(servers, phone(0))
        people = {name: enroll(servers, phone(i)) for i, name in enumerate(PEOPLE, start=1)}
        scans = 0
        everyone = [(case, CASE)] + [(people[n], s) for n, (s, _) in PEOPLE.items()]
        for who, person_scans in everyone:
            for place, offset, way in person_scans:
                direction = ENTRY if way == "in" else EXIT
                doors[place].scan(who.personal_token.token, at(offset), direction)
                scans += 1
        for door in doors.values():
            door.flush()
        wait_for(lambda: stored_all(db_conn, scans), what="every scan stored")

        # One withdraws consent (their rows are unlinked), one's enrollment expires
        # (as the inactive-enrollment expiry does it), one is a confirmed case.
        with clients.RetentionClient(config(servers, "retention", "dev-registrar")) as front:
            front.rpc.WithdrawConsent(
                rpb.WithdrawConsentRequest(person=ex.by_id(people["withdrew"].person_id))
            )
        erased = uuid.UUID(people["erased"].person_id)
        db_conn("DELETE FROM people WHERE person_id = $1", erased)
        db_conn("INSERT INTO erased_people (person_id) VALUES ($1)", erased)
        ex.report_case(servers, ex.by_id(people["also_a_case"].person_id), reference="LAB-2")

        reported = ex.report_case(servers, ex.by_phone(phone(0)))
        grant = ex.grant_access(servers, reported.case_id)
        started = ex.start_trace(servers, reported.case_id, grant.grant_id)
        trace = finished_trace(servers, started.trace_id)

        expected_best = {
            name: max(row[1] for row in rows)
            for name, (_, rows) in PEOPLE.items()
            if rows and name not in NOT_RAISED
        }
        device = doors["bar"].device_id
        highs = {n for n, level in expected_best.items() if level == HIGH}
        pending = set(highs)

        def all_denied() -> bool:
            for name in list(pending):
                token = people[name].personal_token.token
                if entry_decision(servers, device, token) == cpb.SCAN_OUTCOME_DENIED:
                    pending.discard(name)
            return not pending

        wait_for(all_denied, timeout=30, what=f"HIGH contacts denied at the door: {pending}")
        for name in ("entry_across_midnight", "brief", "arrived_after", "outdoors"):
            token = people[name].personal_token.token
            assert entry_decision(servers, device, token) == cpb.SCAN_OUTCOME_ADMITTED, name
        wait_for(
            lambda: sms.exists() and len(sms.read_text().splitlines()) >= len(expected_best),
            what="every raised contact's message",
        )

    assert trace.state == pb.TRACE_STATE_SUCCEEDED, trace.error_message
    assert trace.visits_found == trace.visits_searched == 2
    # The withdrawn person's two rows belong to nobody: skipped, counted, shown.
    assert [(s.reason, s.rows) for s in trace.skipped_rows] == [(pb.TRACE_SKIP_REASON_WITHDRAWN, 2)]
    assert (trace.erased_contacts, trace.case_contacts) == (1, 1)
    assert not trace.HasField("failure")

    def minutes(value: dt.datetime) -> int:
        return round((value - midnight) / dt.timedelta(minutes=1))

    by_id = {p.person_id: name for name, p in people.items()}
    found = trace_contacts(servers, started.trace_id)
    rows = sorted(
        (
            by_id[c.person_id],
            names[c.venue_id],
            c.risk_level,
            round(c.overlap.ToTimedelta() / dt.timedelta(minutes=1)),
            minutes(c.contact_stay.start_time.ToDatetime(dt.UTC)),
            minutes(c.contact_stay.end_time.ToDatetime(dt.UTC)),
            c.stay_end_estimated,
        )
        for c in found
    )
    assert rows == sorted((name, *row) for name, (_, rs) in PEOPLE.items() for row in rs)
    assert trace.contacts_found == len(rows)
    assert {c.risk_level: c.people for c in trace.level_counts} == {
        level: sum(1 for v in expected_best.values() if v == level) for level in (HIGH, MEDIUM, LOW)
    }
    # The case's own stay at the bar crossed midnight too: one visit, from its entry
    # to its exit.
    bar = [c for c in found if names[c.venue_id] == "bar"]
    assert {
        (
            minutes(c.case_visit.start_time.ToDatetime(dt.UTC)),
            minutes(c.case_visit.end_time.ToDatetime(dt.UTC)),
        )
        for c in bar
    } == {(-30, 40)}

    # Risk: the raised contacts at their level; the confirmed case still one, the
    # withdrawn and the erased nowhere.
    risk = {str(r["person_id"]): r for r in db_conn("SELECT * FROM risk_status")}
    level_names: dict[int, str] = {HIGH: "high", MEDIUM: "medium", LOW: "low"}
    for name, level in expected_best.items():
        assert risk[people[name].person_id]["level"] == level_names[level], name
        assert risk[people[name].person_id]["reason"] == "venue_contact"
    assert risk[people["also_a_case"].person_id]["reason"] == "confirmed_case"
    assert people["withdrew"].person_id not in risk
    assert people["erased"].person_id not in risk
    assert risk[people["exit_after_midnight"].person_id]["overlap"] == dt.timedelta(minutes=50)
    # Nothing kept about the erased person: no contact row, record or message.
    index_rows = db_conn("SELECT count(*) FROM case_records WHERE subject = 'contact'")[0][0]
    assert index_rows == sum(
        len([s for s in PEOPLE[by_id[c.person_id]][0] if s[0] == names[c.venue_id]])
        for c in {c.person_id: c for c in found}.values()
    )

    # One message to each raised contact; none to the case, the confirmed case,
    # the withdrawn or the erased.
    messages = [json.loads(line) for line in sms.read_text().splitlines()]
    assert sorted(m["to"] for m in messages) == sorted(
        phone(i) for i, name in enumerate(PEOPLE, start=1) if name in expected_best
    )

    # A contact reported as a case afterwards takes the confirmed-case basis.
    ex.report_case(servers, ex.by_id(people["brief"].person_id), reference="LAB-3")
    status = ex.risk_status(servers, ex.by_id(people["brief"].person_id))
    assert status.level == HIGH
    assert status.basis.reason == common_pb2.RISK_REASON_CONFIRMED_CASE
