"""Access requests and grants: CreateAccessRequest, ApproveAccessRequest,
DenyAccessRequest, RevokeAccessGrant (GetAccessRequest and ListAccessRequests only
read: reads.py).

A health official asks for access to one case's contact data, within its
infectious window; a principal other than the requester approves (which makes a
grant for that case and window, expiring after the grant's duration) or denies
it. The schema refuses a decider who is the requester too. A requester's own
decision is refused with SELF_APPROVAL and audited as denied. A case has at most
one pending request or active grant at a time. Revoking a grant cancels its
queued and running traces and its queued messages.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass

import structlog
from stopcovid.exposure.v1 import exposure_service_pb2 as pb

from services.domain.exposure import grants
from services.domain.exposure.records import AccessRequest, Grant
from services.exposure import convert, queries
from services.exposure.base import ExposureBase
from services.kernel import errors, tenancy, validation
from services.kernel.auth import current_principal
from services.kernel.db import Conn
from services.kernel.rpc import Context

log = structlog.get_logger()

MIN_GRANT = dt.timedelta(minutes=1)
APPROVED, DENIED, PENDING = "approved", "denied", "pending"


@dataclass(frozen=True)
class Asked:
    """What CreateAccessRequest asks for, checked; a window bound left None is the
    case's."""

    case_id: uuid.UUID
    outbreak_reference: str
    justification: str
    start: dt.datetime | None
    end: dt.datetime | None
    request_id: uuid.UUID | None


