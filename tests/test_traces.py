"""The trace job (services/domain/exposure/trace_job.py, scheduled by
workers/traces.py) in a real worker process, against real servers: it runs only
under an active grant, writes its results in one go, re-runs a trace whose worker
died, never lowers a risk level, audits every step with the case and the grant and
without personal data, and when it fails says in which step and with which error
class.

Scans go through the real CheckIn stream and the worker's ingest; cases, grants
and traces through the Exposure RPCs (tests/support/exposure_helpers.py, trace_helpers.py).
The records a run writes are checked against its statements, and what it seals
against the formats stored data already has.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
import uuid
from pathlib import Path

import pytest
from stopcovid.common.v1 import common_pb2
from stopcovid.exposure.v1 import exposure_service_pb2 as pb

from services.domain.exposure import records, trace_job, trace_results
from services.kernel import keys
from tests.support import exposure_helpers as ex
from tests.support.database import Query
from tests.support.fleet import worker_process
from tests.support.servers import Servers
from tests.support.trace_helpers import (
    audit_rows,
    finished_trace,
    ingested_scenario,
    small_scenario,
    trace_contacts,
)


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
    s = ingested_scenario(servers, db_conn, tmp_path / "ingest.log", "202")
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
    s = ingested_scenario(servers, db_conn, tmp_path / "ingest.log", "203")
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


GIVEN_UP = "gave up after 3 interrupted runs"


@pytest.mark.parametrize(
    ("interrupted", "expected"),
    [
        # Its workers died without a word.
        (("", None), (GIVEN_UP, pb.TRACE_STEP_UNSPECIFIED)),
        # Its runs kept losing the database while searching for contacts.
        (
            ("ConnectionDoesNotExistError", "find_contacts"),
            (
                f"{GIVEN_UP}; the last in step find_contacts: ConnectionDoesNotExistError",
                pb.TRACE_STEP_FIND_CONTACTS,
            ),
        ),
    ],
)
def test_a_trace_that_keeps_dying_is_given_up(
    servers: Servers,
    db_conn: Query,
    tmp_path: Path,
    interrupted: tuple[str, str | None],
    expected: tuple[str, int],
) -> None:
    s = ingested_scenario(servers, db_conn, tmp_path / "ingest.log", "204")
    started = ex.start_trace(servers, s.case_id, s.grant_id)
    db_conn(
        "UPDATE traces SET state = 'running', worker_id = 'worker-dead', attempt_count = 3,"
        " lease_until = now() - interval '1 minute', failure_error = $2, failure_step = $3"
        " WHERE trace_id = $1",
        uuid.UUID(started.trace_id),
        *interrupted,
    )
    with worker_process(servers.settings, tmp_path / "w.log"):
        trace = finished_trace(servers, started.trace_id)
    assert trace.state == pb.TRACE_STATE_FAILED
    message, step = expected
    assert trace.error_message == message
    assert (trace.failure.step, trace.failure.error_type) == (step, interrupted[0])
    assert db_conn("SELECT count(*) FROM trace_contacts")[0][0] == 0
    failed = audit_rows(db_conn, "worker.trace.run")
    assert [a["outcome"] for a in failed] == ["failed"]


def test_a_failed_trace_names_its_step_and_error_without_personal_data(
    servers: Servers, db_conn: Query, tmp_path: Path
) -> None:
    s = ingested_scenario(servers, db_conn, tmp_path / "ingest.log", "205")
    # The case's records were purged meanwhile: its key is gone.
    store = keys.open_keystore(servers.settings.keystore_dir, servers.settings.secrets_dir)
    store.destroy_case_key(uuid.UUID(s.case_id))
    started = ex.start_trace(servers, s.case_id, s.grant_id)
    log_file = tmp_path / "w.log"
    with worker_process(servers.settings, log_file):
        trace = finished_trace(servers, started.trace_id)

    assert trace.state == pb.TRACE_STATE_FAILED
    assert trace.failure.step == pb.TRACE_STEP_FIND_VISITS
    assert trace.failure.error_type == "KeyDestroyed"
    assert trace.error_message == "trace failed in step find_visits: KeyDestroyed"
    [failed] = [
        json.loads(line)
        for line in log_file.read_text().splitlines()
        if line.startswith("{") and json.loads(line).get("event") == "trace_failed"
    ]
    assert (failed["step"], failed["error_type"]) == ("find_visits", "KeyDestroyed")
    assert failed["trace_id"] == started.trace_id and failed["level"] == "error"
    text = log_file.read_text()
    for secret in (s.case_person, s.case_phone, *(p.person_id for p in s.people.values())):
        assert secret not in text
    [audited] = audit_rows(db_conn, "worker.trace.run")
    assert audited["outcome"] == "failed"
    assert json.loads(str(audited["details"]))["step"] == "find_visits"
    assert db_conn("SELECT count(*) FROM trace_contacts")[0][0] == 0


@pytest.mark.parametrize(
    ("statement", "record", "fixed"),
    [
        (trace_job.Q["insert_trace_contacts"], records.TraceContactRow, 2),
        (trace_job.Q["insert_case_records"], trace_results.CaseRecordRow, 2),
        (trace_job.Q["raise_risk"], trace_results.RiskRow, 0),
        (trace_job.Q["queue_notifications"], trace_results.NotificationRow, 3),
    ],
    ids=["insert_trace_contacts", "insert_case_records", "raise_risk", "queue_notifications"],
)
def test_each_record_a_run_writes_is_its_statements_columns_in_order(
    statement: str, record: type[object], fixed: int
) -> None:
    """The records go in as one array per field, in field order (db.columns): the
    statement's unnest must take them in that order, numbered after its `fixed`
    leading parameters."""
    found = re.search(r"unnest\(([^)]*)\)\s+AS u \(([^)]*)\)", statement)
    assert found is not None
    params = [p.strip() for p in found.group(1).split(",")]
    names = [n.strip() for n in found.group(2).split(",")]
    fields = [f.name for f in dataclasses.fields(record)]  # type: ignore[arg-type]
    assert names == fields
    assert [p.split("::")[0] for p in params] == [
        f"${fixed + n}" for n in range(1, len(fields) + 1)
    ]


def test_what_the_workers_seal_opens_as_stored_data_was_sealed_and_back(tmp_path: Path) -> None:
    """Rows sealed before the contract module wrote their associated data by hand as
    b"<kind>|" + the owner id's bytes: they must still open, and new ones must open
    where that format is still read."""
    store = keys.KeyStore(tmp_path / "keys", b"k" * keys.KEK_BYTES)
    key = store.case_key(uuid.uuid4(), create=True)
    person = uuid.uuid4().bytes
    for kind, label in [
        (keys.Sealed.CASE_PERSON, b"case|"),
        (keys.Sealed.CONTACT_PERSON, b"contact|"),
        (keys.Sealed.CASE_RECORD_PERSON, b"record|"),
        (keys.Sealed.NOTIFICATION_PERSON, b"notification|"),
        (keys.Sealed.PHONE, b"phone|"),
    ]:
        owner = uuid.uuid4()
        assert kind.open(key, owner, key.encrypt(person, label + owner.bytes)) == person
        assert key.decrypt(kind.seal(key, owner, person), label + owner.bytes) == person
