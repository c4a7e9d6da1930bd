"""Grievances, data-subject requests, the audit log and transparency figures.

Grievances
    A grievance gets a short tracking id ("G-7K3M-Q9XD", read over the phone) and
    a secret. The secret is derived, HMAC(blind-index key, "grievance-secret|" +
    grievance id), from the random grievance id with a key kept outside the
    database, and only its SHA-256 is stored: a database dump cannot answer
    GetGrievanceStatus, and a FileGrievance retried with the same request_id can
    hand the same secret back without it being stored anywhere. A wrong secret
    answers NOT_FOUND exactly like an unknown id (compared in constant time).
    A denied-entry appeal keeps a snapshot of the denial (time, venue, the risk
    level and basis in force then) and the person only encrypted, to show the
    officer their level now; never the case.

Data-subject requests
    A person's check-ins are found by their per-day pseudonym for every day whose
    key is still alive, their case records and notifications by their person
    index. Withdrawal erases the enrollment and risk status, records the erasure
    (the CheckIn servers then refuse their tokens), unlinks their check-ins
    (random pseudonym, empty ciphertext) and cancels queued messages, in one
    transaction. Case records kept for an investigation stay until their class
    expires (the CASE_RECORDS policy). An export lists a denied scan once, as a
    denial with its decision id (never also as a check-in), and one case record
    per scan; withdrawal reports the same count of case records, from the same
    query.

Audit chain
    Migration 0005 chains audit_events in the database (trigger). Verification
    recomputes each digest with the same SQL function that made it
    (audit_event_digest): one definition of the canonical form, so the check
    cannot drift from the writer (jsonb's text form is not something to
    re-implement byte for byte), and the whole chain is checked in one
    set-based pass instead of shipping it to Python. The guard against a
    rewrite of the whole chain by someone who owns the database is the
    head_hash returned, recorded outside the platform.

Audit expiry, for the AUDIT_EVENTS retention class, is the SECURITY DEFINER
function `expire_audit_before(cutoff timestamptz) RETURNS bigint` (migration
0005): it deletes the entries older than the cutoff and records the last one's
hash as the checkpoint VerifyAuditChain checks the oldest kept entry against.
Grievance expiry, for the GRIEVANCES class (counted from resolution), is
`expire_grievances_before(cutoff timestamptz) RETURNS bigint`: it deletes the
grievances resolved before the cutoff, with their messages; open ones stay.
Both may be called by stopcovid_retention and stopcovid_worker; expiry runs call
them (services/domain/retention/expiry_run.py registers them for their classes).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import re
import secrets
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import structlog
from stopcovid.common.v1 import auth_pb2, common_pb2
from stopcovid.retention.v1 import retention_service_pb2 as pb

from services.domain.exposure import risk
from services.domain.people import enrollment
from services.domain.people.tokens import PersonalTokens
from services.kernel import audit, errors, keys, pagination, validation
from services.kernel.auth import current_principal
from services.kernel.db import Conn, load_queries, one
from services.kernel.rpc import Context, timestamp
from services.retention import provinces
from services.retention.base import RetentionBase

log = structlog.get_logger()

Q = load_queries(Path(__file__).with_name("accountability.sql"))

_SERVICE = "stopcovid.retention.v1.RetentionService"

# -- grievance vocabulary ------------------------------------------------------

_CATEGORIES = {
    pb.GRIEVANCE_CATEGORY_MISUSE_OF_DATA: "misuse_of_data",
    pb.GRIEVANCE_CATEGORY_PRIVACY: "privacy",
    pb.GRIEVANCE_CATEGORY_DENIED_ENTRY: "denied_entry",
    pb.GRIEVANCE_CATEGORY_WRONG_DATA: "wrong_data",
    pb.GRIEVANCE_CATEGORY_OTHER: "other",
}
_CATEGORIES_BACK = {v: k for k, v in _CATEGORIES.items()}
# Routing, as the proto documents it per category.
_ROUTES = {
    "misuse_of_data": "committee",
    "privacy": "regulator",
    "denied_entry": "committee",
    "wrong_data": "mptc",
    "other": "mptc",
}
_BODIES = {
    pb.GRIEVANCE_BODY_COMMITTEE: "committee",
    pb.GRIEVANCE_BODY_MPTC: "mptc",
    pb.GRIEVANCE_BODY_REGULATOR: "regulator",
}
_BODIES_BACK = {v: k for k, v in _BODIES.items()}
_STATES = {
    pb.GRIEVANCE_STATE_OPEN: "open",
    pb.GRIEVANCE_STATE_IN_PROGRESS: "in_progress",
    pb.GRIEVANCE_STATE_RESOLVED: "resolved",
}
_STATES_BACK = {v: k for k, v in _STATES.items()}
_OUTCOMES = {
    pb.GRIEVANCE_OUTCOME_UPHELD: "upheld",
    pb.GRIEVANCE_OUTCOME_NOT_UPHELD: "not_upheld",
    pb.GRIEVANCE_OUTCOME_REFERRED: "referred",
    pb.GRIEVANCE_OUTCOME_WITHDRAWN: "withdrawn",
}
_OUTCOMES_BACK = {v: k for k, v in _OUTCOMES.items()}

_DIRECTIONS_BACK = {
    "entry": common_pb2.SCAN_DIRECTION_ENTRY,
    "exit": common_pb2.SCAN_DIRECTION_EXIT,
}
_AUDIT_OUTCOMES_BACK = {
    "succeeded": pb.AUDIT_OUTCOME_SUCCEEDED,
    "denied": pb.AUDIT_OUTCOME_DENIED,
    "failed": pb.AUDIT_OUTCOME_FAILED,
}
_PROBLEMS = {
    "gap": (
        pb.AUDIT_CHAIN_PROBLEM_SEQUENCE_GAP,
        "a sequence number is missing before this entry: an entry was deleted",
    ),
    "link": (
        pb.AUDIT_CHAIN_PROBLEM_LINK_BROKEN,
        "this entry does not link to the entry before it: entries were removed or reordered",
    ),
    "checkpoint": (
        pb.AUDIT_CHAIN_PROBLEM_CHECKPOINT_MISMATCH,
        "the oldest kept entry does not link to the checkpoint recorded at audit expiry",
    ),
    "modified": (
        pb.AUDIT_CHAIN_PROBLEM_CONTENT_MODIFIED,
        "this entry's content no longer matches its hash: it was edited",
    ),
}

# Tracking ids: no 0/O, 1/I/L or U, so they survive being read over the phone.
_TRACKING_ALPHABET = "23456789ABCDEFGHJKMNPQRSTVWXYZ"
_TRACKING = re.compile(rf"^G-[{_TRACKING_ALPHABET}]{{4}}-[{_TRACKING_ALPHABET}]{{4}}$")
_MAX_U64 = 2**63 - 1
_ROLE_NAMES = frozenset(auth_pb2.Role.keys())
_GENESIS = bytes(32)
# The longest check-in period a policy may set: older days hold no check-ins.
_MAX_CHECKIN_DAYS = 90


def _action(method: str) -> str:
    return f"{_SERVICE}/{method}"


def _new_tracking_id() -> str:
    chars = [secrets.choice(_TRACKING_ALPHABET) for _ in range(8)]
    return f"G-{''.join(chars[:4])}-{''.join(chars[4:])}"


def _grievance_not_found() -> errors.NotFound:
    return errors.NotFound("no grievance with this tracking id", metadata={"resource": "grievance"})


def _tracking_id(value: str, field: str = "tracking_id") -> str:
    """A well-formed tracking id (case-insensitive); a malformed one cannot exist, so
    it answers NOT_FOUND like an unknown one."""
    cleaned = value.strip().upper()
    if not cleaned:
        raise errors.InvalidArgument(f"{field} is required", field=field)
    if not _TRACKING.match(cleaned):
        raise _grievance_not_found()
    return cleaned


def _interval_days(days: float) -> dt.timedelta:
    return dt.timedelta(days=days)


def _time_range(value: common_pb2.TimeRange, field: str) -> tuple[dt.datetime | None, ...]:
    start = value.start_time.ToDatetime(dt.UTC) if value.HasField("start_time") else None
    end = value.end_time.ToDatetime(dt.UTC) if value.HasField("end_time") else None
    if start is not None and end is not None and end < start:
        raise errors.InvalidArgument(f"{field}.end_time is before its start_time", field=field)
    return start, end


def _details_map(details: Any) -> dict[str, str]:
    raw = json.loads(details) if isinstance(details, str) else (details or {})
    return {
        str(k): v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in raw.items()
    }


def audit_event_to_proto(row: asyncpg.Record) -> pb.AuditEvent:
    role = row["role"]
    resource = ""
    if row["resource_type"] or row["resource_id"]:
        resource = f"{row['resource_type']}/{row['resource_id']}".rstrip("/")
    return pb.AuditEvent(
        sequence=row["sequence"],
        event_time=timestamp(row["occur_time"]),
        principal=row["principal"],
        role=auth_pb2.Role.Value(role) if role in _ROLE_NAMES else auth_pb2.ROLE_UNSPECIFIED,
        action=row["action"],
        outcome=_AUDIT_OUTCOMES_BACK.get(row["outcome"], pb.AUDIT_OUTCOME_UNSPECIFIED),
        error_reason=f"ERROR_REASON_{row['error_reason']}" if row["error_reason"] else "",
        case_id=str(row["case_id"]) if row["case_id"] else "",
        grant_id=str(row["grant_id"]) if row["grant_id"] else "",
        resource=resource,
        details=_details_map(row["details"]),
        hash=row["hash"].hex(),
        previous_hash=row["previous_hash"].hex(),
    )


class AccountabilityRpcs(RetentionBase):
    _tokens_cache: PersonalTokens | None = None

    # -- helpers -----------------------------------------------------------------

    def _secret_of(self, grievance_id: uuid.UUID) -> str:
        mac = hmac.new(
            self._keystore.blind_index_key(),
            b"grievance-secret|" + grievance_id.bytes,
            hashlib.sha256,
        ).digest()
        return mac[:18].hex()

    @staticmethod
    def _secret_hash(secret: str) -> bytes:
        return hashlib.sha256(secret.encode()).digest()

    def _due(self, body: str, appeal: bool) -> dt.timedelta:
        s = self._settings
        if appeal:
            return _interval_days(s.grievance_appeal_due_days)
        days = {
            "committee": s.grievance_due_days_committee,
            "mptc": s.grievance_due_days_mptc,
            "regulator": s.grievance_due_days_regulator,
        }[body]
        return _interval_days(days)

    async def _responses(
        self, conn: Conn, grievance_ids: list[uuid.UUID]
    ) -> dict[uuid.UUID, list[pb.GrievanceResponse]]:
        found: dict[uuid.UUID, list[pb.GrievanceResponse]] = {g: [] for g in grievance_ids}
        for r in await conn.fetch(Q["grievance_responses"], grievance_ids):
            found[r["grievance_id"]].append(
                pb.GrievanceResponse(message=r["message"], create_time=timestamp(r["create_time"]))
            )
        return found

    async def _denial_current_level(
        self, conn: Conn, row: asyncpg.Record
    ) -> common_pb2.RiskLevel.ValueType:
        """The appellant's level now; UNSPECIFIED when they withdrew consent (or their
        id can no longer be read)."""
        if row["person_enc"] is None:
            return common_pb2.RISK_LEVEL_UNSPECIFIED
        try:
            key = self._keystore.people_key(row["people_key_id"])
            person = uuid.UUID(
                bytes=key.decrypt(row["person_enc"], b"grievance|" + row["grievance_id"].bytes)
            )
        except (keys.KeyError_, ValueError):
            return common_pb2.RISK_LEVEL_UNSPECIFIED
        level = await conn.fetchval(Q["current_risk"], person)
        return risk.LEVELS.get(level or "", common_pb2.RISK_LEVEL_UNSPECIFIED)

    def _seal_texts(self, grievance_id: uuid.UUID, *, description: str, contact: str) -> list[Any]:
        """(description_enc, contact_enc, text_key_id): the complainant's words and
        contact encrypted under the people key, each bound to its grievance and field."""
        key = self._keystore.people_key()
        return [
            key.encrypt(description.encode(), b"grievance-description|" + grievance_id.bytes),
            key.encrypt(contact.encode(), b"grievance-contact|" + grievance_id.bytes),
            key.key_id,
        ]

    def _open_text(self, row: asyncpg.Record, field: str) -> str:
        key = self._keystore.people_key(row["text_key_id"])
        aad = f"grievance-{field}|".encode() + row["grievance_id"].bytes
        return key.decrypt(bytes(row[f"{field}_enc"]), aad).decode()

    def _grievance(
        self,
        row: asyncpg.Record,
        responses: list[pb.GrievanceResponse],
        denial: pb.DenialContext | None = None,
    ) -> pb.Grievance:
        g = pb.Grievance(
            tracking_id=row["tracking_id"],
            category=_CATEGORIES_BACK[row["category"]],
            description=self._open_text(row, "description"),
            contact=self._open_text(row, "contact"),
            venue_id=str(row["venue_id"]) if row["venue_id"] else "",
            incident_date=row["incident_date"].isoformat() if row["incident_date"] else "",
            denial_decision_id=str(row["denial_decision_id"]) if row["denial_decision_id"] else "",
            body=_BODIES_BACK[row["body"]],
            state=_STATES_BACK[row["state"]],
            assignee=row["assignee"],
            responses=responses,
            outcome=_OUTCOMES_BACK.get(row["outcome"], pb.GRIEVANCE_OUTCOME_UNSPECIFIED),
            resolution_summary=row["resolution_summary"],
            create_time=timestamp(row["create_time"]),
            update_time=timestamp(row["update_time"]),
            due_time=timestamp(row["due_time"]),
            overdue=row["overdue"],
        )
        if row["resolve_time"] is not None:
            g.resolve_time.CopyFrom(timestamp(row["resolve_time"]))
        if denial is not None:
            g.denial_context.CopyFrom(denial)
        return g

    async def _full_grievance(self, conn: Conn, row: asyncpg.Record) -> pb.Grievance:
        responses = (await self._responses(conn, [row["grievance_id"]]))[row["grievance_id"]]
        denial = None
        if row["denial_decision_id"] is not None:
            denial = pb.DenialContext(
                decision_id=str(row["denial_decision_id"]),
                decision_time=timestamp(row["denial_time"]),
                venue_id=str(row["denial_venue_id"]),
                risk_level=risk.LEVELS.get(row["denial_level"], common_pb2.RISK_LEVEL_HIGH),
                basis=risk.basis_to_proto(row, "basis_")
                if row["basis_reason"] or row["basis_rule"]
                else common_pb2.RiskBasis(),
                current_risk_level=await self._denial_current_level(conn, row),
            )
        return self._grievance(row, responses, denial)

    async def _find_denial(
        self, conn: Conn, decision_id: uuid.UUID
    ) -> tuple[asyncpg.Record, uuid.UUID | None]:
        """The denial's check-in row and the person it denied (None once unlinked)."""
        row = await conn.fetchrow(Q["denial_in_store"], decision_id)
        if row is None:
            row = await conn.fetchrow(Q["denial_in_inbox"], decision_id)
        if row is None:
            raise errors.NotFound(
                "no denial with this decision id is held",
                field="denial_decision_id",
                metadata={"resource": "denial"},
            )
        if not row["person_enc"]:
            return row, None  # the person withdrew consent: the row belongs to nobody
        try:
            day_key = self._keystore.day_key(row["day"], create=False)
        except keys.KeyError_:
            raise errors.NotFound(
                "no denial with this decision id is held (its day has expired)",
                field="denial_decision_id",
                metadata={"resource": "denial"},
            ) from None
        aad = keys.row_aad(
            row["venue_id"].bytes,
            row["device_id"].bytes if row["device_id"] else None,
            row["sequence"],
            row["day"],
        )
        person = uuid.UUID(bytes=day_key.decrypt(row["person_enc"], aad))
        return row, person

    # -- grievances ----------------------------------------------------------------

    async def FileGrievance(
        self, request: pb.FileGrievanceRequest, context: Context
    ) -> pb.FileGrievanceResponse:
        g = request.grievance
        if g.category not in _CATEGORIES:
            raise errors.InvalidArgument(
                "category must be a known GrievanceCategory", field="grievance.category"
            )
        category = _CATEGORIES[g.category]
        description = validation.text(g.description, "grievance.description", max_len=5000)
        contact = validation.text(g.contact, "grievance.contact", min_len=0, max_len=200)
        venue_id = validation.optional_uuid(g.venue_id, "grievance.venue_id")
        incident: dt.date | None = None
        if g.incident_date:
            try:
                incident = dt.date.fromisoformat(g.incident_date)
            except ValueError:
                raise errors.InvalidArgument(
                    "incident_date must be YYYY-MM-DD", field="grievance.incident_date"
                ) from None
            if incident > dt.datetime.now(dt.UTC).date() + dt.timedelta(days=1):
                raise errors.InvalidArgument(
                    "incident_date is in the future", field="grievance.incident_date"
                )
        decision_id = validation.optional_uuid(g.denial_decision_id, "grievance.denial_decision_id")
        if decision_id is not None and category != "denied_entry":
            raise errors.InvalidArgument(
                "denial_decision_id is only for GRIEVANCE_CATEGORY_DENIED_ENTRY",
                field="grievance.denial_decision_id",
            )
        request_id = validation.optional_uuid(request.request_id, "request_id")
        body = _ROUTES[category]
        principal = current_principal()
        grievance_id = uuid.uuid4()
        async with self._pool.acquire() as conn, conn.transaction():
            if request_id is not None:
                earlier = await conn.fetchrow(Q["grievance_by_request"], request_id)
                if earlier is not None:
                    return self._filed(earlier)
            if venue_id is not None and not await conn.fetchval(Q["venue_exists"], venue_id):
                raise errors.NotFound(
                    "no venue with this venue_id",
                    field="grievance.venue_id",
                    metadata={"resource": "venue"},
                )
            snapshot: list[Any] = [None] * 6 + [""] + [None] + [""] + [None] * 2
            if decision_id is not None:
                snapshot = await self._snapshot(conn, decision_id, grievance_id)
            tracking = _new_tracking_id()
            while await conn.fetchval(Q["tracking_id_taken"], tracking):
                tracking = _new_tracking_id()
            row = await conn.fetchrow(
                Q["insert_grievance"],
                grievance_id,
                tracking,
                self._secret_hash(self._secret_of(grievance_id)),
                category,
                *self._seal_texts(grievance_id, description=description, contact=contact),
                venue_id,
                incident,
                decision_id,
                body,
                principal.name,
                request_id,
                self._due(body, decision_id is not None),
                *snapshot,
            )
            if row is None:  # a concurrent retry with the same request_id won
                row = one(await conn.fetchrow(Q["grievance_by_request"], request_id))
                return self._filed(row)
            await audit.record(
                conn,
                _action("FileGrievance"),
                "grievances",
                tracking,
                {"category": category, "body": body, "appeal": decision_id is not None},
            )
        log.info("grievance_filed", tracking_id=tracking, body=body)
        return self._filed(row)

    def _filed(self, row: asyncpg.Record) -> pb.FileGrievanceResponse:
        return pb.FileGrievanceResponse(
            tracking_id=row["tracking_id"],
            secret=self._secret_of(row["grievance_id"]),
            body=_BODIES_BACK[row["body"]],
            due_time=timestamp(row["due_time"]),
        )

    async def _snapshot(
        self, conn: Conn, decision_id: uuid.UUID, grievance_id: uuid.UUID
    ) -> list[Any]:
        """The denial context columns of insert_grievance ($14 to $24)."""
        denial, person = await self._find_denial(conn, decision_id)
        at_denial = None
        person_enc = key_id = None
        if person is not None:
            at_denial = await conn.fetchrow(Q["risk_at"], person, denial["receive_time"])
            key = self._keystore.people_key()
            person_enc = key.encrypt(person.bytes, b"grievance|" + grievance_id.bytes)
            key_id = key.key_id
        return [
            denial["scan_time"],
            denial["venue_id"],
            at_denial["level"] if at_denial else "high",
            at_denial["reason"] if at_denial else None,
            at_denial["exposure_time"] if at_denial else None,
            at_denial["venue_id"] if at_denial else None,
            at_denial["venue_display_name"] if at_denial else "",
            at_denial["overlap"] if at_denial else None,
            at_denial["rule"] if at_denial else "",
            person_enc,
            key_id,
        ]

    async def GetGrievanceStatus(
        self, request: pb.GetGrievanceStatusRequest, context: Context
    ) -> pb.GetGrievanceStatusResponse:
        if not request.secret:
            raise errors.InvalidArgument("secret is required", field="secret")
        tracking = request.tracking_id.strip().upper()
        if not tracking:
            raise errors.InvalidArgument("tracking_id is required", field="tracking_id")
        given = self._secret_hash(request.secret)
        row = None
        if _TRACKING.match(tracking):
            row = await self._pool.fetchrow(Q["get_grievance"], tracking)
        # Compared in constant time, and compared even for an unknown id, so neither
        # the answer nor its timing tells an unknown id from a wrong secret.
        stored = row["secret_hash"] if row is not None else _GENESIS
        if not hmac.compare_digest(given, stored) or row is None:
            raise _grievance_not_found()
        async with self._pool.acquire() as conn:
            responses = (await self._responses(conn, [row["grievance_id"]]))[row["grievance_id"]]
        reply = pb.GetGrievanceStatusResponse(
            tracking_id=row["tracking_id"],
            category=_CATEGORIES_BACK[row["category"]],
            body=_BODIES_BACK[row["body"]],
            state=_STATES_BACK[row["state"]],
            responses=responses,
            outcome=_OUTCOMES_BACK.get(row["outcome"], pb.GRIEVANCE_OUTCOME_UNSPECIFIED),
            resolution_summary=row["resolution_summary"],
            create_time=timestamp(row["create_time"]),
            due_time=timestamp(row["due_time"]),
        )
        if row["resolve_time"] is not None:
            reply.resolve_time.CopyFrom(timestamp(row["resolve_time"]))
        return reply

    async def GetGrievance(
        self, request: pb.GetGrievanceRequest, context: Context
    ) -> pb.GetGrievanceResponse:
        tracking = _tracking_id(request.tracking_id)
        async with self._pool.acquire() as conn:
            row = await conn.fetchrow(Q["get_grievance"], tracking)
            if row is None:
                raise _grievance_not_found()
            return pb.GetGrievanceResponse(grievance=await self._full_grievance(conn, row))

    async def ListGrievances(
        self, request: pb.ListGrievancesRequest, context: Context
    ) -> pb.ListGrievancesResponse:
        size = pagination.page_size(request.page_size)
        if request.state and request.state not in _STATES:
            raise errors.InvalidArgument("state is not a known GrievanceState", field="state")
        if request.body and request.body not in _BODIES:
            raise errors.InvalidArgument("body is not a known GrievanceBody", field="body")
        if request.category and request.category not in _CATEGORIES:
            raise errors.InvalidArgument(
                "category is not a known GrievanceCategory", field="category"
            )
        assignee = request.assignee.strip() or None
        filters = {
            "state": _STATES.get(request.state),
            "body": _BODIES.get(request.body),
            "category": _CATEGORIES.get(request.category),
            "assignee": assignee,
            "overdue_only": request.overdue_only,
        }
        after_time, after_id = pagination.time_and_key(request.page_token, filters)
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                Q["list_grievances"],
                filters["state"],
                filters["body"],
                filters["category"],
                assignee,
                request.overdue_only,
                after_time,
                after_id,
                size + 1,
            )
            rows, token = pagination.page(
                rows, size, filters, pagination.time_id_key("due_time", "tracking_id")
            )
            responses = await self._responses(conn, [r["grievance_id"] for r in rows])
        return pb.ListGrievancesResponse(
            grievances=[self._grievance(r, responses[r["grievance_id"]]) for r in rows],
            next_page_token=token,
        )

    async def _locked(self, conn: Conn, tracking: str) -> asyncpg.Record:
        row = await conn.fetchrow(Q["get_grievance_for_update"], tracking)
        if row is None:
            raise _grievance_not_found()
        return row

    @staticmethod
    def _resolved(row: asyncpg.Record) -> errors.FailedPrecondition:
        return errors.FailedPrecondition(
            "the grievance is resolved; its resolution is final",
            metadata={"tracking_id": row["tracking_id"], "state": "GRIEVANCE_STATE_RESOLVED"},
        )

    async def AssignGrievance(
        self, request: pb.AssignGrievanceRequest, context: Context
    ) -> pb.AssignGrievanceResponse:
        tracking = _tracking_id(request.tracking_id)
        principal = current_principal()
        assignee = validation.text(request.assignee or principal.name, "assignee", max_len=200)
        if request.body and request.body not in _BODIES:
            raise errors.InvalidArgument("body is not a known GrievanceBody", field="body")
        async with self._pool.acquire() as conn, conn.transaction():
            row = await self._locked(conn, tracking)
            if row["state"] == "resolved":
                raise self._resolved(row)
            body = _BODIES.get(request.body, row["body"])
            if (
                row["state"] == "in_progress"
                and row["assignee"] == assignee
                and row["body"] == body
            ):
                return pb.AssignGrievanceResponse(grievance=await self._full_grievance(conn, row))
            row = one(
                await conn.fetchrow(Q["assign_grievance"], row["grievance_id"], assignee, body)
            )
            await audit.record(
                conn,
                _action("AssignGrievance"),
                "grievances",
                tracking,
                {"assignee": assignee, "body": body},
            )
            return pb.AssignGrievanceResponse(grievance=await self._full_grievance(conn, row))

    async def RespondToGrievance(
        self, request: pb.RespondToGrievanceRequest, context: Context
    ) -> pb.RespondToGrievanceResponse:
        tracking = _tracking_id(request.tracking_id)
        message = validation.text(request.message, "message", max_len=5000)
        request_id = validation.optional_uuid(request.request_id, "request_id")
        principal = current_principal()
        async with self._pool.acquire() as conn, conn.transaction():
            row = await self._locked(conn, tracking)
            if request_id is not None:
                earlier = await conn.fetchval(Q["response_by_request"], request_id)
                if earlier is not None:
                    if earlier != tracking:
                        raise errors.InvalidArgument(
                            "request_id was already used for another grievance",
                            field="request_id",
                        )
                    return pb.RespondToGrievanceResponse(
                        grievance=await self._full_grievance(conn, row)
                    )
            if row["state"] == "resolved":
                raise self._resolved(row)
            await conn.fetchrow(
                Q["insert_response"], row["grievance_id"], message, principal.name, request_id
            )
            row = one(await conn.fetchrow(Q["touch_grievance"], row["grievance_id"]))
            await audit.record(
                conn,
                _action("RespondToGrievance"),
                "grievances",
                tracking,
                {"message_chars": len(message)},
            )
            return pb.RespondToGrievanceResponse(grievance=await self._full_grievance(conn, row))

    async def ResolveGrievance(
        self, request: pb.ResolveGrievanceRequest, context: Context
    ) -> pb.ResolveGrievanceResponse:
        tracking = _tracking_id(request.tracking_id)
        if request.outcome not in _OUTCOMES:
            raise errors.InvalidArgument(
                "outcome must be a known GrievanceOutcome", field="outcome"
            )
        outcome = _OUTCOMES[request.outcome]
        summary = validation.text(request.resolution_summary, "resolution_summary", max_len=5000)
        async with self._pool.acquire() as conn, conn.transaction():
            row = await self._locked(conn, tracking)
            if row["state"] == "resolved":
                if row["outcome"] != outcome:
                    raise errors.FailedPrecondition(
                        "the grievance is already resolved with another outcome",
                        metadata={"tracking_id": tracking},
                    )
                return pb.ResolveGrievanceResponse(grievance=await self._full_grievance(conn, row))
            row = one(
                await conn.fetchrow(Q["resolve_grievance"], row["grievance_id"], outcome, summary)
            )
            await audit.record(
                conn,
                _action("ResolveGrievance"),
                "grievances",
                tracking,
                {"outcome": outcome, "overdue": row["resolve_time"] > row["due_time"]},
            )
            return pb.ResolveGrievanceResponse(grievance=await self._full_grievance(conn, row))

    # -- data-subject requests -------------------------------------------------------

    def _tokens(self) -> PersonalTokens:
        if self._tokens_cache is None:
            current, token_keys = self._keystore.token_keys()
            self._tokens_cache = PersonalTokens(current, token_keys, self._settings.token_window_s)
        return self._tokens_cache

    async def _person(self, conn: Conn, selector: common_pb2.PersonSelector) -> asyncpg.Record:
        return await enrollment.find(
            conn, selector, blind_key=self._keystore.blind_index_key(), tokens=self._tokens()
        )

    def _pseudonyms(self, person_id: uuid.UUID) -> tuple[list[dt.date], list[bytes]]:
        """The person's pseudonym on every day whose key is alive in the key store
        (the longest check-in period back, and tomorrow for clock skew). A destroyed
        or never-made key has no rows to link."""
        today = dt.datetime.now(dt.UTC).date()
        days: list[dt.date] = []
        refs: list[bytes] = []
        for back in range(-1, _MAX_CHECKIN_DAYS + 1):
            day = today - dt.timedelta(days=back)
            if not self._keystore.has_day_key(day):
                continue
            try:
                key = self._keystore.day_key(day, create=False)
            except keys.KeyError_:
                continue
            days.append(day)
            refs.append(key.pseudonym(person_id.bytes))
        return days, refs

    async def ExportPersonData(
        self, request: pb.ExportPersonDataRequest, context: Context
    ) -> pb.ExportPersonDataResponse:
        async with (
            self._pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            person = await self._person(conn, request.person)
            person_id: uuid.UUID = person["person_id"]
            index = self._keystore.person_index(person_id.bytes)
            phone = (
                self._keystore.people_key(person["people_key_id"])
                .decrypt(person["phone_enc"], b"phone|" + person_id.bytes)
                .decode()
            )
            enrollment = pb.ExportedEnrollment(
                person_id=str(person_id),
                phone_number=phone,
                enroll_time=timestamp(person["enroll_time"]),
                consent_text_version=person["consent_text_version"],
                consent_time=timestamp(person["consent_time"]),
                language_code=person["language_code"],
            )
            if person.get("last_activity_time") is not None:
                enrollment.last_activity_time.CopyFrom(timestamp(person["last_activity_time"]))
            days, refs = self._pseudonyms(person_id)
            visits = await conn.fetch(Q["person_checkins"], days, refs)
            records = await conn.fetch(Q["person_case_records"], index)
            risk_row = await conn.fetchrow(Q["person_risk"], person_id)
            notes = await conn.fetch(Q["person_notifications"], index)
            accesses = await conn.fetch(Q["person_data_accesses"], index)
            export_time = dt.datetime.now(dt.UTC)

            # A denied scan is a refusal at the door, not a visit: it is listed once,
            # under denials, with the decision id to appeal with.
            denied = [v for v in visits if v["outcome"] == "denied"]
            visits = [v for v in visits if v["outcome"] != "denied"]
            kept = {(r["venue_id"], r["scan_time"], r["direction"]) for r in records}
            check_ins = [
                (
                    v["scan_time"],
                    pb.ExportedCheckIn(
                        venue_id=str(v["venue_id"]),
                        venue_display_name=v["venue_display_name"],
                        scan_time=timestamp(v["scan_time"]),
                        direction=_DIRECTIONS_BACK[v["direction"]],
                        case_record=(v["venue_id"], v["scan_time"], v["direction"]) in kept,
                    ),
                )
                for v in visits
            ]
            seen = {(v["venue_id"], v["scan_time"], v["direction"]) for v in visits}
            check_ins += [
                (
                    r["scan_time"],
                    pb.ExportedCheckIn(
                        venue_id=str(r["venue_id"]),
                        venue_display_name=r["venue_display_name"],
                        scan_time=timestamp(r["scan_time"]),
                        direction=_DIRECTIONS_BACK[r["direction"]],
                        case_record=True,
                    ),
                )
                for r in records
                if (r["venue_id"], r["scan_time"], r["direction"]) not in seen
            ]
            check_ins.sort(key=lambda pair: pair[0])
            denials = [
                pb.ExportedDenial(
                    decision_id=str(v["decision_id"] or ""),
                    decision_time=timestamp(v["scan_time"]),
                    venue_id=str(v["venue_id"]),
                )
                for v in sorted(denied, key=lambda v: v["scan_time"])
            ]
            reply = pb.ExportPersonDataResponse(
                enrollment=enrollment,
                check_ins=[c for _, c in check_ins],
                risk_status=risk.status_to_proto(risk_row, dt.datetime.now(dt.UTC)),
                denials=denials,
                notifications=[
                    pb.ExportedNotification(
                        notification_id=str(n["notification_id"]),
                        risk_level=risk.LEVELS[n["risk_level"]],
                        send_time=timestamp(n["send_time"]),
                    )
                    for n in notes
                ],
                data_accesses=[
                    pb.ExportedDataAccess(
                        grant_id=str(a["grant_id"]),
                        outbreak_reference=a["outbreak_reference"],
                        action="stopcovid.exposure.v1.ExposureService/StartTrace",
                        access_time=timestamp(a["access_time"]),
                    )
                    for a in accesses
                ],
                export_time=timestamp(export_time),
            )
        # Audited in a transaction of its own: the export's was read-only.
        async with self._pool.acquire() as conn:
            await audit.record(
                conn,
                _action("ExportPersonData"),
                "people",
                "",
                {
                    "selector": request.person.WhichOneof("selector") or "",
                    "check_ins": len(reply.check_ins),
                    "denials": len(reply.denials),
                    "notifications": len(reply.notifications),
                    "data_accesses": len(reply.data_accesses),
                },
            )
        return reply

    async def WithdrawConsent(
        self, request: pb.WithdrawConsentRequest, context: Context
    ) -> pb.WithdrawConsentResponse:
        async with self._pool.acquire() as conn, conn.transaction():
            found = await self._person(conn, request.person)
            person_id: uuid.UUID = found["person_id"]
            # The delete locks the row: a concurrent withdrawal waits, then finds
            # nothing to delete.
            if await conn.fetchval(Q["erase_person"], person_id) is None:
                raise errors.NotFound("no enrolled person matches", metadata={"resource": "person"})
            index = self._keystore.person_index(person_id.bytes)
            days, refs = self._pseudonyms(person_id)
            erased_at = await conn.fetchval(Q["record_erasure"], person_id)
            await conn.execute(Q["delete_risk"], person_id)
            inbox = await conn.execute(Q["unlink_inbox"], days, refs)
            store = await conn.execute(Q["unlink_checkins"], days, refs)
            cancelled = await conn.execute(Q["cancel_notifications"], index)
            # Counted as ExportPersonData lists them: the same query.
            kept = await conn.fetch(Q["person_case_records"], index)
            retained_until = max((r["retained_until"] for r in kept), default=None)
            unlinked = int(inbox.split()[-1]) + int(store.split()[-1])
            await audit.record(
                conn,
                _action("WithdrawConsent"),
                "people",
                "",
                {
                    "selector": request.person.WhichOneof("selector") or "",
                    "unlinked_check_ins": unlinked,
                    "cancelled_notifications": int(cancelled.split()[-1]),
                    "retained_case_records": len(kept),
                },
            )
        log.info("consent_withdrawn", unlinked_check_ins=unlinked, retained=len(kept))
        reply = pb.WithdrawConsentResponse(
            withdraw_time=timestamp(erased_at or dt.datetime.now(dt.UTC)),
            unlinked_check_in_count=unlinked,
            retained_case_record_count=len(kept),
        )
        if retained_until is not None:
            reply.retained_until_time.CopyFrom(timestamp(retained_until))
        return reply

    # -- audit ---------------------------------------------------------------------

    async def ListAuditEvents(
        self, request: pb.ListAuditEventsRequest, context: Context
    ) -> pb.ListAuditEventsResponse:
        size = pagination.page_size(request.page_size)
        start, end = _time_range(request.time_range, "time_range")
        case_id = validation.optional_uuid(request.case_id, "case_id")
        principal = request.principal.strip() or None
        action = request.action.strip() or None
        filters = {
            "start": start.isoformat() if start else None,
            "end": end.isoformat() if end else None,
            "principal": principal,
            "action": action,
            "case_id": str(case_id) if case_id else None,
        }
        after = pagination.int_key(request.page_token, filters)
        after_sequence = None if after is None else max(0, min(after, _MAX_U64))
        rows = await self._pool.fetch(
            Q["list_audit_events"], start, end, principal, action, case_id, after_sequence, size + 1
        )
        rows, token = pagination.page(rows, size, filters, lambda last: [last["sequence"]])
        return pb.ListAuditEventsResponse(
            audit_events=[audit_event_to_proto(r) for r in rows], next_page_token=token
        )

    async def VerifyAuditChain(
        self, request: pb.VerifyAuditChainRequest, context: Context
    ) -> pb.VerifyAuditChainResponse:
        if request.start_sequence < 0:
            raise errors.InvalidArgument(
                "start_sequence must not be negative", field="start_sequence"
            )
        if request.end_sequence < 0:
            raise errors.InvalidArgument("end_sequence must not be negative", field="end_sequence")
        if request.end_sequence and request.end_sequence < request.start_sequence:
            raise errors.InvalidArgument(
                "end_sequence is before start_sequence", field="end_sequence"
            )
        async with (
            self._pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            head = one(await conn.fetchrow(Q["chain_head"]))
            checkpoint: int = head["checkpoint_sequence"]
            newest: int = head["last_sequence"]
            end = min(request.end_sequence or newest, newest)
            from_checkpoint = request.start_sequence <= checkpoint + 1
            if from_checkpoint:
                anchor_sequence, anchor_hash = checkpoint, bytes(head["checkpoint_hash"])
            else:
                anchor_sequence = request.start_sequence - 1
                found = await conn.fetchval(Q["audit_hash_at"], anchor_sequence)
                if found is None:
                    # The entry before the range is missing: the range's first entry
                    # then shows a gap before it.
                    anchor_sequence, anchor_hash = anchor_sequence - 1, _GENESIS
                else:
                    anchor_hash = bytes(found)
            result = one(
                await conn.fetchrow(
                    Q["verify_chain"], anchor_sequence, anchor_hash, end, from_checkpoint
                )
            )
        verified: int = result["verified"]
        last_hash = result["last_good_hash"]
        head_hash = (bytes(last_hash) if last_hash is not None else anchor_hash).hex()
        if result["problem"] is not None:
            problem, detail = _PROBLEMS[result["problem"]]
            return pb.VerifyAuditChainResponse(
                ok=False,
                checked_count=verified,
                first_broken_sequence=result["broken_sequence"],
                problem=problem,
                detail=detail,
                head_hash=head_hash,
            )
        highest = result["max_sequence"] if result["max_sequence"] is not None else anchor_sequence
        if highest < end:
            # The newest entries of the range are gone: the chain head remembers them.
            return pb.VerifyAuditChainResponse(
                ok=False,
                checked_count=verified,
                first_broken_sequence=highest + 1,
                problem=pb.AUDIT_CHAIN_PROBLEM_SEQUENCE_GAP,
                detail=f"entries {highest + 1} to {end} are missing: the chain head records "
                f"{newest} entries",
                head_hash=head_hash,
            )
        if end == newest and verified and bytes(last_hash) != bytes(head["last_hash"]):
            return pb.VerifyAuditChainResponse(
                ok=False,
                checked_count=verified - 1,
                first_broken_sequence=end,
                problem=pb.AUDIT_CHAIN_PROBLEM_CONTENT_MODIFIED,
                detail="the newest entry's hash does not match the chain head: it was rewritten",
                head_hash=head_hash,
            )
        return pb.VerifyAuditChainResponse(ok=True, checked_count=verified, head_hash=head_hash)

    # -- transparency -------------------------------------------------------------

    async def GetTransparencyReport(
        self, request: pb.GetTransparencyReportRequest, context: Context
    ) -> pb.GetTransparencyReportResponse:
        start, end = _time_range(request.period, "period")
        now = dt.datetime.now(dt.UTC)
        low = start or dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
        high = end or now
        async with (
            self._pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            c = one(await conn.fetchrow(Q["transparency"], low, high))
            by_state = {
                r["state"]: r["n"]
                for r in await conn.fetch(Q["transparency_grievances"], low, high)
            }
            deletions = await conn.fetch(Q["transparency_deletions"], low, high)
            by_province = await provinces.by_province(conn, low, high)
        period = common_pb2.TimeRange(end_time=timestamp(high))
        if start is not None:
            period.start_time.CopyFrom(timestamp(start))
        return pb.GetTransparencyReportResponse(
            period=period,
            generate_time=timestamp(now),
            case_count=c["cases"],
            access_request_count=c["access_requests"],
            approval_count=c["approvals"],
            denial_count=c["denials"],
            revoked_grant_count=c["revoked_grants"],
            trace_count=c["traces"],
            notification_sent_count=c["notifications_sent"],
            notification_failed_count=c["notifications_failed"],
            entry_denial_count=c["entry_denials"],
            grievances_by_state=[
                pb.GrievanceStateCount(state=number, count=by_state.get(name, 0))
                for number, name in _STATES.items()
            ],
            overdue_grievance_count=c["overdue_grievances"],
            deletions=[
                pb.DataClassDeletionCount(
                    data_class=pb.DataClass.Value(f"DATA_CLASS_{d['data_class'].upper()}"),
                    report_count=d["reports"],
                    row_count=d["rows"] or 0,
                    destroyed_key_count=d["keys"] or 0,
                )
                for d in sorted(
                    deletions,
                    key=lambda d: pb.DataClass.Value(f"DATA_CLASS_{d['data_class'].upper()}"),
                )
            ],
            consent_withdrawal_count=c["consent_withdrawals"],
            by_province=by_province,
        )
