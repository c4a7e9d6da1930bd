"""What the Venue server's RPCs share: the servicer's state, and the refusals and
audit records of tenancy (services/kernel/tenancy.py). A venue operator's
queries carry its organisation in their WHERE clauses (_scoped_read reads one
venue or device so); when one finds nothing, _venue_refused / _device_refused
tell NOT_FOUND (no such row) from
PERMISSION_DENIED (another organisation's, audited with its owner). MPTC staff
act on every organisation's; each of their calls, reads included, is audited
with the owner acted on.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import asyncpg
import structlog
from stopcovid.venue.v1 import venue_service_pb2_grpc as pb_grpc

from services.kernel import audit, errors, keys, pagination, pki, tenancy
from services.kernel.auth import current_principal
from services.kernel.config import Settings
from services.kernel.db import load_queries
from services.venue import typeset

log = structlog.get_logger()

Q = load_queries(Path(__file__).with_name("queries.sql"))


def venue_not_found() -> errors.NotFound:
    return errors.NotFound("no venue with this venue_id", metadata={"resource": "venue"})


def venue_suspended(venue_id: uuid.UUID) -> errors.FailedPrecondition:
    return errors.FailedPrecondition(
        "the venue is suspended; resume it first",
        reason="VENUE_SUSPENDED",
        metadata={"venue_id": str(venue_id)},
    )


def device_not_found() -> errors.NotFound:
    return errors.NotFound("no device with this device_id", metadata={"resource": "device"})


def acted_on(owner: str) -> dict[str, str]:
    """Audit details of an act of MPTC staff on `owner`'s venue or device, saying
    so; nothing for a venue operator, who acts only on its own organisation's."""
    if tenancy.is_mptc_staff():
        return {"acting_as": "mptc_staff", "owner_organization": owner}
    return {}


class VenueBase(pb_grpc.VenueServiceServicer):
    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        # At start-up, not at the first poster: a server that would print Khmer
        # unshaped must not start at all.
        typeset.require_shaping()
        self._pool = pool
        self._settings = settings
        self._authority: tuple[pki.Authority, bytes] | None = None
        self._keystore: keys.KeyStore | None = None

    async def close(self) -> None:
        """At the server's stop: the key store, if one was opened."""
        if self._keystore is not None:
            self._keystore.close()

    async def _scoped_read(
        self,
        kind: str,
        sql: str,
        resource_id: uuid.UUID,
        refused: Callable[[uuid.UUID], Awaitable[NoReturn]],
    ) -> asyncpg.Record:
        """The `kind` row `resource_id` by the statement `sql` (given the id and the
        caller's scope), refused by `refused` when the caller may not see it; a read
        by MPTC staff is audited with the owner."""
        row = await self._pool.fetchrow(sql, resource_id, tenancy.scope())
        if row is None:
            await refused(resource_id)
        await self._staff_read(kind, str(resource_id), row["owner_organization"])
        return row

    async def _scoped_page(
        self,
        kind: str,
        sql: str,
        args: Sequence[Any],
        filters: dict[str, Any],
        *,
        page_token: str,
        size: int,
    ) -> tuple[list[asyncpg.Record], str]:
        """One page of the `kind` rows the caller may see, in registration order
        (create_time, then <kind>_id), and the next page's token: the statement
        `sql` gets `args` (its filters), the position after `page_token`, the
        limit and the caller's scope. A list by MPTC staff is audited."""
        after_time, after_id = pagination.time_and_id(page_token, filters)
        rows = await self._pool.fetch(sql, *args, after_time, after_id, size + 1, tenancy.scope())
        rows, token = pagination.page(
            rows, size, filters, pagination.time_id_key("create_time", f"{kind}_id")
        )
        await self._staff_list(kind, len(rows))
        return rows, token

    async def _venue_refused(self, venue_id: uuid.UUID) -> NoReturn:
        """After a scoped query found no venue: NOT_FOUND when none exists, else
        the venue is another organisation's (PERMISSION_DENIED, NOT_YOUR_VENUE,
        audited with its owner)."""
        owner = await self._pool.fetchval(Q["venue_owner"], venue_id)
        await self._refuse("venue", venue_id, owner, venue_not_found(), "NOT_YOUR_VENUE")

    async def _device_refused(self, device_id: uuid.UUID) -> NoReturn:
        """As _venue_refused, for a device (NOT_YOUR_DEVICE)."""
        owner = await self._pool.fetchval(Q["device_owner"], device_id)
        await self._refuse("device", device_id, owner, device_not_found(), "NOT_YOUR_DEVICE")

    async def _refuse(
        self,
        kind: str,
        resource_id: uuid.UUID,
        owner: str | None,
        missing: errors.NotFound,
        reason: str,
    ) -> NoReturn:
        if owner is None:
            raise missing
        await tenancy.refuse(
            self._pool,
            kind,
            str(resource_id),
            errors.PermissionDenied(
                f"the {kind} belongs to another organisation",
                reason=reason,
                metadata={f"{kind}_id": str(resource_id)},
            ),
            details=self._refusal_details(owner),
        )

    @staticmethod
    def _refusal_details(owner: str) -> dict[str, str]:
        return {
            "owner_organization": owner,
            "caller_organization": current_principal().organization,
        }

    async def _staff_read(self, resource_type: str, resource_id: str, owner: str) -> None:
        """A read by MPTC staff is an act on another organisation's venue too:
        audited as such. Nobody else's reads are."""
        if tenancy.is_mptc_staff():
            async with self._pool.acquire() as conn:
                await audit.record(
                    conn, audit.rpc_action(), resource_type, resource_id, acted_on(owner)
                )

    async def _staff_list(self, resource_type: str, count: int) -> None:
        """A list by MPTC staff spans every organisation: audited with its count."""
        if tenancy.is_mptc_staff():
            async with self._pool.acquire() as conn:
                await audit.record(
                    conn,
                    audit.rpc_action(),
                    resource_type,
                    "",
                    {"acting_as": "mptc_staff", "listed": count},
                )
