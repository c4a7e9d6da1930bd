"""Audit records, written in the same transaction as the change they describe, so
an action and its record commit or vanish together.

Actions are named by the RPC's full method name
("stopcovid.exposure.v1.ExposureService/ApproveAccessRequest"), which `rpc_action`
gives for the RPC being served, or, for worker work, "worker.<job>.<step>".
Details hold ids, counts and reasons only, never personal data. A refusal (no
grant, self-approval, ...) is recorded by `record_refusal` in a transaction of its
own, because the refused call's transaction rolls back.
"""

from __future__ import annotations

import contextvars
import json
import uuid
from typing import Any, TypedDict, Unpack

import asyncpg

from services.kernel.auth import Principal, current_principal
from services.kernel.db import Conn

OUTCOMES = ("succeeded", "denied", "failed")

_INSERT = """
INSERT INTO audit_events
    (principal, role, action, resource_type, resource_id, details, case_id, grant_id,
     outcome, error_reason)
VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8, $9, $10)
"""

# Scheduled work has no certificate; AuditEvent.role is then ROLE_UNSPECIFIED.
WORKER = Principal("worker", "ROLE_UNSPECIFIED", "")


def worker_action(job: str, step: str) -> str:
    """The action name of a step of worker work: "worker.<job>.<step>"."""
    return f"worker.{job}.{step}"


async def record(
    conn: Conn,
    action: str,
    resource_type: str,
    resource_id: str,
    details: dict[str, Any] | None = None,
    *,
    case_id: uuid.UUID | None = None,
    grant_id: uuid.UUID | None = None,
    outcome: str = "succeeded",
    error_reason: str = "",
    principal: Principal | None = None,
) -> None:
    """Record one action. `principal` defaults to the RPC's caller; workers pass
    `WORKER`. `error_reason` is an ErrorReason name without its prefix."""
    if outcome not in OUTCOMES:
        raise ValueError(f"unknown audit outcome {outcome!r}")
    who = principal or current_principal()
    await conn.execute(
        _INSERT,
        who.name,
        who.role,
        action,
        resource_type,
        resource_id,
        json.dumps(bounded_details(details or {}), sort_keys=True),
        case_id,
        grant_id,
        outcome,
        error_reason,
    )


# An audit entry must stay readable in a ListAuditEvents page (4 MiB at most, many
# entries to a page), whatever a caller sent: a detail is a few ids and counts.
MAX_DETAIL_ITEMS = 32
MAX_DETAIL_CHARS = 256


def _bounded(value: Any, cut: list[bool]) -> Any:
    if isinstance(value, str) and len(value) > MAX_DETAIL_CHARS:
        cut.append(True)
        return value[: MAX_DETAIL_CHARS - 1] + "…"
    if isinstance(value, list | tuple):
        if len(value) > MAX_DETAIL_ITEMS:
            cut.append(True)
        return [_bounded(item, cut) for item in value[:MAX_DETAIL_ITEMS]]
    if isinstance(value, dict):
        if len(value) > MAX_DETAIL_ITEMS:
            cut.append(True)
        return {
            str(key)[:MAX_DETAIL_CHARS]: _bounded(item, cut)
            for key, item in list(value.items())[:MAX_DETAIL_ITEMS]
        }
    return value


def bounded_details(details: dict[str, Any]) -> dict[str, Any]:
    """`details` with every string, list and mapping cut to a bounded size; a cut
    entry says so ("truncated": true), so an auditor knows there was more."""
    cut: list[bool] = []
    kept: dict[str, Any] = _bounded(details, cut)
    if cut:
        kept["truncated"] = True
    return kept


class About(TypedDict, total=False):
    """What an entry may say besides its action and resource (see `record`)."""

    details: dict[str, Any] | None
    case_id: uuid.UUID | None
    grant_id: uuid.UUID | None
    principal: Principal | None


async def record_refusal(
    pool: asyncpg.Pool,
    action: str,
    resource_type: str,
    resource_id: str,
    *,
    error_reason: str,
    **about: Unpack[About],
) -> None:
    """Record a refused action in its own transaction (the refused call's own
    transaction, if any, is rolled back)."""
    async with pool.acquire() as conn:
        await record(
            conn,
            action,
            resource_type,
            resource_id,
            outcome="denied",
            error_reason=error_reason,
            **about,
        )


_serving: contextvars.ContextVar[str] = contextvars.ContextVar("audit_serving")


def serve(method: str) -> None:
    """Note the RPC this task serves (its path, "/package.Service/Method"). The
    interceptor calls it for every call; each call runs in its own task, so the
    name ends with it."""
    _serving.set(method.removeprefix("/"))


def rpc_action() -> str:
    """The action of what the RPC being served records: its full method name. A
    servicer never spells its own names; work outside an RPC names its action."""
    try:
        return _serving.get()
    except LookupError:
        raise RuntimeError("rpc_action() outside an RPC: name the action") from None
