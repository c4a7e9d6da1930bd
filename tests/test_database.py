"""Schema, migrations and the least-privilege database roles, on the real cluster."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from services.kernel import db
from services.kernel.config import Settings
from services.ops import migrate, setup
from tests.support.database import Cluster


def run_as(
    settings: Settings, role: str, fn: Callable[[asyncpg.Connection], Awaitable[Any]]
) -> Any:
    async def go() -> Any:
        conn = await asyncpg.connect(**db.connect_args(settings, role).kwargs())
        try:
            return await fn(conn)
        finally:
            await conn.close()

    return asyncio.run(go())


def test_migrations_are_idempotent(settings: Settings) -> None:
    assert asyncio.run(setup.migrate_only(settings)) == []
    versions = run_as(
        settings,
        db.MIGRATOR,
        lambda c: c.fetch("SELECT version FROM schema_migrations ORDER BY version"),
    )
    assert [r[0] for r in versions] == [m.version for m in migrate.migrations()]


def test_bootstrap_is_idempotent(settings: Settings, cluster: Cluster) -> None:
    passwords = setup.ensure_db_passwords(settings)
    assert asyncio.run(setup.prepare_database(settings, cluster.admin_dsn, passwords)) == []


def test_an_edited_applied_migration_is_refused(settings: Settings, tmp_path: Path) -> None:
    edited = tmp_path / "migrations"
    shutil.copytree(migrate.MIGRATIONS_DIR, edited)
    first = sorted(edited.glob("*.sql"))[0]
    first.write_text(first.read_text() + "\n-- a harmless-looking edit\n")

    async def go(conn: asyncpg.Connection) -> None:
        await migrate.migrate(conn, edited)

    with pytest.raises(RuntimeError, match="was edited after it was applied"):
        run_as(settings, db.MIGRATOR, go)


def test_migration_files_must_be_numbered_without_gaps(tmp_path: Path) -> None:
    (tmp_path / "0001_a.sql").write_text("SELECT 1;")
    (tmp_path / "0003_c.sql").write_text("SELECT 1;")
    with pytest.raises(ValueError, match="without gaps"):
        migrate.migrations(tmp_path)
    (tmp_path / "2_bad_name.sql").write_text("SELECT 1;")
    with pytest.raises(ValueError, match="must look like"):
        migrate.migrations(tmp_path)


VENUE_ROW = """INSERT INTO venues (venue_id, display_name, setting, region_code, created_by)
VALUES (gen_random_uuid(), 'Shop', 'indoor', 'KH-12', 'someone')"""
AUDIT_ROW = """INSERT INTO audit_events (principal, role, action, resource_type, resource_id)
VALUES ('p', 'ROLE_AUDITOR', 'x', 'y', 'z')"""
REVOCATION_ROW = """INSERT INTO certificate_revocations (serial, reason, revoked_by)
VALUES ('abc123', 'key_compromise', 'ops:someone')"""
SERVERS = [db.SERVICE_ROLES[s] for s in ("checkin", "venue", "exposure", "retention")]


@pytest.mark.parametrize(
    ("role", "statement", "allowed"),
    [
        # The venue service manages venues but can never delete one.
        ("stopcovid_venue", VENUE_ROW, True),
        ("stopcovid_venue", "UPDATE venues SET capacity = 1", True),
        ("stopcovid_venue", "DELETE FROM venues", False),
        ("stopcovid_venue", "TRUNCATE venues", False),
        # Other services read venues and nothing more.
        ("stopcovid_checkin", "SELECT count(*) FROM venues", True),
        ("stopcovid_checkin", VENUE_ROW, False),
        ("stopcovid_exposure", "UPDATE venues SET capacity = 1", False),
        # Retention names venues in exports and grievances.
        ("stopcovid_retention", "SELECT count(*) FROM venues", True),
        ("stopcovid_retention", "UPDATE venues SET capacity = 1", False),
        # The audit log is append-only for every service, readable by retention alone.
        *[(r, AUDIT_ROW, True) for r in db.SERVICE_ROLES.values()],
        *[(r, "UPDATE audit_events SET action = 'x'", False) for r in db.SERVICE_ROLES.values()],
        *[(r, "DELETE FROM audit_events", False) for r in db.SERVICE_ROLES.values()],
        ("stopcovid_venue", "SELECT count(*) FROM audit_events", False),
        ("stopcovid_retention", "SELECT count(*) FROM audit_events", True),
        # The chain head moves only by the audit trigger; audit expiry only through
        # its function, which records a checkpoint.
        *[
            (r, "UPDATE audit_chain_head SET last_sequence = 0", False)
            for r in db.SERVICE_ROLES.values()
        ],
        ("stopcovid_checkin", "SELECT expire_audit_before(now())", False),
        ("stopcovid_worker", "SELECT expire_audit_before(now() - interval '3650 days')", True),
        # Withdrawal unlinks check-ins: the two person columns and nothing else.
        ("stopcovid_retention", "UPDATE checkins SET person_enc = ''", True),
        ("stopcovid_retention", "UPDATE checkins SET venue_id = venue_id", False),
        ("stopcovid_retention", "UPDATE notifications SET template = 'x'", False),
        # Grievances are the Retention service's alone.
        ("stopcovid_exposure", "SELECT count(*) FROM grievances", False),
        ("stopcovid_retention", "SELECT count(*) FROM grievances", True),
        # Nobody but the migrator changes the schema.
        *[(r, "CREATE TABLE sneaky (x int)", False) for r in db.SERVICE_ROLES.values()],
        *[(r, "DROP TABLE venues", False) for r in db.SERVICE_ROLES.values()],
        ("stopcovid_worker", "SELECT count(*) FROM schema_migrations", False),
        # Retention policies: changed by the Retention server only; read by the workers'
        # expiry; deletion reports are never rewritten. Only the owner-rights function
        # drops check-in days, and only for the roles that run expiry.
        ("stopcovid_retention", "UPDATE retention_policies SET version = version", True),
        ("stopcovid_worker", "SELECT count(*) FROM retention_policies", True),
        ("stopcovid_worker", "UPDATE retention_policies SET version = version", False),
        ("stopcovid_venue", "SELECT count(*) FROM retention_policies", False),
        ("stopcovid_retention", "UPDATE deletion_reports SET row_count = 0", False),
        ("stopcovid_retention", "DELETE FROM deletion_reports", False),
        ("stopcovid_retention", "SELECT * FROM expire_checkin_day('2000-01-01')", True),
        ("stopcovid_worker", "SELECT * FROM expire_checkin_day('2000-01-01')", True),
        ("stopcovid_checkin", "SELECT * FROM expire_checkin_day('2000-01-01')", False),
        ("stopcovid_exposure", "SELECT * FROM expire_checkin_day('2000-01-01')", False),
        ("stopcovid_retention", "DELETE FROM checkins", False),
        # Revocations: written (and audited) by the certificate commands alone, final
        # once written, read by every server.
        (db.PKI_OPERATOR, REVOCATION_ROW, True),
        (db.PKI_OPERATOR, AUDIT_ROW, True),
        (db.PKI_OPERATOR, "UPDATE certificate_revocations SET note = 'x'", False),
        (db.PKI_OPERATOR, "DELETE FROM certificate_revocations", False),
        (db.PKI_OPERATOR, "SELECT count(*) FROM audit_events", False),
        (db.PKI_OPERATOR, "SELECT count(*) FROM venues", False),
        (db.PKI_OPERATOR, "CREATE TABLE sneaky (x int)", False),
        *[(r, "SELECT count(*) FROM certificate_revocations", True) for r in SERVERS],
        *[(r, REVOCATION_ROW, False) for r in db.SERVICE_ROLES.values()],
        ("stopcovid_worker", "SELECT count(*) FROM certificate_revocations", False),
    ],
)
def test_each_role_has_only_the_privileges_it_needs(
    settings: Settings, role: str, statement: str, allowed: bool
) -> None:
    async def go(conn: asyncpg.Connection) -> None:
        async with conn.transaction():
            await conn.execute(statement)

    if allowed:
        run_as(settings, role, go)
    else:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            run_as(settings, role, go)


def test_other_roles_cannot_connect(settings: Settings, cluster: Cluster) -> None:
    """CONNECT is revoked from PUBLIC: a login role of the cluster that is not ours is
    refused at the door of the database."""
    stranger = f"stranger_{settings.database_name[-8:]}"

    async def go() -> None:
        admin = await asyncpg.connect(cluster.admin_dsn)
        try:
            await admin.execute(f"CREATE ROLE {stranger} LOGIN PASSWORD 'not-a-secret-1'")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await asyncpg.connect(
                    dsn=settings.database_url,
                    user=stranger,
                    password="not-a-secret-1",
                    database=settings.database_name,
                )
        finally:
            await admin.execute(f"DROP ROLE IF EXISTS {stranger}")
            await admin.close()

    asyncio.run(go())
