"""Expiry against a real Postgres and a real key store, by a controllable clock.

Check-in days are made the way the store holds them (a partition per UTC day,
rows with a day-key pseudonym and the person id encrypted under the day key),
written as the migrator; expiry runs as the role that runs it (the Retention
server's on demand, the workers' on the schedule). Synthetic data only.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sys
import uuid
from pathlib import Path

import asyncpg
import pytest

from services.domain.retention import expiry_run
from services.kernel import db
from services.kernel.config import Settings
from services.kernel.keys import KeyDestroyed, KeyStore, Sealed, open_keystore, open_row
from tests.support.database import Query
from tests.support.expiry_helpers import (
    OFFICER,
    days_ago,
    own_keystore,
    partition_days,
    run,
    seed_days,
    utcnow,
)
from tests.support.fleet import stop_gracefully, worker_process
from tests.support.waits import wait_for

RUN_EXPIRY = "stopcovid.retention.v1.RetentionService/RunExpiry"


def destroyed_days(db_conn: Query) -> set[dt.date]:
    return {r[0] for r in db_conn("SELECT day FROM day_keys WHERE destroy_time IS NOT NULL")}


def by_class(result: expiry_run.ExpiryRun) -> dict[str, expiry_run.Deletion]:
    return {r.data_class: r for r in result.reports}


# -- check-ins ---------------------------------------------------------------------


def test_expiry_at_28_days_by_the_clock(settings: Settings, db_conn: Query, tmp_path: Path) -> None:
    """Days 30, 29, 28, 27 days ago; the policy is 28 days. A day goes once the
    whole day is older than 28 days: with the clock a day back only day 30 goes,
    with the real clock day 29 too; 28 and 27 stay, readable."""
    settings, keystore = own_keystore(settings, tmp_path)
    now = utcnow()
    d30, d29, d28, d27 = (days_ago(n, now) for n in (30, 29, 28, 27))
    visits = seed_days(db_conn, keystore, [d30, d29, d28, d27], inbox_day=d30)
    assert db_conn("SELECT count(*) FROM scan_inbox")[0][0] == 1

    first = run(settings, keystore, now=now - dt.timedelta(days=1))
    assert partition_days(db_conn) >= {d29, d28, d27}
    assert d30 not in partition_days(db_conn)
    assert destroyed_days(db_conn) == {d30}
    reports = by_class(first)
    assert set(reports) == {"check_ins", "entry_decisions"}
    check_ins = reports["check_ins"]
    assert check_ins.row_count == 5 + 1  # the day's partition and its inbox row
    assert check_ins.period_days == 28
    assert check_ins.destroyed_key_ids == [f"day-{d30.isoformat()}"]
    assert (check_ins.data_start, check_ins.data_end) == (
        expiry_run.midnight(d30),
        expiry_run.midnight(d29),
    )
    assert reports["entry_decisions"].row_count == 1
    assert db_conn("SELECT count(*) FROM scan_inbox")[0][0] == 0

    second = run(settings, keystore, now=now)
    assert [(r.data_class, r.row_count) for r in second.reports] == [
        ("check_ins", 5),
        ("entry_decisions", 1),
    ]
    assert second.reports[0].destroyed_key_ids == [f"day-{d29.isoformat()}"]
    assert {d28, d27} <= partition_days(db_conn)
    assert not partition_days(db_conn) & {d30, d29}
    assert destroyed_days(db_conn) == {d30, d29}

    # The keys: gone with a tombstone for the expired days, kept for the others.
    for day in (d30, d29):
        assert not keystore.has_day_key(day)
        with pytest.raises(KeyDestroyed):
            open_keystore(settings.keystore_dir, settings.secrets_dir).day_key(day)
    fresh = open_keystore(settings.keystore_dir, settings.secrets_dir)
    kept = [v for v in visits if v.day == d28]
    stored = db_conn(
        "SELECT person_ref, person_enc FROM checkins WHERE day = $1 ORDER BY sequence", d28
    )
    for visit, row in zip(kept, stored, strict=True):
        key = fresh.day_key(d28, create=False)
        opened = open_row(
            key,
            row["person_enc"],
            venue_id=visit.venue_id.bytes,
            device_id=visit.device_id.bytes,
            sequence=visit.sequence,
            day=d28,
        )
        assert opened == visit.person_id.bytes
        assert key.pseudonym(visit.person_id.bytes) == row["person_ref"]

    # Stored reports, one per class per run, and the audit trail of each step.
    stored_reports = db_conn(
        "SELECT run_id, data_class, row_count, destroyed_key_ids, trigger, requester"
        " FROM deletion_reports ORDER BY create_time, data_class"
    )
    assert [(r["data_class"], r["row_count"]) for r in stored_reports] == [
        ("check_ins", 6),
        ("entry_decisions", 1),
        ("check_ins", 5),
        ("entry_decisions", 1),
    ]
    assert {r["trigger"] for r in stored_reports} == {"on_demand"}
    assert {r["requester"] for r in stored_reports} == {OFFICER.name}
    events = db_conn(
        "SELECT principal, action, resource_type, resource_id, details FROM audit_events"
        " ORDER BY event_id"
    )
    steps = [
        (e["resource_type"], e["resource_id"], json.loads(e["details"])["step"]) for e in events
    ]
    assert steps == [
        ("checkins_day", d30.isoformat(), "drop_partition"),
        ("day_key", f"day-{d30.isoformat()}", "destroy_day_key"),
        ("checkins_day", d29.isoformat(), "drop_partition"),
        ("day_key", f"day-{d29.isoformat()}", "destroy_day_key"),
    ]
    assert {(e["principal"], e["action"]) for e in events} == {(OFFICER.name, RUN_EXPIRY)}

    # Running again deletes nothing more and reports nothing.
    again = run(settings, keystore, now=now)
    assert again.reports == []
    assert db_conn("SELECT count(*) FROM deletion_reports")[0][0] == 4
    assert db_conn("SELECT count(*) FROM checkins WHERE day IN ($1, $2)", d28, d27)[0][0] == 10


def test_a_dry_run_reports_and_deletes_nothing(
    settings: Settings, db_conn: Query, tmp_path: Path
) -> None:
    settings, keystore = own_keystore(settings, tmp_path)
    d40, d20 = days_ago(40), days_ago(20)
    seed_days(db_conn, keystore, [d40, d20], per_day=3, denied_per_day=0)
    result = run(settings, keystore, dry_run=True)
    assert result.run_id is None
    assert [(r.data_class, r.row_count, r.deletion_report_id) for r in result.reports] == [
        ("check_ins", 3, None)
    ]
    assert partition_days(db_conn) >= {d40, d20}
    assert keystore.has_day_key(d40)
    assert destroyed_days(db_conn) == set()
    assert db_conn("SELECT count(*) FROM deletion_reports")[0][0] == 0
    assert db_conn("SELECT count(*) FROM audit_events")[0][0] == 0


def test_a_run_cut_short_after_destroying_keys_is_finished_by_the_next(
    settings: Settings, db_conn: Query, tmp_path: Path
) -> None:
    """Keys go first: a run that died after destroying a day's key and before
    dropping its partition leaves rows nobody can read; the next run drops them
    and records the key destroyed. A day key whose day has no partition (nothing
    was stored that day) is destroyed too."""
    settings, keystore = own_keystore(settings, tmp_path)
    d31, d30 = days_ago(31), days_ago(30)
    seed_days(db_conn, keystore, [d31], per_day=4, denied_per_day=0)
    empty = keystore.day_key(d30)
    db_conn("INSERT INTO day_keys (day, key_id) VALUES ($1, $2)", d30, empty.key_id)
    assert keystore.destroy_day_key(d31)  # the run that died did this much

    result = run(settings, keystore, classes=["check_ins"])
    (report,) = result.reports
    assert report.row_count == 4
    assert report.destroyed_key_ids == [f"day-{d31.isoformat()}", f"day-{d30.isoformat()}"]
    assert not partition_days(db_conn) & {d31, d30}
    assert destroyed_days(db_conn) == {d31, d30}
    assert not keystore.has_day_key(d30)
    assert run(settings, keystore, classes=["check_ins"]).reports == []


def expired_tables(db_conn: Query) -> list[str]:
    rows = db_conn("SELECT relname FROM pg_class WHERE relname LIKE 'expired_checkins_%'")
    return [r[0] for r in rows]


def test_a_run_removes_the_detached_files_and_those_a_dead_run_left(
    settings: Settings, db_conn: Query, tmp_path: Path
) -> None:
    """Expiry detaches a day's partition in its transaction and removes its files
    right after committing. A run that died in between leaves a detached table
    (out of the store, its key destroyed); the next run removes it."""
    settings, keystore = own_keystore(settings, tmp_path)
    d32, d31 = days_ago(32), days_ago(31)
    seed_days(db_conn, keystore, [d32, d31], per_day=3, denied_per_day=0)
    # A run that died after committing d32's detach, before removing its files.
    assert keystore.destroy_day_key(d32)
    db_conn("SELECT expire_checkin_day($1)", d32)
    assert expired_tables(db_conn) == [f"expired_checkins_{d32:%Y%m%d}"]
    assert d32 not in partition_days(db_conn)

    result = run(settings, keystore, classes=["check_ins"])

    assert expired_tables(db_conn) == []
    assert not partition_days(db_conn) & {d32, d31}
    assert "reclaim_s" in result.timings


def test_the_drop_function_refuses_recent_days_whatever_the_caller(settings: Settings) -> None:
    """expire_checkin_day runs with the owner's rights, so it checks the day itself
    against the database's clock: a caller with a wrong clock cannot drop a day
    younger than the shortest period (28 days)."""

    async def go() -> None:
        conn = await asyncpg.connect(**db.connect_args(settings, "stopcovid_retention").kwargs())
        try:
            with pytest.raises(asyncpg.InvalidParameterValueError):
                await conn.fetch("SELECT * FROM expire_checkin_day(current_date - 28)")
            rows = await conn.fetch("SELECT * FROM expire_checkin_day(current_date - 29)")
            assert [tuple(r) for r in rows] == [(False, 0)]
        finally:
            await conn.close()

    asyncio.run(go())


def test_an_on_demand_run_waits_for_a_running_one(
    settings: Settings, db_conn: Query, tmp_path: Path
) -> None:
    """Runs are serialized by an advisory lock: while another run holds it, a new
    one waits (seen in pg_locks), and once it is released goes on and finds what
    is left."""
    settings, keystore = own_keystore(settings, tmp_path)
    d35 = days_ago(35)
    seed_days(db_conn, keystore, [d35], per_day=2, denied_per_day=0)

    async def go() -> expiry_run.ExpiryRun:
        holder = await asyncpg.connect(**db.connect_args(settings, db.MIGRATOR).kwargs())
        pool = await db.create_pool(settings, "stopcovid_retention")
        try:
            await holder.execute(expiry_run.Q["lock"])
            task = asyncio.create_task(
                expiry_run.run_expiry(
                    pool, keystore, now=utcnow(), trigger=expiry_run.ON_DEMAND, requester=OFFICER
                )
            )
            for _ in range(600):
                waiting = await holder.fetchval(
                    "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
                    " WHERE l.locktype = 'advisory' AND NOT l.granted"
                    " AND a.usename = 'stopcovid_retention'"
                )
                if waiting:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the run never waited for the lock")
            assert not task.done()
            # Nothing happened while it waited.
            assert await holder.fetchval("SELECT to_regclass($1)", f"checkins_{d35:%Y%m%d}")
            await holder.execute(expiry_run.Q["unlock"])
            return await asyncio.wait_for(task, 60)
        finally:
            await holder.close()
            await pool.close()

    result = asyncio.run(go())
    assert [(r.data_class, r.row_count) for r in result.reports] == [("check_ins", 2)]
    assert d35 not in partition_days(db_conn)


# -- case records, notifications, inactive enrollments -------------------------------


def make_case(db_conn: Query, keystore: KeyStore, age_days: int, contacts: int = 2) -> uuid.UUID:
    """A case whose only trace ended `age_days` ago, with `contacts` trace contacts,
    a case record per contact and a sent notification per contact, encrypted under
    the case's key."""
    at = utcnow() - dt.timedelta(days=age_days)
    case_id, request_id, grant_id, trace_id = (uuid.uuid4() for _ in range(4))
    key = keystore.case_key(case_id, create=True)
    person = uuid.uuid4()
    window = (at - dt.timedelta(days=3), at - dt.timedelta(days=1))
    db_conn(
        "INSERT INTO cases (case_id, person_index, person_enc, test_date, window_start,"
        " window_end, reporter, report_time) VALUES ($1, $2, $3, $4, $5, $6, 'moh', $7)",
        case_id,
        keystore.person_index(person.bytes),
        Sealed.CASE_PERSON.seal(key, case_id, person.bytes),
        at.date(),
        *window,
        at,
    )
    db_conn(
        "INSERT INTO access_requests (access_request_id, case_id, outbreak_reference,"
        " justification, window_start, window_end, state, requester, decider, decide_time,"
        " create_time) VALUES ($1, $2, 'OB-1', 'an outbreak at a market, synthetic', $3, $4,"
        " 'approved', 'official', 'approver', $5, $5)",
        request_id,
        case_id,
        *window,
        at,
    )
    db_conn(
        "INSERT INTO access_grants (grant_id, access_request_id, case_id, window_start,"
        " window_end, create_time, expire_time) VALUES ($1, $2, $3, $4, $5, $6,"
        " $6::timestamptz + interval '3 days')",
        grant_id,
        request_id,
        case_id,
        *window,
        at,
    )
    db_conn(
        "INSERT INTO traces (trace_id, case_id, grant_id, state, window_start, window_end,"
        " starter, create_time, start_time, end_time) VALUES ($1, $2, $3, 'succeeded', $4, $5,"
        " 'official', $6, $6, $6)",
        trace_id,
        case_id,
        grant_id,
        *window,
        at,
    )
    venue = uuid.uuid4()
    for n in range(contacts):
        contact = uuid.uuid4()
        index = keystore.person_index(contact.bytes)
        db_conn(
            "INSERT INTO trace_contacts (trace_id, row_number, case_id, contact_ref, level_rank,"
            " venue_id, case_visit_start, case_visit_end, contact_stay_start, contact_stay_end,"
            " overlap, stay_end_estimated, rule, person_index, person_enc) VALUES ($1, $2, $3,"
            " $4, 3, $5, $6, $7, $6, $7, $10, false, 'indoor overlap', $8, $9)",
            trace_id,
            n + 1,
            case_id,
            f"c{n}",
            venue,
            window[0],
            window[0] + dt.timedelta(hours=1),
            index,
            Sealed.CONTACT_PERSON.seal(key, trace_id, contact.bytes),
            dt.timedelta(hours=1),
        )
        db_conn(
            "INSERT INTO case_records (case_id, trace_id, subject, contact_ref, venue_id,"
            " scan_time, direction, person_index, person_enc, create_time) VALUES ($1, $2,"
            " 'contact', $3, $4, $5, 'entry', $6, $7, $8)",
            case_id,
            trace_id,
            f"c{n}",
            venue,
            window[0],
            index,
            Sealed.CASE_RECORD_PERSON.seal(key, trace_id, contact.bytes),
            at,
        )
        db_conn(
            "INSERT INTO notifications (notification_id, trace_id, grant_id, case_id,"
            " contact_ref, person_index, person_enc, risk_level, template, state, send_time,"
            " finish_time, create_time) VALUES ($1, $2, $3, $4, $5, $6, $7, 'medium', 'v1',"
            " 'sent', $8, $8, $8)",
            uuid.uuid4(),
            trace_id,
            grant_id,
            case_id,
            f"c{n}",
            index,
            b"synthetic",
            at,
        )
    return case_id


