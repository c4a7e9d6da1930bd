"""The transparency figures in the database (transparency.sql), as records: counts
only, each named as the API field it fills."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from services.kernel.db import Conn, load_queries, one
from services.retention.queries import record


@dataclass(frozen=True)
class Counts:
    """The report's counts, each a GetTransparencyReportResponse field of its name."""

    case_count: int
    access_request_count: int
    approval_count: int
    denial_count: int
    revoked_grant_count: int
    trace_count: int
    notification_sent_count: int
    notification_failed_count: int
    entry_denial_count: int
    overdue_grievance_count: int
    consent_withdrawal_count: int


@dataclass(frozen=True)
class ClassDeletions:
    """Deletion reports of one data class: a DataClassDeletionCount."""

    data_class: str
    report_count: int
    row_count: int
    destroyed_key_count: int


@dataclass(frozen=True)
class Figures:
    counts: Counts
    grievances_by_state: dict[str, int]
    deletions: list[ClassDeletions]
    by_region: dict[str, dict[str, int]]
    """Stored region code -> ProvinceCount field name -> count, for the figures
    about venues (stored codes include some that are no province)."""


Q = load_queries(Path(__file__).with_name("transparency.sql"))


async def figures(conn: Conn, low: dt.datetime, high: dt.datetime) -> Figures:
    """The figures of [low, high), in the caller's transaction (a read-only
    repeatable-read one makes them agree with each other)."""
    counts = one(await conn.fetchrow(Q["transparency"], low, high))
    states = await conn.fetch(Q["grievances_by_state"], low, high)
    deletions = await conn.fetch(Q["deletions_by_class"], low, high)
    by_region: dict[str, dict[str, int]] = {}
    for r in await conn.fetch(Q["province_figures"], low, high):
        by_region.setdefault(r["region_code"], {})[r["figure"]] = r["n"]
    return Figures(
        counts=record(Counts, counts),
        grievances_by_state={r["state"]: r["n"] for r in states},
        deletions=[record(ClassDeletions, r) for r in deletions],
        by_region=by_region,
    )
