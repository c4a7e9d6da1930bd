"""Retention policies and stored deletion reports in the database (policies.sql),
as records."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from pathlib import Path

from services.domain.retention.expiry_run import Deletion
from services.kernel.db import Conn, load_queries, one
from services.retention.queries import Db, params, record

Q = load_queries(Path(__file__).with_name("policies.sql"))


@dataclass(frozen=True)
class Policy:
    data_class: str
    period_days: int
    updater: str
    version: int
    """Changes on every update: the policy's etag."""
    update_time: dt.datetime | None
    """None until the first update."""


@dataclass(frozen=True)
class StoredReport:
    """A deletion_reports row: one class's report of one run."""

    deletion_report_id: uuid.UUID
    run_id: uuid.UUID
    data_class: str
    period_days: int
    row_count: int
    data_start: dt.datetime | None
    data_end: dt.datetime | None
    destroyed_key_ids: list[str]
    trigger: str
    requester: str
    create_time: dt.datetime

    def deletion(self) -> Deletion:
        """The report as the expiry run made it."""
        return Deletion(
            self.data_class,
            self.period_days,
            self.row_count,
            self.data_start,
            self.data_end,
            list(self.destroyed_key_ids),
            self.deletion_report_id,
            self.create_time,
        )


@dataclass(frozen=True)
class ReportFilter:
    """ListDeletionReports' filters, in list_reports' order; None matches everything."""

    data_class: str | None
    start: dt.datetime | None
    end: dt.datetime | None
    run_id: uuid.UUID | None


async def get(db: Db, data_class: str, *, lock: bool = False) -> Policy:
    """The class's policy (every class has one); with `lock`, locked until the
    transaction ends."""
    row = await db.fetchrow(Q["lock_policy" if lock else "get_policy"], data_class)
    return record(Policy, one(row))


async def all_policies(db: Db) -> list[Policy]:
    return [record(Policy, r) for r in await db.fetch(Q["all_policies"])]


async def update(conn: Conn, data_class: str, period_days: int, updater: str) -> Policy:
    row = await conn.fetchrow(Q["update_policy"], data_class, period_days, updater)
    return record(Policy, one(row))


async def report(db: Db, report_id: uuid.UUID) -> StoredReport | None:
    row = await db.fetchrow(Q["get_report"], report_id)
    return None if row is None else record(StoredReport, row)


async def reports(
    db: Db,
    where: ReportFilter,
    after: tuple[dt.datetime | None, uuid.UUID | None],
    limit: int,
) -> list[StoredReport]:
    """Up to `limit` reports after the (create_time, id) `after`, newest first."""
    rows = await db.fetch(Q["list_reports"], *params(where), *after, limit)
    return [record(StoredReport, r) for r in rows]
