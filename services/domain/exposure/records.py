"""The exposure context's rows as typed records: what the Exposure server's queries
return (services/exposure/queries.py), what its conversions read, and what it
writes back (a new case is a `Case` before it is inserted).

A record's fields are its columns, by name. `Record.of(row)` takes them from an
asyncpg row, leaving any other column; `of(row, prefix)` takes them from a joined
row's prefixed columns. `column` reads one column from a row or a record alike, for
the domain functions that take either (grants.state, risk.status_to_proto).
tests/test_exposure_queries.py ties every record to the schema: each field is a
column of what its queries return, and a field is optional exactly where its
column may be NULL.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import uuid
from collections.abc import Mapping
from typing import Any, ClassVar, Self

import asyncpg

Row = asyncpg.Record | Mapping[str, Any]
"""What a query returns: an asyncpg row (or, in tests, any mapping)."""


def column(row: Any, name: str) -> Any:
    """Column `name` of a record, or of a row."""
    if isinstance(row, Record):
        return getattr(row, name)
    return row[name]


def _json(value: Any) -> dict[str, int]:
    """A jsonb object of counts, which asyncpg hands over as text."""
    found = json.loads(value) if isinstance(value, str) else value
    return dict(found or {})


_FIELDS: dict[type[Record], tuple[str, ...]] = {}


def _own_fields(record: type[Record]) -> tuple[str, ...]:
    """A record's fields that are columns (read once per record type)."""
    found = _FIELDS.get(record)
    if found is None:
        names = (f.name for f in dataclasses.fields(record) if f.name not in record.NESTED)
        found = _FIELDS[record] = tuple(names)
    return found


@dataclasses.dataclass(frozen=True)
class Record:
    """A row as a frozen dataclass."""

    JSON: ClassVar[frozenset[str]] = frozenset()
    """Fields held as jsonb, decoded by `of`."""
    NESTED: ClassVar[frozenset[str]] = frozenset()
    """Fields that hold another record, which `of` leaves to the subclass."""

    @classmethod
    def of(cls, row: Row, prefix: str = "") -> Self:
        return cls(**cls.columns(row, prefix))

    @classmethod
    def columns(cls, row: Row, prefix: str = "") -> dict[str, Any]:
        """The record's own fields from `row`, by name (with `prefix`)."""
        values = {name: row[prefix + name] for name in _own_fields(cls)}
        for name in cls.JSON:
            values[name] = _json(values[name])
        return values


@dataclasses.dataclass(frozen=True)
class Case(Record):
    """A case identified by the Ministry (cases)."""

    case_id: uuid.UUID
    person_index: bytes
    person_enc: bytes
    """The person id, sealed under the case key (keys.Sealed.CASE_PERSON)."""
    external_reference: str
    test_date: dt.date
    symptom_onset_date: dt.date | None
    window_start: dt.datetime
    window_end: dt.datetime
    reporter: str
    request_id: uuid.UUID | None
    report_time: dt.datetime
    purge_time: dt.datetime | None
    """Set by retention when the case key is destroyed with the case records."""


@dataclasses.dataclass(frozen=True)
class Grant(Record):
    """An access grant (access_grants); its state is grants.state(grant)."""

    grant_id: uuid.UUID
    access_request_id: uuid.UUID
    case_id: uuid.UUID
    window_start: dt.datetime
    window_end: dt.datetime
    create_time: dt.datetime
    expire_time: dt.datetime
    revoke_time: dt.datetime | None
    revoker: str | None
    revoke_reason: str


@dataclasses.dataclass(frozen=True)
class AccessRequest(Record):
    """An access request (access_requests) and, once approved, its grant: the
    g_-prefixed columns of the view access_requests_with_grant, absent or NULL
    when there is none."""

    access_request_id: uuid.UUID
    case_id: uuid.UUID
    outbreak_reference: str
    justification: str
    window_start: dt.datetime
    window_end: dt.datetime
    state: str
    """'pending', 'approved' or 'denied'."""
    requester: str
    request_id: uuid.UUID | None
    create_time: dt.datetime
    decider: str | None
    decide_time: dt.datetime | None
    decision_comment: str
    grant: Grant | None
    """The grant its approval made; None while pending or denied."""

    NESTED = frozenset({"grant"})
    GRANT_PREFIX: ClassVar[str] = "g_"

    @classmethod
    def of(cls, row: Row, prefix: str = "") -> Self:
        nested = prefix + cls.GRANT_PREFIX
        grant = Grant.of(row, nested) if row.get(nested + "grant_id") is not None else None
        return cls(**cls.columns(row, prefix), grant=grant)


