"""Shared pieces of the grievance, data-subject and transparency tests: real
check-ins and denials through the CheckIn path, moved into the store as the
ingest workers move them, and exposure rows seeded the way Exposure writes them."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import stopcovid.client as clients
from stopcovid.checkin.v1 import checkin_service_pb2 as cpb
from stopcovid.retention.v1 import retention_service_pb2 as pb

from services.domain.checkins import inbox
from services.kernel import keys
from services.kernel.config import Settings
from services.kernel.keys import Sealed
from tests.support.checkin_helpers import DeviceStream, batch, config, scan, ts
from tests.support.database import Query
from tests.support.servers import Servers
from tests.support.waits import wait_for

INBOX_COLUMNS = ", ".join(inbox.COLUMNS)


@contextmanager
def retention(servers: Servers, principal: str) -> Iterator[clients.RetentionClient]:
    with clients.RetentionClient(config(servers, "retention", principal)) as client:
        yield client


def keystore(settings: Settings) -> keys.KeyStore:
    return keys.open_keystore(settings.keystore_dir, settings.secrets_dir)


def move_inbox(db_conn: Query) -> int:
    """Move the inbox into the store, as the ingest workers do."""
    for row in db_conn("SELECT DISTINCT day FROM scan_inbox"):
        db_conn("SELECT ensure_checkin_partition($1)", row["day"])
    moved = db_conn(
        f"WITH gone AS (DELETE FROM scan_inbox RETURNING {INBOX_COLUMNS})"  # noqa: S608
        f" INSERT INTO checkins ({INBOX_COLUMNS}) SELECT {INBOX_COLUMNS} FROM gone"
        " ON CONFLICT DO NOTHING RETURNING 1"
    )
    return len(moved)


class Door:
    """A device at a venue streaming scans, with its own sequence numbers."""

    def __init__(self, stream: DeviceStream) -> None:
        self.stream = stream
        self.sequence = 0

    def scan(self, token: str, at: dt.datetime | None = None) -> cpb.ScanResult:
        self.sequence += 1
        self.stream.send(batch(f"b{self.sequence}", scan(self.sequence, token, at)))
        result: cpb.ScanResult = self.stream.ack().results[0]
        return result


def set_high_risk(db_conn: Query, person_id: str, basis_venue: str, name: str) -> None:
    """A HIGH level with a venue-contact basis, as a trace sets it."""
    db_conn(
        "INSERT INTO risk_status (person_id, level, expire_time, reason, exposure_time,"
        " venue_id, venue_display_name, overlap, rule)"
        " VALUES ($1, 'high', now() + interval '14 days', 'venue_contact',"
        " now() - interval '2 days', $2, $3, interval '40 minutes',"
        " 'indoor overlap of 15 minutes or more')"
        " ON CONFLICT (person_id) DO UPDATE SET level = 'high',"
        " expire_time = excluded.expire_time, update_time = now()",
        uuid.UUID(person_id),
        uuid.UUID(basis_venue),
        name,
    )


def deny_entry(servers: Servers, door: Door, device: str, token: str) -> str:
    """Scan `token` once the CheckIn server knows its HIGH level; the decision id."""
    with clients.CheckInClient(config(servers, "checkin", device)) as checkin:
        wait_for(
            lambda: (
                checkin.rpc.GetEntryDecision(
                    cpb.GetEntryDecisionRequest(personal_token=token)
                ).outcome
                == cpb.SCAN_OUTCOME_DENIED
            ),
            timeout=30,
            what="the CheckIn server to see the high risk level",
        )
    result = door.scan(token)
    assert result.outcome == cpb.SCAN_OUTCOME_DENIED
    return result.decision_id


def seed_trace(
    db_conn: Query,
    ks: keys.KeyStore,
    *,
    case_person: uuid.UUID,
    venue: str,
    contacts: list[tuple[uuid.UUID, str]],
    records: Sequence[tuple[uuid.UUID, dt.datetime]] = (),
    outbreak: str = "OB-2026-017",
    revoked: bool = False,
) -> dict[str, uuid.UUID]:
    """A case with an approved request, its grant and a succeeded trace, as Exposure
    and the trace workers write them: persons only encrypted under the case key and
    as person indexes. `contacts` are (person, notification state); `records` are
    (person, scan time) kept as case records."""
    case_id, request_id, grant_id, trace_id = (uuid.uuid4() for _ in range(4))
    key = ks.case_key(case_id, create=True)
    venue_id = uuid.UUID(venue)
    db_conn(
        "INSERT INTO cases (case_id, person_index, person_enc, test_date, window_start,"
        " window_end, reporter) VALUES ($1, $2, $3, current_date, now() - interval '4 days',"
        " now(), 'moh-reporter')",
        case_id,
        ks.person_index(case_person.bytes),
        Sealed.CASE_PERSON.seal(key, case_id, case_person.bytes),
    )
    db_conn(
        "INSERT INTO access_requests (access_request_id, case_id, outbreak_reference,"
        " justification, window_start, window_end, state, requester, decider, decide_time)"
        " VALUES ($1, $2, $3, 'Cluster at the night market, contacts needed.',"
        " now() - interval '4 days', now(), 'approved', 'moh-tracer', 'committee-1', now())",
        request_id,
        case_id,
        outbreak,
    )
    db_conn(
        "INSERT INTO access_grants (grant_id, access_request_id, case_id, window_start,"
        " window_end, expire_time, revoke_time, revoker) VALUES ($1, $2, $3,"
        " now() - interval '4 days', now(), now() + interval '3 days', $4, $5)",
        grant_id,
        request_id,
        case_id,
        dt.datetime.now(dt.UTC) if revoked else None,
        "committee-1" if revoked else None,
    )
    db_conn(
        "INSERT INTO traces (trace_id, case_id, grant_id, state, window_start, window_end,"
        " starter, start_time, end_time) VALUES ($1, $2, $3, 'succeeded',"
        " now() - interval '4 days', now(), 'moh-tracer', now(), now())",
        trace_id,
        case_id,
        grant_id,
    )
    for number, (person, state) in enumerate(contacts, start=1):
        index = ks.person_index(person.bytes)
        db_conn(
            "INSERT INTO trace_contacts (trace_id, row_number, case_id, contact_ref, level_rank,"
            " venue_id, case_visit_start, case_visit_end, contact_stay_start, contact_stay_end,"
            " overlap, stay_end_estimated, rule, person_index, person_enc) VALUES ($1, $2, $3,"
            " $4, 3, $5, now() - interval '2 days', now() - interval '47 hours',"
            " now() - interval '2 days', now() - interval '47 hours', interval '1 hour', true,"
            " 'indoor overlap under 15 minutes', $6, $7)",
            trace_id,
            number,
            case_id,
            f"c{number}",
            venue_id,
            index,
            Sealed.CONTACT_PERSON.seal(key, trace_id, person.bytes),
        )
        notification_id = uuid.uuid4()
        db_conn(
            "INSERT INTO notifications (notification_id, trace_id, grant_id, case_id,"
            " contact_ref, person_index, person_enc, risk_level, template, state, send_time,"
            " finish_time) VALUES ($1, $2, $3, $4, $5, $6, $7, 'medium', 'exposure-v1', $8,"
            " CASE WHEN $8 = 'sent' THEN now() END,"
            " CASE WHEN $8 IN ('sent', 'failed') THEN now() END)",
            notification_id,
            trace_id,
            grant_id,
            case_id,
            f"c{number}",
            index,
            Sealed.NOTIFICATION_PERSON.seal(key, notification_id, person.bytes),
            state,
        )
    for person, at in records:
        db_conn(
            "INSERT INTO case_records (case_id, trace_id, subject, contact_ref, venue_id,"
            " scan_time, direction, person_index, person_enc) VALUES ($1, $2, 'contact', 'c1',"
            " $3, $4, 'entry', $5, $6)",
            case_id,
            trace_id,
            venue_id,
            at,
            ks.person_index(person.bytes),
            Sealed.CASE_RECORD_PERSON.seal(key, trace_id, person.bytes),
        )
    return {"case": case_id, "grant": grant_id, "trace": trace_id, "request": request_id}


def report(
    servers: Servers, principal: str = "dev-auditor", **period: dt.datetime
) -> pb.GetTransparencyReportResponse:
    request = pb.GetTransparencyReportRequest()
    if "start" in period:
        request.period.start_time.CopyFrom(ts(period["start"]))
    if "end" in period:
        request.period.end_time.CopyFrom(ts(period["end"]))
    with retention(servers, principal) as client:
        reply: pb.GetTransparencyReportResponse = client.rpc.GetTransparencyReport(request)
        return reply


def copy_contacts(db_conn: Query, trace_id: uuid.UUID, last_row: int) -> None:
    """Copy the trace's first contact into rows 2 to `last_row`: a large trace."""
    db_conn(
        "INSERT INTO trace_contacts SELECT trace_id, g, case_id, 'c' || g, level_rank, venue_id,"
        " case_visit_start, case_visit_end, contact_stay_start, contact_stay_end, overlap,"
        " stay_end_estimated, rule, person_index, person_enc"
        " FROM trace_contacts, generate_series(2, $2) g WHERE trace_id = $1",
        trace_id,
        last_row,
    )