def test_case_records_are_purged_with_their_case_key(
    settings: Settings, db_conn: Query, tmp_path: Path
) -> None:
    """At 90 days (the default) a case traced 91 days ago loses its contacts,
    records and encrypted person, and its key; one traced 89 days ago keeps all."""
    settings, keystore = own_keystore(settings, tmp_path)
    old = make_case(db_conn, keystore, 91, contacts=3)
    young = make_case(db_conn, keystore, 89, contacts=2)

    result = run(settings, keystore, classes=["case_records"])
    (report,) = result.reports
    assert (report.data_class, report.period_days, report.row_count) == ("case_records", 90, 6)
    assert report.destroyed_key_ids == [f"case-{old}"]
    with pytest.raises(KeyDestroyed):
        open_keystore(settings.keystore_dir, settings.secrets_dir).case_key(old)
    open_keystore(settings.keystore_dir, settings.secrets_dir).case_key(young)

    def left(case_id: uuid.UUID) -> tuple[int, int, bytes, bool]:
        row = db_conn(
            "SELECT (SELECT count(*) FROM trace_contacts t WHERE t.case_id = c.case_id),"
            " (SELECT count(*) FROM case_records r WHERE r.case_id = c.case_id),"
            " c.person_enc, c.purge_time IS NOT NULL FROM cases c WHERE c.case_id = $1",
            case_id,
        )[0]
        return row[0], row[1], bytes(row[2]), row[3]

    assert left(old) == (0, 0, b"", True)
    young_left = left(young)
    assert young_left[:2] == (2, 2) and young_left[2] and not young_left[3]
    events = db_conn("SELECT case_id, details FROM audit_events ORDER BY event_id")
    assert [(e["case_id"], json.loads(e["details"])["step"]) for e in events] == [
        (old, "purge_case_records"),
        (old, "destroy_case_key"),
    ]
    assert run(settings, keystore, classes=["case_records"]).reports == []


