"""Traces and their contacts: StartTrace, ListTraceContacts (GetTrace and ListTraces
only read: reads.py).

StartTrace queues a trace under an active grant (refusals audited) and wakes the
trace workers at commit; a grant has at most one queued or running trace, which
starting again returns. The workers run it (services/domain/exposure/tracing.py).
A succeeded trace's contacts list without identities to any caller allowed the
RPC; their person ids (sealed under the case key, Sealed.CONTACT_PERSON) only
under an active grant of the case, each listing audited.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import structlog
from stopcovid.exposure.v1 import exposure_service_pb2 as pb

from services.domain.exposure.records import Grant, Trace, TraceContact
from services.domain.exposure.trace_job import TRACE_CONTEXT
from services.exposure import convert, queries
from services.exposure.base import ExposureBase
from services.kernel import errors, pagination, tenancy, tracing, validation
from services.kernel.auth import current_principal
from services.kernel.db import Conn
from services.kernel.keys import Sealed
from services.kernel.rpc import Context

log = structlog.get_logger()


class TraceRpcs(ExposureBase):
    async def StartTrace(
        self, request: pb.StartTraceRequest, context: Context
    ) -> pb.StartTraceResponse:
        case_id = validation.uuid_id(request.case_id, "case_id")
        grant_id = validation.optional_uuid(request.grant_id, "grant_id")
        request_id = validation.optional_uuid(request.request_id, "request_id")
        started = None
        if request_id is not None:
            started = await queries.trace_by_request(
                self._pool, tenancy.request_owner(), request_id
            )
        if started is None:
            started = await self._start(case_id, grant_id, request_id)
        return pb.StartTraceResponse(trace=convert.trace(started))

    async def _start(
        self, case_id: uuid.UUID, grant_id: uuid.UUID | None, request_id: uuid.UUID | None
    ) -> Trace:
        """A trace of the case under its active grant `grant_id` (None: the case's)."""
        async with self._pool.acquire() as conn, conn.transaction():
            if await queries.get_case(conn, case_id) is None:
                raise convert.not_found("case")
            grant = await self._active_grant(conn, case_id, grant_id, ("case", case_id))
            trace, queued = await self._queue(conn, grant, request_id)
            if queued and tracing.enabled:
                # The worker's run continues this call's trace (migration 0012).
                await conn.execute(
                    TRACE_CONTEXT["set_trace_context"], trace.trace_id, tracing.traceparent()
                )
        if queued:
            log.info("trace_queued", trace_id=str(trace.trace_id), grant_id=str(grant.grant_id))
        return trace

    async def _queue(
        self, conn: Conn, grant: Grant, request_id: uuid.UUID | None
    ) -> tuple[Trace, bool]:
        """A new queued trace of the grant, its workers woken at commit; or the
        grant's queued or running one, or the one made under `request_id`. And
        whether it is new."""
        queued = await queries.insert_trace(
            conn, grant.grant_id, current_principal().name, request_id, tenancy.request_owner()
        )
        if queued is None:
            # The grant's queued or running trace (traces_one_active), or the
            # trace a concurrent call with this request_id just made.
            found = await queries.active_trace_of_grant(conn, grant.grant_id)
            if found is None and request_id is not None:
                found = await queries.trace_by_request(conn, tenancy.request_owner(), request_id)
            if found is None:
                raise errors.Unavailable(
                    "the grant's trace finished while this one was being started; retry"
                )
            return found, False
        await queries.wake_trace_workers(conn, queued.trace_id)
        await self._audit(
            conn, ("trace", queued.trace_id), case_id=grant.case_id, grant_id=grant.grant_id
        )
        return queued, True

    async def ListTraceContacts(
        self, request: pb.ListTraceContactsRequest, context: Context
    ) -> pb.ListTraceContactsResponse:
        asked = ContactsAsked(
            trace_id=validation.uuid_id(request.trace_id, "trace_id"),
            size=pagination.page_size(request.page_size),
            min_rank=convert.min_risk_rank(request.min_risk_level),
            identify=request.include_person_ids,
        )
        found, ids, token = await self._contacts(asked, asked.after(request.page_token))
        return pb.ListTraceContactsResponse(
            trace_contacts=[convert.contact(c, i) for c, i in zip(found, ids, strict=True)],
            next_page_token=token,
        )

    async def _contacts(
        self, asked: ContactsAsked, after: queries.ContactKey
    ) -> tuple[list[TraceContact], list[str], str]:
        """A page of a succeeded trace's contacts, their person ids, and the next
        page's token. The ids are opened (and audited) only when asked for, under
        an active grant, and only for the page's rows; else they are empty."""
        trace_id = asked.trace_id
        async with self._pool.acquire() as conn, conn.transaction(readonly=not asked.identify):
            trace, grant = await self._succeeded_trace(conn, trace_id, grant_needed=asked.identify)
            found, token = pagination.page(
                await queries.list_trace_contacts(
                    conn, trace_id, asked.min_rank, after, asked.size + 1
                ),
                asked.size,
                asked.filters(),
                lambda last: [last.level_rank, last.row_number],
            )
            if grant is None:
                return found, [""] * len(found), token
            key = self._case_key(trace.case_id)
            ids = [
                str(uuid.UUID(bytes=Sealed.CONTACT_PERSON.open(key, trace_id, c.person_enc)))
                for c in found
            ]
            await self._audit(
                conn,
                ("trace", trace_id),
                {"person_ids_decrypted": len(found)},
                case_id=trace.case_id,
                grant_id=grant.grant_id,
            )
        return found, ids, token


@dataclass(frozen=True)
class ContactsAsked:
    """What ListTraceContacts asks for, checked."""

    trace_id: uuid.UUID
    size: int
    min_rank: int
    identify: bool

    def filters(self) -> dict[str, Any]:
        """What a page token must have been made under."""
        return {"trace_id": str(self.trace_id), "min": self.min_rank, "ids": self.identify}

    def after(self, token: str) -> queries.ContactKey:
        """Where the page starts: after the (rank, row) the token holds."""
        key = pagination.decode(token, self.filters())
        if key is None:
            return queries.ContactKey()
        if len(key) != 2 or not all(type(p) is int and 0 <= p < 2**31 for p in key):
            raise pagination.invalid_token()
        return queries.ContactKey(*key)
