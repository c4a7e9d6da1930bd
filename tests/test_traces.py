"""The trace job (workers/traces.py) in a real worker process, against real servers:
it runs only under an active grant, writes its results in one go, re-runs a trace
whose worker died, never lowers a risk level, and audits every step with the case
and the grant and without personal data.

Scans go through the real CheckIn stream and the worker's ingest; cases, grants
and traces through the Exposure RPCs (tests/exposure_helpers.py). The helpers
here (`WorkerProcess`, `Door`, `venue`, `finished_trace`) are shared with
tests/test_notifications.py and tests/test_outbreak.py.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import duration_pb2
from stopcovid.checkin.v1 import checkin_service_pb2 as cpb
from stopcovid.common.v1 import common_pb2
from stopcovid.exposure.v1 import exposure_service_pb2 as pb
from stopcovid.venue.v1 import venue_service_pb2 as vpb

import clients
from services.core.config import Settings
from tests import exposure_helpers as ex
from tests.checkin_helpers import ENTRY, EXIT, add_device, batch, config, enroll, open_stream, scan
from tests.conftest import Query, Servers, process_env, wait_for

# -- shared helpers -------------------------------------------------------------


@contextmanager
def worker_process(
    settings: Settings, log_file: Path, **env: str
) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m workers` (ingest, traces, outbox) as `up` starts it; killed at the end."""
    with log_file.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "workers"],
            env=process_env(settings, **env),
            stdout=out,
            stderr=out,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=15)


def venue(servers: Servers, name: str, *, indoor: bool, default_stay_min: int = 60) -> str:
    stay = duration_pb2.Duration()
    stay.FromTimedelta(dt.timedelta(minutes=default_stay_min))
    with clients.VenueClient(config(servers, "venue", "dev-venue-operator")) as venues:
        made = venues.rpc.CreateVenue(
            vpb.CreateVenueRequest(
                venue=vpb.Venue(
                    display_name=name,
                    setting=vpb.VENUE_SETTING_INDOOR if indoor else vpb.VENUE_SETTING_OUTDOOR,
                    region_code="KH-12",
                    default_stay=stay,
                )
            )
        ).venue
    return str(made.venue_id)


@dataclass
class Door:
    """A venue's scanner: scans are collected, then streamed in one batch."""

    servers: Servers
    db_conn: Query
    venue_id: str
    device_id: str = ""
    pending: list[cpb.Scan] = field(default_factory=list)
    sequence: int = 0

    def __post_init__(self) -> None:
        self.device_id = add_device(self.servers, self.db_conn, self.venue_id)

    def visit(self, token: str, start: dt.datetime, end: dt.datetime | None = None) -> None:
        """An entry scan, and an exit scan when `end` is given."""
        self.sequence += 1
        self.pending.append(scan(self.sequence, token, start, ENTRY))
        if end is not None:
            self.sequence += 1
            self.pending.append(scan(self.sequence, token, end, EXIT))

    def flush(self) -> None:
        if not self.pending:
            return
        stream = open_stream(self.servers, self.device_id)
        stream.send(batch(f"b{self.sequence}", *self.pending))
        results = stream.ack().results
        assert [r.outcome for r in results] == [cpb.SCAN_OUTCOME_ADMITTED] * len(self.pending)
        assert stream.end() is None
        self.pending = []


def base_time() -> dt.datetime:
    """02:00 UTC of a day whose 02:00-13:00 lies in the past and within the 3-day
    scan age (a trace's stays never cross 00:00 UTC, where day pseudonyms change)."""
    now = dt.datetime.now(dt.UTC)
    day = now.date() if now.hour >= 14 else now.date() - dt.timedelta(days=1)
    return dt.datetime.combine(day, dt.time(2), dt.UTC)


def stored_all(db_conn: Query, expected: int) -> bool:
    count: int = db_conn("SELECT count(*) FROM checkins")[0][0]
    return count >= expected and db_conn("SELECT count(*) FROM scan_inbox")[0][0] == 0


