"""The Exposure server's query layer against the schema it reads, where a servicer
test would pass by luck: a record field that the data happens never to hold NULL
in, a statement no test runs with the privilege it lacks, an enum word the schema
refuses only once a row holds it, a named parameter in a string literal.

- services/exposure/statements.py: named parameters and their checks;
- services/exposure/queries.sql: every statement plans as the Exposure role and
  returns every column of its record; each record's fields are columns of its
  table, optional exactly where the column may be NULL;
- services/exposure/convert.py: the enum words are the schema's;
- services/exposure/reads.py: every RPC of the service is the server's own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import types
import typing
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest
from stopcovid.exposure.v1 import exposure_service_pb2_grpc as pb_grpc

from services.domain.exposure import grants, records, tracing
from services.exposure import convert, reads, service
from services.exposure.queries import Q
from services.exposure.statements import compile_named
from services.kernel import db
from services.kernel.config import Settings

Query = Callable[..., list[asyncpg.Record]]
"""The db_conn fixture: SQL as the migrator."""

# -- named parameters ----------------------------------------------------------------


def test_named_parameters_become_positional_once_each() -> None:
    made = compile_named(
        "q",
        "SELECT :a::text, 'a: :b' AS note, x::int -- :c\n"
        "FROM t WHERE y = :a AND z = :b_2 AND w = 'it''s :d'",
    )
    assert made.params == ("a", "b_2")
    assert made.sql == (
        "SELECT $1::text, 'a: :b' AS note, x::int -- :c\n"
        "FROM t WHERE y = $1 AND z = $2 AND w = 'it''s :d'"
    )
    assert made.args({"b_2": 2, "a": 1}) == [1, 2]


def test_a_value_missing_or_unexpected_is_refused() -> None:
    made = compile_named("q", "SELECT :a, :b")
    with pytest.raises(TypeError, match=r"missing \['b'\], unexpected \[\]"):
        made.args({"a": 1})
    with pytest.raises(TypeError, match=r"unexpected \['c'\]"):
        made.args({"a": 1, "b": 2, "c": 3})


def test_positional_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="name its parameters"):
        compile_named("q", "SELECT * FROM t WHERE a = $1")
    assert compile_named("q", "SELECT '$1'").params == ()


# -- records -------------------------------------------------------------------------


def test_a_request_without_its_grant_has_none() -> None:
    base = {f.name: f.name for f in dataclasses.fields(records.AccessRequest) if f.name != "grant"}
    assert records.AccessRequest.of(base).grant is None  # the table's row: no g_ columns
    grant_columns: dict[str, Any] = {f"g_{f.name}": None for f in dataclasses.fields(records.Grant)}
    assert records.AccessRequest.of({**base, **grant_columns}).grant is None  # LEFT JOIN
    grant_columns = {f"g_{f.name}": f"g-{f.name}" for f in dataclasses.fields(records.Grant)}
    made = records.AccessRequest.of({**base, **grant_columns})
    assert made.grant is not None and made.grant.window_start == "g-window_start"
    assert made.case_id == "case_id"


def test_a_traces_counts_are_decoded_from_jsonb_text() -> None:
    row: dict[str, Any] = {f.name: None for f in dataclasses.fields(records.Trace)}
    row |= {"level_counts": json.dumps({"high": 2}), "skipped_rows": "{}"}
    made = records.Trace.of(row)
    assert (made.level_counts, made.skipped_rows) == ({"high": 2}, {})


# Which record each statement returns; AccessRequest's grant from the view's g_ columns.
RETURNS: dict[str, type[records.Record]] = {
    "case_by_request": records.Case,
    "get_case": records.Case,
    "insert_case": records.Case,
    "list_cases": records.Case,
    "access_request_by_request": records.AccessRequest,
    "get_access_request": records.AccessRequest,
    "lock_access_request": records.AccessRequest,
    "list_access_requests": records.AccessRequest,
    "lock_grant": records.Grant,
    "revoke_grant": records.Grant,
    "trace_by_request": records.Trace,
    "get_trace": records.Trace,
    "active_trace_of_grant": records.Trace,
    "insert_trace": records.Trace,
    "list_traces": records.Trace,
    "list_trace_contacts": records.TraceContact,
    "export_rows": records.ExportRow,
    "get_risk_status": records.RiskStatus,
    "clear_risk_status": records.RiskStatus,
    "list_notifications": records.Notification,
}
TABLES: dict[type[records.Record], str] = {
    records.Case: "cases",
    records.Grant: "access_grants",
    records.AccessRequest: "access_requests",
    records.Trace: "traces",
    records.TraceContact: "trace_contacts",
    records.Notification: "notifications",
    records.RiskStatus: "risk_status",
}


def _columns(record: type[records.Record], prefix: str = "") -> set[str]:
    names = {prefix + f.name for f in dataclasses.fields(record) if f.name not in record.NESTED}
    if record is records.AccessRequest:
        names |= _columns(records.Grant, prefix + records.AccessRequest.GRANT_PREFIX)
    return names


def _as_exposure(settings: Settings, check: Callable[[asyncpg.Connection], Any]) -> None:
    async def go() -> None:
        role = db.SERVICE_ROLES["exposure"]
        conn = await asyncpg.connect(**db.connect_args(settings, role).kwargs())
        try:
            async with conn.transaction():
                await check(conn)
                raise _RollBack
        except _RollBack:
            pass
        finally:
            await conn.close()

    asyncio.run(go())


class _RollBack(Exception):
    pass


def test_every_statement_plans_as_the_exposure_role_and_returns_its_record(
    settings: Settings,
) -> None:
    """EXPLAIN checks each table's privileges for the role (PREPARE does not), so a
    view or column the role may not read fails here, as in production."""
    assert set(RETURNS) <= set(Q)
    lock_access_request = {n for n in _columns(records.AccessRequest) if n.startswith("g_")}

    async def check(conn: asyncpg.Connection) -> None:
        for name, statement in Q.items():
            await conn.fetch(f"EXPLAIN {statement.sql}", *[None] * len(statement.params))
            record = RETURNS.get(name)
            if record is None:
                continue
            returned = {a.name for a in (await conn.prepare(statement.sql)).get_attributes()}
            wanted = _columns(record)
            if name == "lock_access_request":  # the table's row, locked: no grant
                wanted -= lock_access_request
            assert wanted <= returned, (name, wanted - returned)

    _as_exposure(settings, check)


def _optional(hint: Any) -> bool:
    return isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)


def test_a_record_field_is_optional_exactly_where_its_column_may_be_null(
    db_conn: Query,
) -> None:
    for record, table in TABLES.items():
        nullable = {
            r["column_name"]: r["is_nullable"] == "YES"
            for r in db_conn(
                "SELECT column_name, is_nullable FROM information_schema.columns"
                " WHERE table_schema = 'public' AND table_name = $1",
                table,
            )
        }
        hints = typing.get_type_hints(record)
        for field in dataclasses.fields(record):
            if field.name in record.NESTED:
                continue
            assert field.name in nullable, (table, field.name)
            assert _optional(hints[field.name]) == nullable[field.name], (table, field.name)


# -- enum words and reads ------------------------------------------------------------


def _checked_words(db_conn: Query, table: str, column: str) -> set[str]:
    (definition,) = [
        r[0]
        for r in db_conn(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint"
            " WHERE conrelid = $1::regclass AND contype = 'c'",
            table,
        )
        if re.search(rf"\b{column}\b", r[0]) and "ANY" in r[0]
    ]
    return set(re.findall(r"'(\w+)'::text", definition))


@pytest.mark.parametrize(
    ("words", "table", "column"),
    [
        (convert.REQUEST_STATES, "access_requests", "state"),
        (convert.TRACE_STATES, "traces", "state"),
        (convert.TRACE_STEPS, "traces", "failure_step"),
        (convert.NOTIFICATION_STATES, "notifications", "state"),
    ],
)
def test_each_enums_words_are_its_columns_check(
    db_conn: Query,
    words: convert.EnumMap[Any],
    table: str,
    column: str,
) -> None:
    assert set(words) == _checked_words(db_conn, table, column)


def test_grant_and_trace_words_are_the_domains() -> None:
    assert set(convert.GRANT_STATES) == {grants.ACTIVE, grants.EXPIRED, grants.REVOKED}
    assert set(convert.SKIP_REASONS) == set(tracing.SKIP_REASONS)


def test_every_rpc_is_answered_by_the_server_itself() -> None:
    """The generated base answers UNIMPLEMENTED; a read declared for a method the
    service lacks, or a method left undeclared, shows here."""
    methods = {m.name for m in reads.SERVICE.methods}
    assert set(reads.GETS) | set(reads.LISTS) <= methods
    for name in methods:
        own = getattr(service.ExposureService, name)
        assert own is not getattr(pb_grpc.ExposureServiceServicer, name), name
        assert own.__name__ == name
    assert service.SERVICE == "stopcovid.exposure.v1.ExposureService"