class AccessRpcs(ExposureBase):
    async def CreateAccessRequest(
        self, request: pb.CreateAccessRequestRequest, context: Context
    ) -> pb.CreateAccessRequestResponse:
        asked = request.access_request
        case_id = validation.uuid_id(asked.case_id, "access_request.case_id")
        outbreak = validation.text(
            asked.outbreak_reference, "access_request.outbreak_reference", max_len=100
        )
        justification = validation.text(
            asked.justification, "access_request.justification", min_len=20, max_len=2000
        )
        start, end = convert.bounds(asked.window, "access_request.window")
        request_id = validation.optional_uuid(request.request_id, "request_id")
        made = await self._request_access(
            Asked(case_id, outbreak, justification, start, end, request_id)
        )
        return pb.CreateAccessRequestResponse(access_request=convert.access_request(made))

    async def _request_access(self, asked: Asked) -> AccessRequest:
        """A new pending request for the case, within its infectious window; or the
        one made before under the same request_id. AlreadyExists while the case has
        a pending request or an active grant."""
        async with self._pool.acquire() as conn, conn.transaction():
            made = await self._made_before(conn, asked.request_id)
            if made is not None:
                return made
            case = await queries.get_case(conn, asked.case_id)
            if case is None:
                raise convert.not_found("case")
            start = asked.start or case.window_start
            end = asked.end or case.window_end
            if not case.window_start <= start <= end <= case.window_end:
                raise errors.InvalidArgument(
                    "access_request.window must lie within the case's infectious window",
                    field="access_request.window",
                )
            await queries.lock_key(conn, f"case|{asked.case_id}")
            made = await self._made_before(conn, asked.request_id)
            if made is not None:  # a retry racing the first call
                return made
            open_id = await queries.open_access_of_case(conn, asked.case_id)
            if open_id is not None:
                raise errors.AlreadyExists(
                    "the case already has a pending access request or an active grant",
                    metadata={"access_request_id": str(open_id)},
                )
            access_request_id = uuid.uuid4()
            await queries.insert_access_request(
                conn,
                access_request_id=access_request_id,
                case_id=asked.case_id,
                outbreak_reference=asked.outbreak_reference,
                justification=asked.justification,
                window=(start, end),
                requester=current_principal().name,
                request_id=asked.request_id,
                request_owner=tenancy.request_owner(),
            )
            await self._audit(
                conn,
                ("access_request", access_request_id),
                {"outbreak_reference": asked.outbreak_reference},
                case_id=asked.case_id,
            )
            made = await self._read(conn, access_request_id)
        log.info("access_requested", access_request_id=str(access_request_id))
        return made

    async def _made_before(self, conn: Conn, request_id: uuid.UUID | None) -> AccessRequest | None:
        """The request an earlier call of this caller with this request_id made."""
        if request_id is None:
            return None
        return await queries.access_request_by_request(conn, tenancy.request_owner(), request_id)

    async def _read(self, db: queries.Db, access_request_id: uuid.UUID) -> AccessRequest:
        found = await queries.get_access_request(db, access_request_id)
        if found is None:
            raise convert.not_found("access_request")
        return found

    # -- decisions -----------------------------------------------------------------------

    async def ApproveAccessRequest(
        self, request: pb.ApproveAccessRequestRequest, context: Context
    ) -> pb.ApproveAccessRequestResponse:
        access_request_id = validation.uuid_id(request.access_request_id, "access_request_id")
        comment = validation.text(request.comment, "comment", min_len=0, max_len=2000)
        high = dt.timedelta(hours=self._settings.grant_max_hours)
        span = (
            validation.duration(request.grant_duration, "grant_duration", low=MIN_GRANT, high=high)
            if request.HasField("grant_duration")
            else dt.timedelta(hours=self._settings.grant_default_hours)
        )
        decided = await self._decide(access_request_id, APPROVED, comment, span)
        return pb.ApproveAccessRequestResponse(access_request=convert.access_request(decided))

    async def DenyAccessRequest(
        self, request: pb.DenyAccessRequestRequest, context: Context
    ) -> pb.DenyAccessRequestResponse:
        access_request_id = validation.uuid_id(request.access_request_id, "access_request_id")
        comment = validation.text(request.comment, "comment", max_len=2000)
        decided = await self._decide(access_request_id, DENIED, comment, None)
        return pb.DenyAccessRequestResponse(access_request=convert.access_request(decided))

    async def _decide(
        self,
        access_request_id: uuid.UUID,
        decision: str,
        comment: str,
        span: dt.timedelta | None,
    ) -> AccessRequest:
        """Approve (with a grant lasting `span`) or deny a pending request. Deciding
        it again the same way changes nothing; a requester deciding their own request
        is refused (SELF_APPROVAL) and audited as denied, after the transaction."""
        me = current_principal().name
        async with self._pool.acquire() as conn, conn.transaction():
            asked = await queries.lock_access_request(conn, access_request_id)
            if asked is None:
                raise convert.not_found("access_request")
            own = asked.requester == me
            if not own:
                _check_can_decide(asked, decision, me)
                if asked.state == PENDING:
                    await self._settle(conn, asked, decision, comment, span)
                decided = await self._read(conn, access_request_id)
        if own:
            raise await self._refused(
                errors.PermissionDenied(
                    "an access request must be decided by a principal other than its requester",
                    reason="SELF_APPROVAL",
                    metadata={"access_request_id": str(access_request_id)},
                ),
                ("access_request", access_request_id),
                (asked.case_id, None),
            )
        return decided

    async def _settle(
        self,
        conn: Conn,
        asked: AccessRequest,
        decision: str,
        comment: str,
        span: dt.timedelta | None,
    ) -> None:
        """Record the decision of a pending request; an approval makes its grant,
        lasting `span`."""
        if decision == APPROVED:
            await queries.lock_key(conn, f"case|{asked.case_id}")
        await queries.decide_access_request(
            conn, asked.access_request_id, decision, current_principal().name, comment
        )
        grant_id: uuid.UUID | None = None
        details: dict[str, int] | None = None
        if span is not None:
            grant_id = await queries.insert_grant(conn, asked.access_request_id, span)
            details = {"grant_duration_s": int(span.total_seconds())}
        await self._audit(
            conn,
            ("access_request", asked.access_request_id),
            details,
            case_id=asked.case_id,
            grant_id=grant_id,
        )
        if grant_id is not None:
            log.info(
                "access_approved",
                access_request_id=str(asked.access_request_id),
                grant_id=str(grant_id),
            )

    async def RevokeAccessGrant(
        self, request: pb.RevokeAccessGrantRequest, context: Context
    ) -> pb.RevokeAccessGrantResponse:
        grant_id = validation.uuid_id(request.grant_id, "grant_id")
        reason = validation.text(request.reason, "reason", max_len=500)
        grant = await self._revoke(grant_id, reason)
        return pb.RevokeAccessGrantResponse(grant=convert.grant(grant))

    async def _revoke(self, grant_id: uuid.UUID, reason: str) -> Grant:
        """Revoke an active grant and cancel its queued and running traces and its
        queued messages; a grant no longer active is left as it is."""
        async with self._pool.acquire() as conn, conn.transaction():
            grant = await queries.lock_grant(conn, grant_id)
            if grant is None:
                raise convert.not_found("grant")
            if grants.state(grant) != grants.ACTIVE:
                return grant
            grant = await queries.revoke_grant(conn, grant_id, current_principal().name, reason)
            traces = await queries.cancel_traces_of_grant(conn, grant_id)
            notes = await queries.cancel_notifications_of_grant(conn, grant_id)
            await self._audit(
                conn,
                ("access_grant", grant_id),
                {"reason": reason, "traces_cancelled": traces, "notifications_cancelled": notes},
                case_id=grant.case_id,
                grant_id=grant_id,
            )
        log.info("grant_revoked", grant_id=str(grant_id), traces_cancelled=traces)
        return grant


def _check_can_decide(asked: AccessRequest, decision: str, me: str) -> None:
    """FAILED_PRECONDITION when `asked` can no longer be decided so by `me`."""
    if decision == APPROVED and asked.state == DENIED:
        raise errors.FailedPrecondition(
            "the access request was denied; a new request is needed",
            metadata={"state": DENIED},
        )
    if decision == APPROVED and asked.state == APPROVED and asked.decider != me:
        raise errors.FailedPrecondition(
            "the access request was already approved by another approver",
            metadata={"state": APPROVED},
        )
    if decision == DENIED and asked.state == APPROVED:
        raise errors.FailedPrecondition(
            "the access request was approved; revoke its grant instead",
            metadata={"state": APPROVED},
        )