def finished_trace(servers: Servers, trace_id: str, timeout: float = 90) -> pb.Trace:
    """Poll GetTrace until the trace is no longer queued or running."""
    found: list[pb.Trace] = []

    def done() -> bool:
        with ex.exposure(servers) as client:
            trace = client.rpc.GetTrace(pb.GetTraceRequest(trace_id=trace_id)).trace
        found[:] = [trace]
        return trace.state not in (pb.TRACE_STATE_QUEUED, pb.TRACE_STATE_RUNNING)

    wait_for(done, timeout=timeout, what="the trace to finish")
    return found[0]


def trace_contacts(servers: Servers, trace_id: str) -> list[pb.TraceContact]:
    """Every contact row of a trace, with person ids (under the active grant)."""
    rows: list[pb.TraceContact] = []
    token = ""
    with ex.exposure(servers) as client:
        while True:
            page = client.rpc.ListTraceContacts(
                pb.ListTraceContactsRequest(
                    trace_id=trace_id, page_size=7, page_token=token, include_person_ids=True
                )
            )
            rows.extend(page.trace_contacts)
            token = page.next_page_token
            if not token:
                return rows


def audit_rows(db_conn: Query, action_prefix: str) -> list[dict[str, object]]:
    return [
        dict(r)
        for r in db_conn(
            "SELECT action, principal, outcome, error_reason, case_id, grant_id, details"
            " FROM audit_events WHERE action LIKE $1 ORDER BY event_id",
            action_prefix + "%",
        )
    ]


# -- a small scenario -------------------------------------------------------------


@dataclass
class Small:
    case_phone: str
    case_person: str
    case_id: str
    grant_id: str
    people: dict[str, cpb.EnrollPersonResponse]
    venue_id: str


def small_scenario(servers: Servers, db_conn: Query, tag: str) -> Small:
    """A case at one indoor venue for an hour (exit scanned), with `close` there for
    40 minutes (HIGH), `brief` for 10 (MEDIUM) and `later` arriving 2 hours after
    (nobody). Scans stored, case reported, access granted; no trace yet."""
    hall = venue(servers, f"Hall {tag}", indoor=True)
    door = Door(servers, db_conn, hall)
    t = base_time()
    case = enroll(servers, f"+8551{tag}0000")
    people = {
        name: enroll(servers, f"+8551{tag}000{i}")
        for i, name in enumerate(("close", "brief", "later"), start=1)
    }
    door.visit(case.personal_token.token, t, t + dt.timedelta(hours=1))
    door.visit(
        people["close"].personal_token.token,
        t + dt.timedelta(minutes=10),
        t + dt.timedelta(minutes=50),
    )
    door.visit(
        people["brief"].personal_token.token,
        t + dt.timedelta(minutes=55),
        t + dt.timedelta(minutes=80),
    )
    door.visit(people["later"].personal_token.token, t + dt.timedelta(hours=3))
    door.flush()
    wait_for(lambda: stored_all(db_conn, 7), what="the scans to be stored")
    reported = ex.report_case(servers, ex.by_phone(f"+8551{tag}0000"))
    grant = ex.grant_access(servers, reported.case_id)
    return Small(f"+8551{tag}0000", case.person_id, reported.case_id, grant.grant_id, people, hall)


