"""What the ExposureService's parts share (services/exposure/service.py composes
them): the pool, the settings and the keys, and the steps more than one RPC takes.

- `_person`: the enrolled person a selector names.
- `_active_grant`: the grant that lets a caller trace a case or see identities,
  or its refusal, audited as denied in a transaction of its own (the refused
  call's rolls back) and raised.
- `_case_key`: the key that opens a case's sealed fields, or FAILED_PRECONDITION
  once it was destroyed with the case's records.
- `_succeeded_trace`: the trace whose contacts are asked for (ListTraceContacts,
  ExportTraceContacts): found, its grant checked when identities are asked for
  or always, and finished.
- `_audit`: a record of the RPC being served, its action the RPC's name.
"""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
from stopcovid.common.v1 import common_pb2

from services.domain.exposure import grants
from services.domain.exposure.records import Grant, Trace
from services.domain.people import enrollment
from services.domain.people.tokens import PersonalTokens
from services.exposure import convert, queries
from services.kernel import audit, db, errors, keys, keystores
from services.kernel.config import Settings
from services.kernel.db import Conn

Resource = tuple[str, object]
"""What an audit record is about: its type and its id."""


class ExposureBase:
    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        self._pool = pool
        self._settings = settings
        self._keys = keystores.open_for(settings, db.SERVICE_ROLES["exposure"])
        current, token_keys = self._keys.token_keys()
        self._tokens = PersonalTokens(current, token_keys, settings.token_window_s)
        self._blind_key = self._keys.blind_index_key()

    async def close(self) -> None:
        """At the server's stop: the key store's session and connection (PKCS#11)."""
        self._keys.close()

    async def _person(self, selector: common_pb2.PersonSelector) -> uuid.UUID:
        """The enrolled person a selector names; NOT_FOUND when none (or erased)."""
        return await enrollment.find_id(
            self._pool, selector, blind_key=self._blind_key, tokens=self._tokens
        )

    def _case_key(self, case_id: uuid.UUID) -> keys.DataKey:
        try:
            return self._keys.case_key(case_id)
        except keys.KeyError_:
            raise errors.FailedPrecondition(
                "the case's key was destroyed with its records; identities are gone",
                metadata={"case_id": str(case_id)},
            ) from None

    async def _audit(
        self,
        conn: Conn,
        resource: Resource,
        details: dict[str, Any] | None = None,
        *,
        case_id: uuid.UUID | None = None,
        grant_id: uuid.UUID | None = None,
    ) -> None:
        """Record the RPC being served, done to `resource`, in `conn`'s transaction."""
        kind, key = resource
        action = audit.rpc_action()
        await audit.record(
            conn, action, kind, str(key), details, case_id=case_id, grant_id=grant_id
        )

    async def _refused(
        self,
        refusal: errors.PermissionDenied,
        resource: Resource,
        ids: tuple[uuid.UUID, uuid.UUID | None],
        details: dict[str, Any] | None = None,
    ) -> errors.PermissionDenied:
        """Record `refusal` of the RPC being served, of `resource` (for the case and
        grant `ids`), as denied; the refusal, to raise."""
        (kind, key), (case_id, grant_id) = resource, ids
        await audit.record_refusal(
            self._pool,
            audit.rpc_action(),
            kind,
            str(key),
            error_reason=refusal.reason,
            details=details,
            case_id=case_id,
            grant_id=grant_id,
        )
        return refusal

    async def _active_grant(
        self,
        conn: Conn,
        case_id: uuid.UUID,
        grant_id: uuid.UUID | None,
        resource: Resource,
    ) -> Grant:
        """The active grant `grant_id` of the case (None: the case's active grant);
        the refusal otherwise, audited against `resource` (type, id)."""
        try:
            return Grant.of(await grants.check(conn, grant_id, case_id))
        except errors.PermissionDenied as refused:
            details = None
            if refused.reason == "GRANT_SCOPE_MISMATCH":
                details = {"grant_case_id": refused.metadata.get("case_id", "")}
            raise await self._refused(refused, resource, (case_id, grant_id), details) from None

    async def _succeeded_trace(
        self, conn: Conn, trace_id: uuid.UUID, *, grant_needed: bool
    ) -> tuple[Trace, Grant | None]:
        """The trace and, when `grant_needed`, the active grant of its case: NOT_FOUND,
        the grant's refusal (audited), or FAILED_PRECONDITION until it succeeded."""
        trace = await queries.get_trace(conn, trace_id)
        if trace is None:
            raise convert.not_found("trace")
        grant = None
        if grant_needed:
            grant = await self._active_grant(conn, trace.case_id, None, ("trace", trace_id))
        if trace.state != "succeeded":
            raise errors.FailedPrecondition(
                "the trace has not succeeded; poll GetTrace until it has",
                metadata={"state": trace.state},
            )
        return trace, grant
