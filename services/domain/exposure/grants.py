"""Access grants: the one check that stands between a caller and a case's contact data.

A grant comes from an access request approved by a principal other than its
requester. It covers one case and one window, until its expire_time, unless
revoked first. Everything that traces a case or decrypts personal data for it
(the Exposure service, the trace and notification workers) calls `check` first
and is refused with PERMISSION_DENIED and the precise reason otherwise:

- NO_ACTIVE_GRANT: no grant named, an unknown grant, or a case that never had one;
- GRANT_REVOKED: the grant was revoked;
- GRANT_EXPIRED: the grant has passed its expire_time;
- GRANT_SCOPE_MISMATCH: the grant is active but for another case (metadata
  "case_id" names the grant's case).
"""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path

import asyncpg

from services.domain.exposure.records import Grant, column
from services.kernel import errors, metrics
from services.kernel.db import Conn, load_queries

Q = load_queries(Path(__file__).with_name("grants.sql"))

ACTIVE, EXPIRED, REVOKED = "active", "expired", "revoked"


def state(grant: asyncpg.Record | Grant, now: dt.datetime | None = None) -> str:
    """ "active", "expired" or "revoked", computed from the grant's times (an
    access_grants row or its record)."""
    if column(grant, "revoke_time") is not None:
        return REVOKED
    if (now or dt.datetime.now(dt.UTC)) >= column(grant, "expire_time"):
        return EXPIRED
    return ACTIVE


def _refusal(grant: asyncpg.Record, grant_state: str) -> errors.PermissionDenied:
    meta = {"grant_id": str(grant["grant_id"]), "case_id": str(grant["case_id"])}
    if grant_state == REVOKED:
        return errors.PermissionDenied(
            "the access grant was revoked; request access again",
            reason="GRANT_REVOKED",
            metadata=meta,
        )
    return errors.PermissionDenied(
        "the access grant has expired; request access again",
        reason="GRANT_EXPIRED",
        metadata=meta,
    )


async def check(
    conn: Conn,
    grant_id: uuid.UUID | None,
    case_id: uuid.UUID,
    now: dt.datetime | None = None,
) -> asyncpg.Record:
    """The access_grants row of `grant_id` if it is active for `case_id`; with
    `grant_id` None, the case's active grant. Raises errors.PermissionDenied with
    NO_ACTIVE_GRANT, GRANT_REVOKED, GRANT_EXPIRED or GRANT_SCOPE_MISMATCH otherwise.

    With `grant_id` None and no active grant, the reason is that of the case's most
    recent grant (revoked or expired), or NO_ACTIVE_GRANT when it never had one.
    Every refusal is counted by reason (metrics.GRANT_REFUSALS)."""
    try:
        return await _check(conn, grant_id, case_id, now or dt.datetime.now(dt.UTC))
    except errors.PermissionDenied as refused:
        metrics.GRANT_REFUSALS.labels(reason=refused.reason).inc()
        raise


async def _check(
    conn: Conn, grant_id: uuid.UUID | None, case_id: uuid.UUID, now: dt.datetime
) -> asyncpg.Record:
    if grant_id is None:
        grant = await conn.fetchrow(Q["latest_grant_of_case"], case_id, now)
        if grant is None:
            raise errors.PermissionDenied(
                "no access grant covers this case; request access and have it approved",
                reason="NO_ACTIVE_GRANT",
                metadata={"case_id": str(case_id)},
            )
    else:
        grant = await conn.fetchrow(Q["grant_by_id"], grant_id)
        if grant is None:
            raise errors.PermissionDenied(
                "no access grant with this grant_id",
                reason="NO_ACTIVE_GRANT",
                metadata={"grant_id": str(grant_id)},
            )
    grant_state = state(grant, now)
    if grant_state != ACTIVE:
        raise _refusal(grant, grant_state)
    if grant["case_id"] != case_id:
        raise errors.PermissionDenied(
            "the access grant is for another case",
            reason="GRANT_SCOPE_MISMATCH",
            metadata={"grant_id": str(grant["grant_id"]), "case_id": str(grant["case_id"])},
        )
    return grant