def test_a_trace_stores_contacts_records_risk_and_notifications_and_audits_it(
    servers: Servers, db_conn: Query, tmp_path: Path
) -> None:
    with worker_process(
        servers.settings, tmp_path / "w.log", STOPCOVID_NOTIFY_FILE=str(tmp_path / "sms.jsonl")
    ):
        s = small_scenario(servers, db_conn, "201")
        # "brief" already HIGH for longer: the trace must not lower it.
        db_conn(
            "INSERT INTO risk_status (person_id, level, expire_time, reason)"
            " VALUES ($1, 'high', now() + interval '30 days', 'venue_contact')",
            uuid.UUID(s.people["brief"].person_id),
        )
        started = ex.start_trace(servers, s.case_id, s.grant_id)
        trace = finished_trace(servers, started.trace_id)

    assert trace.state == pb.TRACE_STATE_SUCCEEDED, trace.error_message
    assert (trace.visits_found, trace.visits_searched, trace.contacts_found) == (1, 1, 2)
    assert {(c.risk_level, c.people) for c in trace.level_counts} == {
        (common_pb2.RISK_LEVEL_HIGH, 1),
        (common_pb2.RISK_LEVEL_MEDIUM, 1),
    }
    contacts = trace_contacts(servers, started.trace_id)
    by_person = {c.person_id: c for c in contacts}
    assert set(by_person) == {s.people["close"].person_id, s.people["brief"].person_id}
    close = by_person[s.people["close"].person_id]
    assert close.risk_level == common_pb2.RISK_LEVEL_HIGH
    assert close.overlap.ToTimedelta() == dt.timedelta(minutes=40)
    assert not close.stay_end_estimated
    assert by_person[s.people["brief"].person_id].overlap.ToTimedelta() == dt.timedelta(minutes=5)
    assert len({c.contact_ref for c in contacts}) == 2
    assert all(len(c.contact_ref) == 16 for c in contacts)

    # Case records: the case's two scans and each contact's two, under the case.
    records = db_conn(
        "SELECT subject, count(*) AS n FROM case_records WHERE trace_id = $1 GROUP BY subject",
        uuid.UUID(started.trace_id),
    )
    assert {r["subject"]: r["n"] for r in records} == {"case": 2, "contact": 4}

    risk = {
        str(r["person_id"]): r
        for r in db_conn("SELECT * FROM risk_status WHERE reason = 'venue_contact'")
    }
    assert risk[s.people["close"].person_id]["level"] == "high"
    assert risk[s.people["close"].person_id]["expire_time"] == risk[s.people["close"].person_id][
        "exposure_time"
    ] + dt.timedelta(days=14)
    assert risk[s.people["close"].person_id]["venue_display_name"] == "Hall 201"
    brief = risk[s.people["brief"].person_id]
    assert brief["level"] == "high" and brief["exposure_time"] is None  # not lowered
    assert s.people["later"].person_id not in risk

    queued = db_conn("SELECT risk_level, template, contact_ref FROM notifications")
    assert sorted(r["risk_level"] for r in queued) == ["high", "medium"]
    assert {r["template"] for r in queued} == {"exposure-high-km-1", "exposure-medium-km-1"}

    steps = audit_rows(db_conn, "worker.trace.")
    assert [a["action"] for a in steps] == [
        "worker.trace.decrypt_case",
        "worker.trace.decrypt_contacts",
        "worker.trace.set_risk",
        "worker.trace.run",
    ]
    for a in steps:
        assert a["principal"] == "worker" and a["outcome"] == "succeeded"
        assert str(a["case_id"]) == s.case_id and str(a["grant_id"]) == s.grant_id
        details = str(a["details"])
        for secret in (s.case_person, *(p.person_id for p in s.people.values())):
            assert secret not in details
    assert json.loads(str(steps[-1]["details"]))["contacts_found"] == 2