@dataclasses.dataclass(frozen=True)
class Trace(Record):
    """A trace job and, once it ran, its results (traces)."""

    JSON = frozenset({"level_counts", "skipped_rows"})

    trace_id: uuid.UUID
    case_id: uuid.UUID
    grant_id: uuid.UUID
    state: str
    """'queued', 'running', 'succeeded', 'failed' or 'cancelled'."""
    window_start: dt.datetime
    window_end: dt.datetime
    starter: str
    request_id: uuid.UUID | None
    create_time: dt.datetime
    start_time: dt.datetime | None
    end_time: dt.datetime | None
    visits_found: int
    visits_searched: int
    contacts_found: int
    level_counts: dict[str, int]
    """People by risk level name (risk.RAISED)."""
    error_message: str
    attempt_count: int
    lease_until: dt.datetime | None
    worker_id: str | None
    skipped_rows: dict[str, int]
    """Rows left out, by tracing.SKIP_REASONS."""
    erased_contacts: int
    case_contacts: int
    failure_step: str | None
    """One of tracing.STEPS while a trace failed (or was interrupted)."""
    failure_error: str


@dataclasses.dataclass(frozen=True)
class TraceContactRow(Record):
    """One overlap a trace found (trace_contacts), without the trace and the case it
    belongs to: what a trace run writes, one array per field in field order, after
    the trace and case ids it gives once (trace_job.sql, insert_trace_contacts)."""

    row_number: int
    contact_ref: str
    level_rank: int
    """The RiskLevel number: LOW, MEDIUM or HIGH."""
    venue_id: uuid.UUID
    case_visit_start: dt.datetime
    case_visit_end: dt.datetime
    contact_stay_start: dt.datetime
    contact_stay_end: dt.datetime
    overlap: dt.timedelta
    stay_end_estimated: bool
    rule: str
    person_index: bytes
    person_enc: bytes
    """The contact's person id, sealed under the case key (keys.Sealed.CONTACT_PERSON),
    bound to the trace."""


@dataclasses.dataclass(frozen=True)
class TraceContact(TraceContactRow):
    """One overlap a trace found (trace_contacts), as listed: with its trace and case."""

    trace_id: uuid.UUID
    case_id: uuid.UUID


@dataclasses.dataclass(frozen=True)
class ExportRow(TraceContact):
    """A contact as the CSV export shows it: with its venue's name, address and
    province (empty when the venue is gone)."""

    venue_name: str
    venue_address: str
    region_code: str


@dataclasses.dataclass(frozen=True)
class Notification(Record):
    """A queued or finished message, as listed: no recipient data (notifications)."""

    notification_id: uuid.UUID
    trace_id: uuid.UUID
    contact_ref: str
    risk_level: str
    template: str
    state: str
    """'queued', 'sent', 'failed' or 'cancelled'."""
    attempt_count: int
    last_error: str
    create_time: dt.datetime
    next_attempt_time: dt.datetime
    send_time: dt.datetime | None


@dataclasses.dataclass(frozen=True)
class Risk(Record):
    """A risk level and its basis (risk.basis_to_proto): the columns risk_status and
    risk_history share. The Retention service reads it as it was when an entry was
    denied (services/retention/queries/grievances.py, risk_at)."""

    level: str
    reason: str | None
    exposure_time: dt.datetime | None
    venue_id: uuid.UUID | None
    venue_display_name: str
    overlap: dt.timedelta | None
    rule: str


@dataclasses.dataclass(frozen=True)
class RiskStatus(Risk):
    """A person's risk level and its basis, or its clearing (risk_status)."""

    person_id: uuid.UUID
    expire_time: dt.datetime
    update_time: dt.datetime
    clear_time: dt.datetime | None
    clear_reason: str | None
