"""Grievances and denied-entry appeals in the database (grievances.sql), as records.

The complainant's words and contact, and an appellant's person id, are in these
records only sealed (services/kernel/keys.py `Sealed`); opening them is the
caller's (services/retention/grievances.py, appeals.py).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from services.domain.exposure.records import Risk
from services.kernel.db import Conn, load_queries, one
from services.retention.queries import params, record

Q = load_queries(Path(__file__).with_name("grievances.sql"))


@dataclass(frozen=True)
class DenialSnapshot:
    """The denial an appeal is against, as it was when filed: when and where, the
    risk level and basis in force then (never the case), and the appellant sealed
    (None once they withdrew consent). Every field is a grievances column; an
    ordinary grievance has the empty snapshot (`DenialSnapshot()`)."""

    denial_time: dt.datetime | None = None
    denial_venue_id: uuid.UUID | None = None
    denial_level: str | None = None
    basis_reason: str | None = None
    basis_exposure_time: dt.datetime | None = None
    basis_venue_id: uuid.UUID | None = None
    basis_venue_display_name: str = ""
    basis_overlap: dt.timedelta | None = None
    basis_rule: str = ""
    person_enc: bytes | None = None
    people_key_id: str | None = None

    def basis_columns(self) -> dict[str, Any]:
        """The basis as services.domain.exposure.risk.basis_to_proto reads a row."""
        return {
            f.name.removeprefix("basis_"): getattr(self, f.name)
            for f in fields(self)
            if f.name.startswith("basis_")
        }


@dataclass(frozen=True)
class Filing:
    """What is fixed when a grievance is filed, as its columns hold it."""

    grievance_id: uuid.UUID
    tracking_id: str
    secret_hash: bytes
    category: str
    description_enc: bytes
    contact_enc: bytes
    text_key_id: str
    """The people key the description and contact are sealed under."""
    venue_id: uuid.UUID | None
    incident_date: dt.date | None
    denial_decision_id: uuid.UUID | None
    body: str


@dataclass(frozen=True)
class NewGrievance(Filing):
    """A grievance to file: insert_grievance's parameters, in order."""

    filer: str
    request_id: uuid.UUID | None
    denial: DenialSnapshot = field(default_factory=DenialSnapshot)


@dataclass(frozen=True)
class Filed:
    """What FileGrievance answers with (the secret is derived again, never stored)."""

    grievance_id: uuid.UUID
    tracking_id: str
    body: str
    due_time: dt.datetime


@dataclass(frozen=True)
class Grievance(Filing):
    """A grievances_now row, as the service shows it."""

    state: str
    assignee: str
    outcome: str | None
    resolution_summary: str
    create_time: dt.datetime
    update_time: dt.datetime
    due_time: dt.datetime
    resolve_time: dt.datetime | None
    overdue: bool
    denial: DenialSnapshot | None
    """None unless the grievance appeals a denial."""

    @classmethod
    def of(cls, row: Any) -> Grievance:
        denial = record(DenialSnapshot, row) if row["denial_decision_id"] is not None else None
        found: dict[str, Any] = {"denial": denial}
        found.update((name, row[name]) for name in cls.__dataclass_fields__ if name != "denial")
        return cls(**found)


@dataclass(frozen=True)
class Response:
    """An officer's message to the complainant."""

    message: str
    create_time: dt.datetime


@dataclass(frozen=True)
class GrievanceFilter:
    """ListGrievances' filters; None matches everything."""

    state: str | None
    body: str | None
    category: str | None
    assignee: str | None
    overdue_only: bool


@dataclass(frozen=True)
class Denial:
    """A denial at the door, as the store (or the inbox) holds it."""

    day: dt.date
    venue_id: uuid.UUID
    device_id: uuid.UUID | None
    sequence: int | None
    scan_time: dt.datetime
    receive_time: dt.datetime
    person_enc: bytes
    """Empty once the person withdrew consent (the row belongs to nobody)."""


# -- filing --------------------------------------------------------------------------