def test_notifications_and_inactive_enrollments_expire(
    settings: Settings, db_conn: Query, tmp_path: Path
) -> None:
    """Notifications sent 29 days ago go at 28 days, those of 27 days ago stay; a
    queued one is never deleted. People without activity for 91 days are deleted
    and recorded as erased at 90 days; the others stay."""
    settings, keystore = own_keystore(settings, tmp_path)
    make_case(db_conn, keystore, 29, contacts=2)
    make_case(db_conn, keystore, 27, contacts=1)
    db_conn(
        "UPDATE notifications SET state = 'queued', finish_time = NULL WHERE contact_ref = 'c1'"
    )
    people = []
    for age in (91, 120, 89):
        person = uuid.uuid4()
        people.append(person)
        db_conn(
            "INSERT INTO people (person_id, phone_index, phone_enc, people_key_id, language_code,"
            " consent_text_version, consent_time, enroll_time, last_activity_time)"
            " VALUES ($1, $2, '\\x00', 'p1', 'km', 'v1', $3, $3, $3)",
            person,
            uuid.uuid4().bytes,
            utcnow() - dt.timedelta(days=age),
        )

    result = run(settings, keystore, classes=["notifications", "inactive_enrollments"])
    reports = by_class(result)
    assert reports["notifications"].row_count == 1
    assert reports["inactive_enrollments"].row_count == 2
    assert reports["inactive_enrollments"].period_days == 90
    assert db_conn("SELECT count(*) FROM notifications")[0][0] == 2
    assert db_conn("SELECT count(*) FROM notifications WHERE state = 'queued'")[0][0] == 1
    assert {r[0] for r in db_conn("SELECT person_id FROM people")} == {people[2]}
    assert {r[0] for r in db_conn("SELECT person_id FROM erased_people")} == set(people[:2])
    details = [json.loads(r[0]) for r in db_conn("SELECT details FROM audit_events")]
    assert sorted((d["step"], d["row_count"]) for d in details) == [
        ("delete_inactive_enrollments", 2),
        ("delete_notifications", 1),
    ]
    assert run(settings, keystore, classes=["notifications", "inactive_enrollments"]).reports == []


