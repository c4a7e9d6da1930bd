"""The contracts between processes, tied to the schema they describe: the inbox row,
the NOTIFY channels, the risk vocabulary, the retention bounds and the sealed-field
formats are each defined once in code, and these tests fail when the database (or
the code) drifts from them."""

from __future__ import annotations

import re
from pathlib import Path

from services.domain.checkins.inbox import COLUMNS, DIRECTIONS, OUTCOMES
from services.domain.exposure import risk
from services.domain.retention.expiry_run import CLASSES
from services.kernel import channels
from services.kernel.keys import Sealed
from tests.support.database import Query

ROOT = Path(__file__).parent.parent


def columns(db_conn: Query, table: str) -> tuple[str, ...]:
    rows = db_conn(
        "SELECT column_name FROM information_schema.columns"
        " WHERE table_schema = 'public' AND table_name = $1 ORDER BY ordinal_position",
        table,
    )
    return tuple(r[0] for r in rows)


def checks(db_conn: Query, table: str) -> list[str]:
    rows = db_conn(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint"
        " WHERE conrelid = $1::regclass AND contype = 'c'",
        table,
    )
    return [r[0] for r in rows]


def test_the_inbox_row_is_both_tables_columns(db_conn: Query) -> None:
    assert columns(db_conn, "scan_inbox") == ("inbox_id", *COLUMNS)
    assert columns(db_conn, "checkins") == (*COLUMNS, "store_time")
    for table in ("scan_inbox", "checkins"):
        defs = " ".join(checks(db_conn, table))
        assert all(f"'{d}'" in defs for d in DIRECTIONS)
        assert all(f"'{o}'" in defs for o in OUTCOMES)


def test_every_channel_is_sent_by_the_schema_and_named_in_code() -> None:
    """Triggers (migrations) and queries (.sql files) send; the code listens."""
    files = sorted([*ROOT.glob("services/**/*.sql"), *ROOT.glob("workers/**/*.sql")])
    sql = "\n".join(p.read_text() for p in files)
    sent = set(re.findall(r"notify_change\('(stopcovid_\w+)'", sql))
    sent |= set(re.findall(r"pg_notify\('(stopcovid_\w+)'", sql))
    assert sent == set(channels.ALL)
    assert len(set(channels.ALL)) == len(channels.ALL)


def test_the_risk_vocabulary_is_the_schemas(db_conn: Query) -> None:
    for table in ("risk_status", "notifications"):
        defs = " ".join(checks(db_conn, table))
        named = set(re.findall(r"'(\w+)'::text", defs)) & {risk.NONE, *risk.RAISED}
        assert set(risk.RAISED) <= named, (table, defs)
    assert set(risk.LEVELS) == {risk.NONE, *risk.RAISED}


def test_retention_bounds_in_code_are_the_schemas_check(db_conn: Query) -> None:
    (definition,) = checks(db_conn, "retention_policies")
    found = {
        name: (int(low), int(high))
        for name, low, high in re.findall(
            r"'(\w+)'::text THEN \(\(period_days >= (\d+)\) AND \(period_days <= (\d+)\)\)",
            definition,
        )
    }
    assert found == {name: (b.min_days, b.max_days) for name, b in CLASSES.items()}
    defaults = {
        r[0]: r[1] for r in db_conn("SELECT data_class, period_days FROM retention_policies")
    }
    assert defaults == {name: b.default_days for name, b in CLASSES.items()}


def test_each_sealed_kind_binds_to_its_own_label() -> None:
    labels = [kind.value for kind in Sealed]
    assert len(set(labels)) == len(labels)
    # No label is a prefix of another followed by the separator: a ciphertext of one
    # kind can never open as another's.
    assert all("|" not in label for label in labels)
