"""Grievances: filed through a registration front-end, routed by category to the
Committee, the MPTC or the regulator with a due time, followed by the complainant
behind a secret (tracking.py) and worked by grievance officers (assign, respond,
resolve; a resolution is final). The complainant's words and contact are stored
sealed under the people key; an appeal against a denied entry keeps a snapshot of
the denial (appeals.py).

Grievance expiry, for the GRIEVANCES class (counted from resolution), is the
SECURITY DEFINER function `expire_grievances_before(cutoff)` of migration 0005,
which expiry runs call (services/domain/retention/row_expiry.py).
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import structlog
from stopcovid.retention.v1 import retention_service_pb2 as pb

from services.domain.retention import audit_actions
from services.kernel import audit, clock, errors, pagination, tenancy, validation
from services.kernel.auth import current_principal
from services.kernel.db import Conn
from services.kernel.keys import Sealed
from services.kernel.rpc import Context, timestamp
from services.retention import appeals, tracking
from services.retention.base import RetentionBase
from services.retention.queries import grievances as store
from services.retention.queries.grievances import (
    DenialSnapshot,
    Grievance,
    GrievanceFilter,
    NewGrievance,
    Response,
)
from services.retention.spans import instant
from services.retention.vocabulary import (
    BODIES,
    CATEGORIES,
    DENIED_ENTRY,
    IN_PROGRESS,
    OUTCOMES,
    RESOLVED,
    ROUTES,
    STATES,
)

log = structlog.get_logger()


def _responses(found: list[Response]) -> list[pb.GrievanceResponse]:
    return [
        pb.GrievanceResponse(message=r.message, create_time=timestamp(r.create_time)) for r in found
    ]


def _as_complainant_sees(g: Grievance, responses: list[Response]) -> dict[str, Any]:
    """The fields GetGrievanceStatusResponse and Grievance share: what the
    complainant is shown, the officers too."""
    return {
        "tracking_id": g.tracking_id,
        "category": CATEGORIES.number(g.category),
        "body": BODIES.number(g.body),
        "state": STATES.number(g.state),
        "responses": _responses(responses),
        "outcome": OUTCOMES.number_or(g.outcome, pb.GRIEVANCE_OUTCOME_UNSPECIFIED),
        "resolution_summary": g.resolution_summary,
        "create_time": timestamp(g.create_time),
        "due_time": timestamp(g.due_time),
        "resolve_time": instant(g.resolve_time),
    }


def _resolved(grievance: Grievance) -> errors.FailedPrecondition:
    return errors.FailedPrecondition(
        "the grievance is resolved; its resolution is final",
        metadata={"tracking_id": grievance.tracking_id, "state": "GRIEVANCE_STATE_RESOLVED"},
    )


def _incident_date(value: str, field: str) -> dt.date | None:
    """A calendar date in Cambodia, not after tomorrow there."""
    if not value:
        return None
    try:
        incident = dt.date.fromisoformat(value)
    except ValueError:
        raise errors.InvalidArgument("incident_date must be YYYY-MM-DD", field=field) from None
    today = clock.local_date(dt.datetime.now(dt.UTC))
    if incident > today + dt.timedelta(days=1):
        raise errors.InvalidArgument("incident_date is in the future", field=field)
    return incident


class GrievanceRpcs(RetentionBase):
    # -- sealing and conversion ----------------------------------------------------

    def _secret(self, grievance_id: uuid.UUID) -> str:
        return tracking.secret_of(self._keystore.blind_index_key(), grievance_id)

    def _open(self, kind: Sealed, grievance: Grievance, blob: bytes) -> str:
        key = self._keystore.people_key(grievance.text_key_id)
        return kind.open(key, grievance.grievance_id, blob).decode()

    def _due_in(self, body: str, appeal: bool) -> dt.timedelta:
        s = self._settings
        if appeal:
            return dt.timedelta(days=s.grievance_appeal_due_days)
        days = {
            "committee": s.grievance_due_days_committee,
            "mptc": s.grievance_due_days_mptc,
            "regulator": s.grievance_due_days_regulator,
        }[body]
        return dt.timedelta(days=days)

    def _filed(self, filed: store.Filed) -> pb.FileGrievanceResponse:
        return pb.FileGrievanceResponse(
            tracking_id=filed.tracking_id,
            secret=self._secret(filed.grievance_id),
            body=BODIES.number(filed.body),
            due_time=timestamp(filed.due_time),
        )

    def _to_proto(
        self,
        g: Grievance,
        responses: list[Response],
        denial: pb.DenialContext | None = None,
    ) -> pb.Grievance:
        return pb.Grievance(
            **_as_complainant_sees(g, responses),
            description=self._open(Sealed.GRIEVANCE_DESCRIPTION, g, g.description_enc),
            contact=self._open(Sealed.GRIEVANCE_CONTACT, g, g.contact_enc),
            venue_id=str(g.venue_id) if g.venue_id else "",
            incident_date=g.incident_date.isoformat() if g.incident_date else "",
            denial_decision_id=str(g.denial_decision_id) if g.denial_decision_id else "",
            assignee=g.assignee,
            update_time=timestamp(g.update_time),
            overdue=g.overdue,
            denial_context=denial,
        )

    async def _shown(self, conn: Conn, g: Grievance) -> pb.Grievance:
        """One grievance as an officer sees it: its messages and any denial it appeals."""
        responses = (await store.responses(conn, [g.grievance_id]))[g.grievance_id]
        denial = await appeals.denial_context(conn, self._keystore, g)
        return self._to_proto(g, responses, denial)

    async def _locked(self, conn: Conn, tracking_id: str) -> Grievance:
        found = await store.get(conn, tracking_id, lock=True)
        if found is None:
            raise tracking.not_found()
        return found

    # -- the front-end ---------------------------------------------------------------

    async def FileGrievance(
        self, request: pb.FileGrievanceRequest, context: Context
    ) -> pb.FileGrievanceResponse:
        g = request.grievance
        category = CATEGORIES.word(g.category, "grievance.category")
        description = validation.text(g.description, "grievance.description", max_len=5000)
        contact = validation.text(g.contact, "grievance.contact", min_len=0, max_len=200)
        venue_id = validation.optional_uuid(g.venue_id, "grievance.venue_id")
        incident = _incident_date(g.incident_date, "grievance.incident_date")
        decision_id = validation.optional_uuid(g.denial_decision_id, "grievance.denial_decision_id")
        if decision_id is not None and category != DENIED_ENTRY:
            raise errors.InvalidArgument(
                "denial_decision_id is only for GRIEVANCE_CATEGORY_DENIED_ENTRY",
                field="grievance.denial_decision_id",
            )
        request_id = validation.optional_uuid(request.request_id, "request_id")
        body = ROUTES[category]
        grievance_id = uuid.uuid4()
        requester = tenancy.request_owner()
        async with self._pool.acquire() as conn, conn.transaction():
            if request_id is not None:
                earlier = await store.filed_by_request(conn, requester, request_id)
                if earlier is not None:
                    return self._filed(earlier)
            if venue_id is not None and not await store.venue_exists(conn, venue_id):
                raise errors.NotFound(
                    "no venue with this venue_id",
                    field="grievance.venue_id",
                    metadata={"resource": "venue"},
                )
            denial = DenialSnapshot()
            if decision_id is not None:
                denial = await appeals.snapshot(conn, self._keystore, decision_id, grievance_id)
            tracking_id = tracking.new_tracking_id()
            while await store.tracking_id_taken(conn, tracking_id):
                tracking_id = tracking.new_tracking_id()
            key = self._keystore.people_key()
            new = NewGrievance(
                grievance_id=grievance_id,
                tracking_id=tracking_id,
                secret_hash=tracking.secret_hash(self._secret(grievance_id)),
                category=category,
                description_enc=Sealed.GRIEVANCE_DESCRIPTION.seal(
                    key, grievance_id, description.encode()
                ),
                contact_enc=Sealed.GRIEVANCE_CONTACT.seal(key, grievance_id, contact.encode()),
                text_key_id=key.key_id,
                venue_id=venue_id,
                incident_date=incident,
                denial_decision_id=decision_id,
                body=body,
                filer=current_principal().name,
                request_id=request_id,
                denial=denial,
            )
            filed = await store.insert(
                conn, new, self._due_in(body, decision_id is not None), requester
            )
            if filed is None:  # a concurrent retry with the same request_id won
                assert request_id is not None
                won = await store.filed_by_request(conn, requester, request_id)
                assert won is not None
                return self._filed(won)
            await audit.record(
                conn,
                audit_actions.FILE_GRIEVANCE,
                "grievances",
                tracking_id,
                {"category": category, "body": body, "appeal": decision_id is not None},
            )
        log.info("grievance_filed", tracking_id=tracking_id, body=body)
        return self._filed(filed)

    async def GetGrievanceStatus(
        self, request: pb.GetGrievanceStatusRequest, context: Context
    ) -> pb.GetGrievanceStatusResponse:
        if not request.secret:
            raise errors.InvalidArgument("secret is required", field="secret")
        tracking_id = tracking.cleaned(request.tracking_id)
        async with self._pool.acquire() as conn:
            g = None if tracking_id is None else await store.get(conn, tracking_id)
            tracking.check_secret(request.secret, g.secret_hash if g is not None else None)
            assert g is not None
            responses = (await store.responses(conn, [g.grievance_id]))[g.grievance_id]
        return pb.GetGrievanceStatusResponse(**_as_complainant_sees(g, responses))

    # -- the officers ----------------------------------------------------------------

    async def GetGrievance(
        self, request: pb.GetGrievanceRequest, context: Context
    ) -> pb.GetGrievanceResponse:
        tracking_id = tracking.tracking_id(request.tracking_id)
        async with self._pool.acquire() as conn:
            g = await store.get(conn, tracking_id)
            if g is None:
                raise tracking.not_found()
            return pb.GetGrievanceResponse(grievance=await self._shown(conn, g))

    async def ListGrievances(
        self, request: pb.ListGrievancesRequest, context: Context
    ) -> pb.ListGrievancesResponse:
        size = pagination.page_size(request.page_size)
        where = GrievanceFilter(
            state=STATES.filter(request.state, "state"),
            body=BODIES.filter(request.body, "body"),
            category=CATEGORIES.filter(request.category, "category"),
            assignee=request.assignee.strip() or None,
            overdue_only=request.overdue_only,
        )
        filters = {
            "state": where.state,
            "body": where.body,
            "category": where.category,
            "assignee": where.assignee,
            "overdue_only": where.overdue_only,
        }
        after = pagination.time_and_key(request.page_token, filters)
        async with self._pool.acquire() as conn:
            rows = await store.page(conn, where, after, size + 1)
            shown, token = pagination.page(
                rows, size, filters, lambda g: [g.due_time.isoformat(), g.tracking_id]
            )
            responses = await store.responses(conn, [g.grievance_id for g in shown])
        return pb.ListGrievancesResponse(
            grievances=[self._to_proto(g, responses[g.grievance_id]) for g in shown],
            next_page_token=token,
        )

    async def AssignGrievance(
        self, request: pb.AssignGrievanceRequest, context: Context
    ) -> pb.AssignGrievanceResponse:
        tracking_id = tracking.tracking_id(request.tracking_id)
        principal = current_principal()
        assignee = validation.text(request.assignee or principal.name, "assignee", max_len=200)
        given_body = BODIES.filter(request.body, "body")
        async with self._pool.acquire() as conn, conn.transaction():
            g = await self._locked(conn, tracking_id)
            if g.state == RESOLVED:
                raise _resolved(g)
            body = given_body or g.body
            if (g.state, g.assignee, g.body) != (IN_PROGRESS, assignee, body):
                g = await store.assign(conn, g.grievance_id, assignee, body)
                await audit.record(
                    conn,
                    audit_actions.ASSIGN_GRIEVANCE,
                    "grievances",
                    tracking_id,
                    {"assignee": assignee, "body": body},
                )
            return pb.AssignGrievanceResponse(grievance=await self._shown(conn, g))

    async def RespondToGrievance(
        self, request: pb.RespondToGrievanceRequest, context: Context
    ) -> pb.RespondToGrievanceResponse:
        tracking_id = tracking.tracking_id(request.tracking_id)
        message = validation.text(request.message, "message", max_len=5000)
        request_id = validation.optional_uuid(request.request_id, "request_id")
        principal = current_principal()
        requester = tenancy.request_owner(principal)
        async with self._pool.acquire() as conn, conn.transaction():
            g = await self._locked(conn, tracking_id)
            earlier = (
                None
                if request_id is None
                else await store.responded_to(conn, requester, request_id)
            )
            if earlier is not None and earlier != tracking_id:
                raise errors.InvalidArgument(
                    "request_id was already used for another grievance", field="request_id"
                )
            if earlier is None:
                if g.state == RESOLVED:
                    raise _resolved(g)
                g = await store.respond(
                    conn, g.grievance_id, message, principal.name, request_id, requester=requester
                )
                await audit.record(
                    conn,
                    audit_actions.RESPOND_TO_GRIEVANCE,
                    "grievances",
                    tracking_id,
                    {"message_chars": len(message)},
                )
            return pb.RespondToGrievanceResponse(grievance=await self._shown(conn, g))

    async def ResolveGrievance(
        self, request: pb.ResolveGrievanceRequest, context: Context
    ) -> pb.ResolveGrievanceResponse:
        tracking_id = tracking.tracking_id(request.tracking_id)
        outcome = OUTCOMES.word(request.outcome, "outcome")
        summary = validation.text(request.resolution_summary, "resolution_summary", max_len=5000)
        async with self._pool.acquire() as conn, conn.transaction():
            g = await self._locked(conn, tracking_id)
            if g.state == RESOLVED and g.outcome != outcome:
                raise errors.FailedPrecondition(
                    "the grievance is already resolved with another outcome",
                    metadata={"tracking_id": tracking_id},
                )
            if g.state != RESOLVED:
                g = await store.resolve(conn, g.grievance_id, outcome, summary)
                assert g.resolve_time is not None
                await audit.record(
                    conn,
                    audit_actions.RESOLVE_GRIEVANCE,
                    "grievances",
                    tracking_id,
                    {"outcome": outcome, "overdue": g.resolve_time > g.due_time},
                )
            return pb.ResolveGrievanceResponse(grievance=await self._shown(conn, g))
