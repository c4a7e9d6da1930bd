"""services/sql/schema.sql cannot drift from the migrations: one database is built by
the migrations, one by running schema.sql, and their dumps (tools/schema.py: pg_dump
of the schema and the seeded rows, without pg_dump's comments and session settings)
must be the same. `./dev gen` regenerates the file."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, replace

import pytest

from services.kernel import db
from services.kernel.config import Settings
from tests.support.database import Cluster, admin, make_query
from tools import schema


@dataclass(frozen=True)
class Built:
    migrated: Settings
    loaded: Settings
    dumped: str
    """The migrated database's dump."""


@pytest.fixture(scope="module")
def built(session_settings: Settings, cluster: Cluster) -> Iterator[Built]:
    """A database built by the migrations and one built from schema.sql."""
    suffix = secrets.token_hex(4)
    migrated = replace(session_settings, database_name=f"stopcovid_schema_migrated_{suffix}")
    loaded = replace(session_settings, database_name=f"stopcovid_schema_loaded_{suffix}")
    try:
        asyncio.run(schema.build_from_migrations(migrated, cluster.admin_dsn))
        asyncio.run(schema.build_from_schema(loaded, cluster.admin_dsn, schema.SCHEMA.read_text()))
        yield Built(migrated, loaded, schema.dump(migrated))
    finally:
        for database in (migrated, loaded):
            asyncio.run(
                admin(cluster, f'DROP DATABASE IF EXISTS "{database.database_name}" WITH (FORCE)')
            )


def test_schema_sql_builds_the_database_the_migrations_build(built: Built) -> None:
    diff = schema.difference(built.dumped, schema.dump(built.loaded), "schema.sql")
    assert not diff, f"services/sql/schema.sql is stale: run ./dev gen\n{diff[:6000]}"


def test_schema_sql_holds_the_schema_and_the_seeded_rows() -> None:
    """The dump is of something: a sample of what the migrations make is in the file."""
    text = schema.SCHEMA.read_text()
    for piece in (
        "CREATE TABLE public.venues (",
        "CREATE FUNCTION public.audit_chain_link()",
        "CREATE TRIGGER scan_inbox_notify",
        "PARTITION BY RANGE (day)",
        "GRANT SELECT,INSERT ON TABLE public.scan_inbox TO stopcovid_checkin;",
        "INSERT INTO public.retention_policies",
        "-- Taken under the lock, so times follow the chain order.",  # a function's comment
    ):
        assert piece in text, piece
    assert "\\restrict" not in text and "Dumped from database version" not in text
    assert schema.RUNNER_TABLE not in text.split(schema.HEADER, 1)[1]


@pytest.mark.parametrize(
    "change",
    [
        "ALTER TABLE venues ADD COLUMN scratch integer",
        "REVOKE SELECT ON venues FROM stopcovid_checkin",
        "UPDATE retention_policies SET period_days = 29 WHERE data_class = 'check_ins'",
        # Only a comment inside a function's body: bodies are compared whole.
        "CREATE OR REPLACE FUNCTION notify_inbox() RETURNS trigger LANGUAGE plpgsql"
        " AS $$ BEGIN -- changed\n PERFORM pg_notify('stopcovid_inbox', ''); RETURN NULL; END $$",
    ],
    ids=["column", "grant", "seeded-row", "function-comment"],
)
def test_the_comparison_sees_a_change(
    built: Built, cluster: Cluster, session_settings: Settings, change: str
) -> None:
    """A copy of the migrated database, changed once, no longer compares equal."""
    copy = replace(session_settings, database_name=f"stopcovid_schema_copy_{secrets.token_hex(4)}")
    asyncio.run(
        admin(
            cluster,
            f'CREATE DATABASE "{copy.database_name}" TEMPLATE "{built.migrated.database_name}"'
            f" OWNER {db.MIGRATOR}",
        )
    )
    try:
        make_query(copy)(change)
        assert schema.difference(built.dumped, schema.dump(copy), "changed")
    finally:
        asyncio.run(admin(cluster, f'DROP DATABASE IF EXISTS "{copy.database_name}" WITH (FORCE)'))


def test_normalising_drops_pg_dumps_own_lines_and_keeps_bodies_whole() -> None:
    dumped = "\n".join(
        [
            "--",
            "-- PostgreSQL database dump",
            "--",
            "",
            "\\restrict AbC123",
            "SET statement_timeout = 0;",
            "SELECT pg_catalog.set_config('search_path', '', false);",
            "",
            "",
            "CREATE FUNCTION public.f() RETURNS void",
            "    LANGUAGE sql",
            "    AS $_$",
            "-- a comment the function keeps",
            "SET work_mem = '1MB';",
            "",
            "",
            "SELECT '$$ -- not a comment';",
            "$_$;",
            "",
            "CREATE TABLE public.t (a text DEFAULT '-- still a string' NOT NULL);",
            "\\unrestrict AbC123",
            "",
        ]
    )
    assert schema.normalise(dumped) == "\n".join(
        [
            "CREATE FUNCTION public.f() RETURNS void",
            "    LANGUAGE sql",
            "    AS $_$",
            "-- a comment the function keeps",
            "SET work_mem = '1MB';",
            "",
            "",
            "SELECT '$$ -- not a comment';",
            "$_$;",
            "",
            "CREATE TABLE public.t (a text DEFAULT '-- still a string' NOT NULL);",
            "",
        ]
    )
