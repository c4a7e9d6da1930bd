"""Tenancy: on what a principal may act, beyond which RPCs its role may call.

An organisation is the organizationIdentifier of a certificate (auth.Principal's
`organization`, set by `stopcovid certs issue --org`). Venue operators and
registration front-ends act for one organisation and must name it; every other
role acts nationally (health officials, the Committee, MPTC staff, ...). The
servicers pass `scope()` into their queries, whose WHERE clauses compare it with
the row's owner (NULL: every organisation), so a row of another organisation is
never read or changed for the caller, whatever a handler checks before.

A request_id is scoped the same way: `request_owner` names the caller, and the
tables' unique keys are (request_owner, request_id) (migration 0012).
"""

from __future__ import annotations

from typing import Any, NoReturn

import asyncpg

from services.kernel import audit, errors
from services.kernel.auth import Principal, current_principal

MPTC = "mptc"
"""The ministry running the platform: owner of rows made before organisations, and
of venues MPTC staff create."""

MPTC_STAFF = "ROLE_MPTC_STAFF"
SCOPED_ROLES = frozenset({"ROLE_VENUE_OPERATOR", "ROLE_REGISTRAR"})
"""Roles that act for one organisation, named in their certificates."""


def scope(principal: Principal | None = None) -> str | None:
    """The organisation the caller's acts are confined to, or None when it acts on
    every organisation's. PERMISSION_DENIED (ORGANIZATION_REQUIRED) for a scoped
    role whose certificate names no organisation: it would otherwise own nothing
    and everything at once."""
    who = principal or current_principal()
    if who.role not in SCOPED_ROLES:
        return None
    if not who.organization:
        raise errors.PermissionDenied(
            "this certificate names no organisation (organizationIdentifier), which a "
            f"{who.role} needs; ask the PKI operators for one issued with --org",
            reason="ORGANIZATION_REQUIRED",
            metadata={"role": who.role},
        )
    return who.organization


def owner_of_new(principal: Principal | None = None) -> str:
    """The organisation that owns what the caller creates: its own, or the MPTC's
    for a national role."""
    return scope(principal) or MPTC


def request_owner(principal: Principal | None = None) -> str:
    """The caller as the owner of its request_ids: role, organisation and name,
    which are plain names (no ':'), so two principals never share one. A renewed
    certificate names the same principal, so its retries still find their result."""
    who = principal or current_principal()
    return f"{who.role}:{who.organization}:{who.name}"


def is_mptc_staff(principal: Principal | None = None) -> bool:
    return (principal or current_principal()).role == MPTC_STAFF


async def refuse(
    pool: asyncpg.Pool,
    resource_type: str,
    resource_id: str,
    err: errors.DomainError,
    *,
    reason: str | None = None,
    details: dict[str, Any] | None = None,
) -> NoReturn:
    """Audit the refusal of another organisation's row (in a transaction of its
    own: the caller's, if any, rolls back), then raise `err`, what the caller sees.

    `reason` is the audit record's, when it differs from the caller's: a person
    of another organisation is recorded as NOT_YOUR_PERSON and answered NOT_FOUND."""
    await audit.record_refusal(
        pool,
        audit.rpc_action(),
        resource_type,
        resource_id,
        error_reason=reason or err.reason,
        details=details,
    )
    raise err
