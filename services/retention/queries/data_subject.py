"""A person's data in the database, as records (data_subject.sql): what an export
lists, and the erasure and unlinking a withdrawal of consent does.

A person is found without their id in most tables: by their pseudonym on each day
(`Subject.days`, `Subject.refs`) and by their person index.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from services.kernel.db import Conn, load_queries
from services.retention.queries import affected, record

Q = load_queries(Path(__file__).with_name("data_subject.sql"))


@dataclass(frozen=True)
class Subject:
    """How a person's rows are found."""

    person_id: uuid.UUID
    person_index: bytes
    days: list[dt.date]
    """Every day whose key is still alive..."""
    refs: list[bytes]
    """...and the person's pseudonym on it."""


@dataclass(frozen=True)
class Visit:
    """A scan of the person's, admitted or denied."""

    venue_id: uuid.UUID
    scan_time: dt.datetime
    direction: str
    outcome: str
    decision_id: uuid.UUID | None
    venue_display_name: str

    def place(self) -> tuple[uuid.UUID, dt.datetime, str]:
        """Where and when: what a visit and a case record of the same scan share."""
        return (self.venue_id, self.scan_time, self.direction)


@dataclass(frozen=True)
class CaseRecord:
    """A scan of the person's kept for an investigation, one per scan."""

    venue_id: uuid.UUID
    scan_time: dt.datetime
    direction: str
    venue_display_name: str
    retained_until: dt.datetime

    def place(self) -> tuple[uuid.UUID, dt.datetime, str]:
        return (self.venue_id, self.scan_time, self.direction)


@dataclass(frozen=True)
class SentNotification:
    notification_id: uuid.UUID
    risk_level: str
    send_time: dt.datetime


@dataclass(frozen=True)
class DataAccess:
    """A trace that used the person's data, under a grant."""

    trace_id: uuid.UUID
    grant_id: uuid.UUID
    outbreak_reference: str
    access_time: dt.datetime


@dataclass(frozen=True)
class PersonData:
    visits: list[Visit]
    case_records: list[CaseRecord]
    risk_status: asyncpg.Record | None
    """The risk_status row, as services.domain.exposure.risk reads it."""
    notifications: list[SentNotification]
    data_accesses: list[DataAccess]


@dataclass(frozen=True)
class Erasure:
    erase_time: dt.datetime | None
    """None when an earlier erasure of the same id was already recorded."""
    unlinked_check_ins: int
    cancelled_notifications: int


async def case_records(conn: Conn, person_index: bytes) -> list[CaseRecord]:
    """The person's case records: the export lists them, a withdrawal counts them."""
    return [record(CaseRecord, r) for r in await conn.fetch(Q["person_case_records"], person_index)]


async def person_data(conn: Conn, subject: Subject) -> PersonData:
    """Everything an export lists of the person beyond the enrollment."""
    visits = await conn.fetch(Q["person_checkins"], subject.days, subject.refs)
    kept = await case_records(conn, subject.person_index)
    risk_row = await conn.fetchrow(Q["person_risk"], subject.person_id)
    notes = await conn.fetch(Q["person_notifications"], subject.person_index)
    accesses = await conn.fetch(Q["person_data_accesses"], subject.person_index)
    return PersonData(
        visits=[record(Visit, r) for r in visits],
        case_records=kept,
        risk_status=risk_row,
        notifications=[record(SentNotification, r) for r in notes],
        data_accesses=[record(DataAccess, r) for r in accesses],
    )


async def erase(conn: Conn, subject: Subject) -> Erasure | None:
    """Erase the enrollment and risk status, record the erasure, unlink the
    check-ins and cancel queued messages, in the caller's transaction; None when
    the person was erased meanwhile (nothing to erase)."""
    if await conn.fetchval(Q["erase_person"], subject.person_id) is None:
        return None
    erased_at = await conn.fetchval(Q["record_erasure"], subject.person_id)
    await conn.execute(Q["delete_risk"], subject.person_id)
    inbox = await conn.execute(Q["unlink_inbox"], subject.days, subject.refs)
    store = await conn.execute(Q["unlink_checkins"], subject.days, subject.refs)
    cancelled = await conn.execute(Q["cancel_notifications"], subject.person_index)
    return Erasure(erased_at, affected(inbox) + affected(store), affected(cancelled))