async def insert(
    conn: Conn, new: NewGrievance, due_in: dt.timedelta, requester: str
) -> Filed | None:
    """File `new`, due `due_in` from now; None when `requester` used its request_id
    before."""
    row = await conn.fetchrow(Q["insert_grievance"], *params(new), due_in, requester)
    return None if row is None else record(Filed, row)


async def filed_by_request(conn: Conn, requester: str, request_id: uuid.UUID) -> Filed | None:
    """What `requester` filed under `request_id`; never another caller's."""
    row = await conn.fetchrow(Q["filed_by_request"], requester, request_id)
    return None if row is None else record(Filed, row)


async def tracking_id_taken(conn: Conn, tracking_id: str) -> bool:
    return bool(await conn.fetchval(Q["tracking_id_taken"], tracking_id))


async def venue_exists(conn: Conn, venue_id: uuid.UUID) -> bool:
    return bool(await conn.fetchval(Q["venue_exists"], venue_id))


# -- reading ---------------------------------------------------------------------------


async def get(conn: Conn, tracking_id: str, *, lock: bool = False) -> Grievance | None:
    """The grievance; with `lock`, locked until the transaction ends."""
    row = await conn.fetchrow(Q["lock_grievance" if lock else "get_grievance"], tracking_id)
    return None if row is None else Grievance.of(row)


async def page(
    conn: Conn, where: GrievanceFilter, after: tuple[dt.datetime | None, str | None], limit: int
) -> list[Grievance]:
    """Up to `limit` grievances after the (due_time, tracking_id) `after`, earliest due first."""
    rows = await conn.fetch(Q["list_grievances"], *params(where), *after, limit)
    return [Grievance.of(r) for r in rows]


async def responses(
    conn: Conn, grievance_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, list[Response]]:
    """The messages of each grievance, oldest first (an empty list for none)."""
    found: dict[uuid.UUID, list[Response]] = {g: [] for g in grievance_ids}
    for r in await conn.fetch(Q["grievance_responses"], list(grievance_ids)):
        found[r["grievance_id"]].append(Response(r["message"], r["create_time"]))
    return found


# -- the officers' changes -------------------------------------------------------------


async def assign(conn: Conn, grievance_id: uuid.UUID, assignee: str, body: str) -> Grievance:
    return Grievance.of(
        one(await conn.fetchrow(Q["assign_grievance"], grievance_id, assignee, body))
    )


async def respond(
    conn: Conn,
    grievance_id: uuid.UUID,
    message: str,
    author: str,
    request_id: uuid.UUID | None,
    *,
    requester: str,
) -> Grievance:
    """Add a message (nothing when `requester` used its request_id) and touch the
    grievance."""
    await conn.execute(Q["insert_response"], grievance_id, message, author, request_id, requester)
    return Grievance.of(one(await conn.fetchrow(Q["touch_grievance"], grievance_id)))


async def responded_to(conn: Conn, requester: str, request_id: uuid.UUID) -> str | None:
    """The tracking id of the grievance `requester`'s message with this request_id
    went to."""
    found: str | None = await conn.fetchval(Q["response_by_request"], requester, request_id)
    return found


async def resolve(conn: Conn, grievance_id: uuid.UUID, outcome: str, summary: str) -> Grievance:
    row = one(await conn.fetchrow(Q["resolve_grievance"], grievance_id, outcome, summary))
    return Grievance.of(row)


# -- appeals ---------------------------------------------------------------------------


async def find_denial(conn: Conn, decision_id: uuid.UUID) -> Denial | None:
    row = await conn.fetchrow(Q["find_denial"], decision_id)
    return None if row is None else record(Denial, row)


async def risk_at(conn: Conn, person_id: uuid.UUID, at: dt.datetime) -> Risk | None:
    row = await conn.fetchrow(Q["risk_at"], person_id, at)
    return None if row is None else record(Risk, row)


async def current_risk(conn: Conn, person_id: uuid.UUID) -> str | None:
    """The person's level now; None when they are no longer enrolled."""
    found: str | None = await conn.fetchval(Q["current_risk"], person_id)
    return found
