"""The Retention service's query layer tied to the schema: each record's fields are
columns of what it is read from, insert_grievance's column list is NewGrievance's
fields in order, the enum words are the ones the CHECKs allow, and the views of
migration 0008 read only what the tables beneath let a role read."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import typing
import uuid
from typing import Any

import asyncpg
import pytest
from stopcovid.retention.v1 import retention_service_pb2 as pb

from services.domain.checkins import inbox
from services.domain.exposure import records
from services.kernel import db
from services.kernel.config import Settings
from services.retention import queries, vocabulary
from services.retention.queries import audit_log, data_subject, grievances, policies
from services.retention.queries import transparency as figures
from tests.support.database import Query

COLUMNS = (
    "SELECT attname FROM pg_attribute WHERE attrelid = $1::regclass AND attnum > 0"
    " AND NOT attisdropped ORDER BY attnum"
)
# The CHECKs that bound one column to a list of words.
WORD_CHECKS = (
    "SELECT c.check_clause FROM information_schema.check_constraints c"
    " JOIN information_schema.constraint_column_usage u USING (constraint_schema, constraint_name)"
    " WHERE u.table_name = $1 AND u.column_name = $2 AND c.check_clause LIKE '%= ANY%'"
)


def columns(db_conn: Query, relation: str) -> list[str]:
    return [r[0] for r in db_conn(COLUMNS, relation)]


def field_names(cls: type[Any]) -> list[str]:
    """The names `queries.params` lists the values of, in order."""
    hints = typing.get_type_hints(cls)
    found: list[str] = []
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        nested = isinstance(kind, type) and dataclasses.is_dataclass(kind)
        found += field_names(kind) if nested else [f.name]
    return found


def check_words(db_conn: Query, table: str, column: str) -> set[str]:
    """The words the CHECK on `table.column` allows."""
    (clause,) = [r[0] for r in db_conn(WORD_CHECKS, table, column)]
    return set(re.findall(r"'(\w+)'::text", clause))


@pytest.mark.parametrize(
    ("record", "relation"),
    [
        (grievances.Grievance, "grievances_now"),
        (grievances.Filed, "grievances"),
        (grievances.DenialSnapshot, "grievances"),
        (grievances.Denial, "entry_denials"),
        (records.Risk, "risk_history"),
        (audit_log.AuditEvent, "audit_events"),
        (audit_log.ChainHead, "audit_chain_head"),
        (policies.Policy, "retention_policies"),
        (policies.StoredReport, "deletion_reports"),
        (data_subject.SentNotification, "notifications"),
    ],
)
def test_each_record_reads_columns_of_its_relation(
    db_conn: Query, record: type[Any], relation: str
) -> None:
    have = set(columns(db_conn, relation))
    wanted = {f.name for f in dataclasses.fields(record)} - {"denial"}
    assert wanted <= have, wanted - have


def test_a_new_grievance_is_the_inserts_column_list_in_order() -> None:
    """insert_grievance takes NewGrievance's fields as $1 to $24, by position: its
    column list must name them in the same order, then the due time and the
    request_id's owner."""
    sql = grievances.Q["insert_grievance"]
    listed = re.search(r"INSERT INTO grievances \(([^)]*)\)", sql)
    assert listed is not None
    named = [c.strip() for c in listed[1].split(",")]
    assert named == [*field_names(grievances.NewGrievance), "due_time", "request_owner"]
    assert "now() + $25::interval, $26)" in sql


def test_params_flattens_a_nested_record_in_place() -> None:
    new = grievances.NewGrievance(
        grievance_id=uuid.UUID(int=1),
        tracking_id="G-2222-2222",
        secret_hash=b"h",
        category="privacy",
        description_enc=b"d",
        contact_enc=b"c",
        text_key_id="p1",
        venue_id=None,
        incident_date=None,
        denial_decision_id=None,
        body="regulator",
        filer="front-end",
        request_id=None,
    )
    values = queries.params(new)
    assert len(values) == len(field_names(grievances.NewGrievance)) == 24
    # An ordinary grievance has the empty snapshot: its defaults, as the table's.
    assert values[13:] == [None] * 6 + [""] + [None] + [""] + [None] * 2


def test_record_takes_only_its_fields() -> None:
    row: dict[str, Any] = {"level": "low", "reason": None, "exposure_time": None}
    row |= {"venue_id": None, "venue_display_name": "", "overlap": None, "rule": "r", "extra": 1}
    found = queries.record(records.Risk, row)
    assert found == records.Risk("low", None, None, None, "", None, "r")
    with pytest.raises(KeyError):
        queries.record(records.Risk, {"level": "low"})


def test_the_views_columns(db_conn: Query) -> None:
    assert columns(db_conn, "entry_denials") == list(inbox.COLUMNS)
    assert columns(db_conn, "grievances_now") == [*columns(db_conn, "grievances"), "overdue"]


def test_counts_and_figures_are_named_as_the_api_fields() -> None:
    report = set(pb.GetTransparencyReportResponse.DESCRIPTOR.fields_by_name)
    assert {f.name for f in dataclasses.fields(figures.Counts)} <= report
    assert {f.name for f in dataclasses.fields(figures.ClassDeletions)} <= set(
        pb.DataClassDeletionCount.DESCRIPTOR.fields_by_name
    )
    named = set(re.findall(r"'(\w+_count)'", figures.Q["province_figures"]))
    assert named == set(pb.ProvinceCount.DESCRIPTOR.fields_by_name) - {
        "region_code",
        "name_en",
        "name_km",
    }


@pytest.mark.parametrize(
    ("words", "table", "column"),
    [
        (vocabulary.CATEGORIES, "grievances", "category"),
        (vocabulary.BODIES, "grievances", "body"),
        (vocabulary.STATES, "grievances", "state"),
        (vocabulary.OUTCOMES, "grievances", "outcome"),
        (vocabulary.TRIGGERS, "deletion_reports", "trigger"),
        (vocabulary.AUDIT_OUTCOMES, "audit_events", "outcome"),
        (vocabulary.DIRECTIONS, "checkins", "direction"),
    ],
)
def test_enum_words_are_the_schemas(
    db_conn: Query, words: vocabulary.EnumMap[Any], table: str, column: str
) -> None:
    assert set(words.words()) == check_words(db_conn, table, column)


def test_the_views_are_read_with_the_callers_rights(db_conn: Query, settings: Settings) -> None:
    """Every view of 0008 is security_invoker, and only the Retention role may use
    them: a role that may not read grievances or check-ins reads nothing through them."""
    options = {
        r[0]: r[1]
        for r in db_conn(
            "SELECT relname, reloptions FROM pg_class WHERE relname = ANY ($1::text[])",
            ["entry_denials", "grievances_now"],
        )
    }
    assert sorted(options) == ["entry_denials", "grievances_now"]
    assert all(found == ["security_invoker=true"] for found in options.values())

    async def read(role: str, view: str) -> bool:
        conn = await asyncpg.connect(**db.connect_args(settings, role).kwargs())
        try:
            await conn.fetchval(f"SELECT count(*) FROM {view}")  # noqa: S608
            return True
        except asyncpg.InsufficientPrivilegeError:
            return False
        finally:
            await conn.close()

    for view in options:
        assert asyncio.run(read("stopcovid_retention", view)), view
        for role in ("stopcovid_exposure", "stopcovid_venue", "stopcovid_worker"):
            assert not asyncio.run(read(role, view)), (role, view)