def test_registered_expirers_run_in_the_class_transaction(
    settings: Settings, db_conn: Query, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hook for the classes whose tables the accountability part owns: called
    with the cutoff (now - period) and dry_run, its count audited and reported."""
    settings, keystore = own_keystore(settings, tmp_path)
    seen: list[tuple[str, dt.datetime, bool]] = []

    async def grievances(
        conn: db.Conn, data_class: str, cutoff: dt.datetime, dry_run: bool
    ) -> expiry_run.ExtraDeletion:
        seen.append((data_class, cutoff, dry_run))
        assert conn.is_in_transaction()
        return expiry_run.ExtraDeletion(3, cutoff - dt.timedelta(days=2), cutoff)

    monkeypatch.setitem(expiry_run._EXTRA, "grievances", grievances)
    now = utcnow()
    result = run(settings, keystore, now=now, classes=["grievances", "audit_events"])
    assert seen == [("grievances", now - dt.timedelta(days=365), False)]
    (report,) = result.reports
    assert (report.data_class, report.row_count, report.period_days) == ("grievances", 3, 365)
    assert db_conn("SELECT count(*) FROM deletion_reports WHERE data_class = 'grievances'")[0][0]
    with pytest.raises(ValueError, match="run_expiry itself"):
        expiry_run.register_extra("check_ins", grievances)


# -- the schedule, in the worker pool ----------------------------------------------


def test_the_worker_pool_expires_on_its_schedule(
    settings: Settings, db_conn: Query, tmp_path: Path
) -> None:
    """`python -m workers` runs expiry by itself: the old day is dropped, its key
    destroyed, a scheduled report written and each step audited as the worker."""
    settings, keystore = own_keystore(settings, tmp_path)
    d29, d10 = days_ago(29), days_ago(10)
    seed_days(db_conn, keystore, [d29, d10], per_day=3, denied_per_day=0)
    log_file = tmp_path / "workers.log"
    with worker_process(
        settings,
        log_file,
        STOPCOVID_EXPIRY_INTERVAL_S="3600",
        STOPCOVID_EXPIRY_FIRST_DELAY_S="0",
        STOPCOVID_INGEST_WORKERS="1",
    ) as proc:
        try:
            wait_for(
                lambda: bool(db_conn("SELECT count(*) FROM deletion_reports")[0][0]),
                timeout=90,
                what="a scheduled deletion report",
            )
        finally:
            stop_gracefully(proc)
            sys.stderr.write(log_file.read_text())
    assert proc.returncode == 0
    (report,) = db_conn("SELECT * FROM deletion_reports")
    assert (report["data_class"], report["row_count"], report["trigger"]) == (
        "check_ins",
        3,
        "scheduled",
    )
    assert report["requester"] == ""
    assert report["destroyed_key_ids"] == [f"day-{d29.isoformat()}"]
    assert d29 not in partition_days(db_conn) and d10 in partition_days(db_conn)
    assert not keystore.has_day_key(d29)
    actions = {
        (r[0], r[1])
        for r in db_conn(
            "SELECT principal, action FROM audit_events WHERE action LIKE 'worker.expiry.%'"
        )
    }
    assert actions == {
        ("worker", "worker.expiry.drop_partition"),
        ("worker", "worker.expiry.destroy_day_key"),
    }


def test_a_day_goes_once_it_is_wholly_past_the_period() -> None:
    day = dt.date(2026, 10, 1)
    goes = expiry_run.midnight(day + dt.timedelta(days=1 + 28))
    assert expiry_run.last_expired_day(goes, 28) == day
    assert expiry_run.last_expired_day(goes - dt.timedelta(microseconds=1), 28) < day
    # Every class has its step but the entry decisions, which go with their day.
    assert set(expiry_run.CLASSES) - set(expiry_run.STEPS) == {"entry_decisions"}
