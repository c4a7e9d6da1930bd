"""Shared pieces of the trace tests (tests/test_traces.py, test_notifications.py,
test_outbreak.py, test_outbreak_edges.py): venues, a venue's door streaming scans
through the real CheckIn path, waiting for the ingest and for a trace to finish, a
trace's contacts, and a small scenario. The worker pool as a real process is
tests/support/fleet.py's `worker_process`."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import stopcovid.client as clients
from google.protobuf import duration_pb2
from stopcovid.checkin.v1 import checkin_service_pb2 as cpb
from stopcovid.common.v1 import common_pb2
from stopcovid.exposure.v1 import exposure_service_pb2 as pb
from stopcovid.venue.v1 import venue_service_pb2 as vpb

from tests.support import exposure_helpers as ex
from tests.support.checkin_helpers import (
    ENTRY,
    EXIT,
    add_device,
    batch,
    config,
    enroll,
    open_stream,
    scan,
)
from tests.support.database import Query
from tests.support.fleet import worker_process
from tests.support.servers import Servers
from tests.support.waits import every_page, wait_for


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
        self.scan(token, start, ENTRY)
        if end is not None:
            self.scan(token, end, EXIT)

    def scan(
        self, token: str, at: dt.datetime, direction: common_pb2.ScanDirection.ValueType = ENTRY
    ) -> None:
        """One scan (a second entry scan, say), ENTRY or EXIT."""
        self.sequence += 1
        self.pending.append(scan(self.sequence, token, at, direction))

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
    with ex.exposure(servers) as client:
        for page in every_page(
            lambda token: client.rpc.ListTraceContacts(
                pb.ListTraceContactsRequest(
                    trace_id=trace_id, page_size=7, page_token=token, include_person_ids=True
                )
            )
        ):
            rows.extend(page.trace_contacts)
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


def ingested_scenario(servers: Servers, db_conn: Query, log_file: Path, tag: str) -> Small:
    """The small scenario, its scans moved by a worker that is then killed: a trace
    started next waits for the worker a test starts."""
    with worker_process(servers.settings, log_file) as proc:
        s = small_scenario(servers, db_conn, tag)
        proc.kill()
    return s


def entry_decision(servers: Servers, device: str, token: str) -> int:
    """What `device`'s door would answer `token` now (GetEntryDecision's outcome)."""
    with clients.CheckInClient(config(servers, "checkin", device)) as checkin:
        reply = checkin.rpc.GetEntryDecision(cpb.GetEntryDecisionRequest(personal_token=token))
    outcome: int = reply.outcome
    return outcome
