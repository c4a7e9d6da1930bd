"""Expiry's test fixtures in the database and the key store: check-in days made the
way the store holds them (a partition per UTC day, rows with a day-key pseudonym and
the person id encrypted under the day key, written as the migrator), a key store of a
test's own, and one expiry run as the role that runs it. Synthetic data only."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from services.domain.retention import expiry_run
from services.kernel import audit, db
from services.kernel.auth import Principal
from services.kernel.config import Settings
from services.kernel.keys import KeyStore, open_keystore, seal_row
from tests.support.database import Query

OFFICER = Principal("test-retention-officer", "ROLE_RETENTION_OFFICER", "")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def days_ago(n: int, now: dt.datetime | None = None) -> dt.date:
    return (now or utcnow()).date() - dt.timedelta(days=n)


@dataclass(frozen=True)
class Visit:
    """One stored check-in and, for the tests, whose it is."""

    day: dt.date
    person_id: uuid.UUID
    venue_id: uuid.UUID
    device_id: uuid.UUID
    sequence: int
    outcome: str


def own_keystore(settings: Settings, tmp_path: Path) -> tuple[Settings, KeyStore]:
    """Settings with a key store of this test's own (destroyed keys leave tombstones
    that must not reach other tests), and that store."""
    own = replace(settings, keystore_override=tmp_path / "keys")
    return own, open_keystore(own.keystore_dir, own.secrets_dir)


def seed_days(
    db_conn: Query,
    keystore: KeyStore,
    days: list[dt.date],
    *,
    per_day: int = 5,
    denied_per_day: int = 1,
    inbox_day: dt.date | None = None,
) -> list[Visit]:
    """For each day: its key (in the key store and day_keys), its partition and
    `per_day` check-ins (the first `denied_per_day` of them denials), encrypted as
    the CheckIn server encrypts them. With `inbox_day`, one more scan of that day
    still waits in the inbox."""
    venue = uuid.uuid4()
    device = uuid.uuid4()
    visits: list[Visit] = []
    rows: list[tuple[Any, ...]] = []
    sequence = 0
    for day in days:
        key = keystore.day_key(day)
        db_conn("INSERT INTO day_keys (day, key_id) VALUES ($1, $2)", day, key.key_id)
        db_conn("SELECT ensure_checkin_partition($1)", day)
        for i in range(per_day):
            sequence += 1
            person = uuid.uuid4()
            outcome = "denied" if i < denied_per_day else "admitted"
            at = dt.datetime.combine(day, dt.time(9, i), dt.UTC)
            rows.append(
                (
                    day,
                    venue,
                    device,
                    sequence,
                    at,
                    "entry",
                    outcome,
                    uuid.uuid4() if outcome == "denied" else None,
                    key.key_id,
                    key.pseudonym(person.bytes),
                    seal_row(
                        key,
                        person.bytes,
                        venue_id=venue.bytes,
                        device_id=device.bytes,
                        sequence=sequence,
                        day=day,
                    ),
                    at,
                )
            )
            visits.append(Visit(day, person, venue, device, sequence, outcome))
    insert = (
        "INSERT INTO {} (day, venue_id, device_id, sequence, scan_time, direction, outcome,"
        " decision_id, day_key_id, person_ref, person_enc, receive_time)"
        " SELECT * FROM unnest($1::date[], $2::uuid[], $3::uuid[], $4::bigint[],"
        " $5::timestamptz[], $6::text[], $7::text[], $8::uuid[], $9::text[], $10::bytea[],"
        " $11::bytea[], $12::timestamptz[])"
    )
    db_conn(insert.format("checkins"), *(list(col) for col in zip(*rows, strict=True)))
    if inbox_day is not None:
        waiting = next(r for r in rows if r[0] == inbox_day)
        db_conn(insert.format("scan_inbox"), *([v] for v in waiting))
    return visits


def run(
    settings: Settings,
    keystore: KeyStore,
    *,
    now: dt.datetime | None = None,
    classes: list[str] | None = None,
    dry_run: bool = False,
    role: str = "retention",
) -> expiry_run.ExpiryRun:
    """One expiry run as `role` (on demand for retention, scheduled for the worker)."""

    async def go() -> expiry_run.ExpiryRun:
        pool = await db.create_pool(settings, db.SERVICE_ROLES[role])
        try:
            return await expiry_run.run_expiry(
                pool,
                keystore,
                now=now or utcnow(),
                classes=classes,
                trigger=expiry_run.ON_DEMAND if role == "retention" else expiry_run.SCHEDULED,
                requester=OFFICER if role == "retention" else audit.WORKER,
                dry_run=dry_run,
            )
        finally:
            await pool.close()

    return asyncio.run(go())


def partition_days(db_conn: Query) -> set[dt.date]:
    rows = db_conn(
        "SELECT to_date(substr(c.relname, 10), 'YYYYMMDD') FROM pg_inherits i"
        " JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'checkins'::regclass"
    )
    return {r[0] for r in rows}