def test_a_trace_under_an_expired_grant_is_cancelled_and_audited(
    servers: Servers, db_conn: Query, tmp_path: Path
) -> None:
    with worker_process(servers.settings, tmp_path / "ingest.log") as proc:
        s = small_scenario(servers, db_conn, "202")
        proc.kill()
    started = ex.start_trace(servers, s.case_id, s.grant_id)
    db_conn(
        "UPDATE access_grants SET create_time = now() - interval '2 hours',"
        " expire_time = now() - interval '1 hour' WHERE grant_id = $1",
        uuid.UUID(s.grant_id),
    )
    with worker_process(servers.settings, tmp_path / "w.log"):
        trace = finished_trace(servers, started.trace_id)
    assert trace.state == pb.TRACE_STATE_CANCELLED
    assert "expired" in trace.error_message
    assert db_conn("SELECT count(*) FROM trace_contacts")[0][0] == 0
    assert db_conn("SELECT count(*) FROM notifications")[0][0] == 0
    assert db_conn("SELECT count(*) FROM risk_status WHERE reason = 'venue_contact'")[0][0] == 0
    denied = audit_rows(db_conn, "worker.trace.run")
    assert len(denied) == 1
    assert denied[0]["outcome"] == "denied" and denied[0]["error_reason"] == "GRANT_EXPIRED"
    assert str(denied[0]["grant_id"]) == s.grant_id
    # Nothing was decrypted: no decryption was audited.
    assert audit_rows(db_conn, "worker.trace.decrypt") == []


def test_a_dead_workers_trace_is_run_again_and_its_leftovers_replaced(
    servers: Servers, db_conn: Query, tmp_path: Path
) -> None:
    with worker_process(servers.settings, tmp_path / "ingest.log") as proc:
        s = small_scenario(servers, db_conn, "203")
        proc.kill()
    started = ex.start_trace(servers, s.case_id, s.grant_id)
    trace_id = uuid.UUID(started.trace_id)
    # A worker claimed it, wrote part of a result, and died: its lease has passed.
    db_conn(
        "UPDATE traces SET state = 'running', worker_id = 'worker-dead', attempt_count = 1,"
        " start_time = now() - interval '10 minutes', lease_until = now() - interval '1 minute'"
        " WHERE trace_id = $1",
        trace_id,
    )
    db_conn(
        "INSERT INTO trace_contacts (trace_id, row_number, case_id, contact_ref, level_rank,"
        " venue_id, case_visit_start, case_visit_end, contact_stay_start, contact_stay_end,"
        " overlap, stay_end_estimated, rule, person_index, person_enc)"
        " VALUES ($1, 1, $2, 'leftover', 4, $3, now(), now(), now(), now(), '1 hour', false,"
        " 'x', 'x', 'x')",
        trace_id,
        uuid.UUID(s.case_id),
        uuid.UUID(s.venue_id),
    )
    with worker_process(servers.settings, tmp_path / "w.log"):
        trace = finished_trace(servers, started.trace_id)
    assert trace.state == pb.TRACE_STATE_SUCCEEDED, trace.error_message
    refs = [r[0] for r in db_conn("SELECT contact_ref FROM trace_contacts")]
    assert len(refs) == 2 and "leftover" not in refs
    assert db_conn("SELECT attempt_count FROM traces")[0][0] == 2
    assert db_conn("SELECT count(*) FROM notifications")[0][0] == 2


def test_a_trace_that_keeps_dying_is_given_up(
    servers: Servers, db_conn: Query, tmp_path: Path
) -> None:
    with worker_process(servers.settings, tmp_path / "ingest.log") as proc:
        s = small_scenario(servers, db_conn, "204")
        proc.kill()
    started = ex.start_trace(servers, s.case_id, s.grant_id)
    db_conn(
        "UPDATE traces SET state = 'running', worker_id = 'worker-dead', attempt_count = 3,"
        " lease_until = now() - interval '1 minute' WHERE trace_id = $1",
        uuid.UUID(started.trace_id),
    )
    with worker_process(servers.settings, tmp_path / "w.log"):
        trace = finished_trace(servers, started.trace_id)
    assert trace.state == pb.TRACE_STATE_FAILED
    assert trace.error_message == "gave up after 3 interrupted runs"
    assert db_conn("SELECT count(*) FROM trace_contacts")[0][0] == 0
    failed = audit_rows(db_conn, "worker.trace.run")
    assert [a["outcome"] for a in failed] == ["failed"]
