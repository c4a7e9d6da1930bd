"""The audit log: its entries, listed with filters and pages, and the verification
of its hash chain.

Migration 0005 chains audit_events in the database (a trigger). Verification
recomputes each digest with the same SQL function that made it
(audit_event_digest): one definition of the canonical form, so the check cannot
drift from the writer (jsonb's text form is not something to re-implement byte for
byte), and the whole chain is checked in one set-based pass instead of shipping it
to Python. The guard against a rewrite of the whole chain by someone who owns the
database is the head_hash returned, recorded outside the platform.

Audit expiry, for the AUDIT_EVENTS class, is the SECURITY DEFINER function
`expire_audit_before(cutoff)` of migration 0005: it deletes the entries older than
the cutoff and records the last one's hash as the checkpoint the oldest kept entry
is checked against. Expiry runs call it (services/domain/retention/row_expiry.py).
"""

from __future__ import annotations

import json

from stopcovid.common.v1 import auth_pb2
from stopcovid.retention.v1 import retention_service_pb2 as pb

from services.kernel import errors, metrics, pagination, validation
from services.kernel.db import Conn
from services.kernel.rpc import Context, timestamp
from services.retention.base import RetentionBase
from services.retention.queries import audit_log as store
from services.retention.queries.audit_log import (
    Anchor,
    AuditEvent,
    AuditFilter,
    ChainCheck,
    ChainHead,
)
from services.retention.spans import Span
from services.retention.vocabulary import AUDIT_OUTCOMES

_MAX_SEQUENCE = 2**63 - 1
_ROLE_NAMES = frozenset(auth_pb2.Role.keys())
GENESIS = bytes(32)
"""The hash the first entry links to."""

# verify_chain's problem words, with what each means for the reader.
PROBLEMS = {
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


def _details(details: object) -> dict[str, str]:
    """An entry's details as the API shows them: strings as they are, anything else
    as canonical JSON."""
    raw = json.loads(details) if isinstance(details, str) else (details or {})
    assert isinstance(raw, dict)
    return {
        str(k): v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in raw.items()
    }


def event_to_proto(e: AuditEvent) -> pb.AuditEvent:
    resource = ""
    if e.resource_type or e.resource_id:
        resource = f"{e.resource_type}/{e.resource_id}".rstrip("/")
    return pb.AuditEvent(
        sequence=e.sequence,
        event_time=timestamp(e.occur_time),
        principal=e.principal,
        role=auth_pb2.Role.Value(e.role) if e.role in _ROLE_NAMES else auth_pb2.ROLE_UNSPECIFIED,
        action=e.action,
        outcome=AUDIT_OUTCOMES.number_or(e.outcome, pb.AUDIT_OUTCOME_UNSPECIFIED),
        error_reason=f"ERROR_REASON_{e.error_reason}" if e.error_reason else "",
        case_id=str(e.case_id) if e.case_id else "",
        grant_id=str(e.grant_id) if e.grant_id else "",
        resource=resource,
        details=_details(e.details),
        hash=e.hash.hex(),
        previous_hash=e.previous_hash.hex(),
    )


async def anchor_of(conn: Conn, head: ChainHead, start: int) -> Anchor:
    """What the range starting at `start` must link to: the checkpoint when it starts
    at the oldest kept entry, else the entry before it. When that entry is missing,
    the one before it (with no hash to match), so the range's first entry shows a gap."""
    if start <= head.checkpoint_sequence + 1:
        return Anchor(head.checkpoint_sequence, head.checkpoint_hash, is_checkpoint=True)
    found = await store.hash_at(conn, start - 1)
    if found is None:
        return Anchor(start - 2, GENESIS, is_checkpoint=False)
    return Anchor(start - 1, found, is_checkpoint=False)


def verdict(
    head: ChainHead, anchor: Anchor, checked: ChainCheck, end: int
) -> pb.VerifyAuditChainResponse:
    """The answer for the range (anchor, end] from what verify_chain found and the
    chain head, which remembers the newest entry even when it is gone."""
    last_good = checked.last_good_hash
    head_hash = (last_good if last_good is not None else anchor.hash).hex()
    refused = pb.VerifyAuditChainResponse(
        ok=False, checked_count=checked.verified, head_hash=head_hash
    )
    if checked.problem is not None:
        refused.problem, refused.detail = PROBLEMS[checked.problem]
        refused.first_broken_sequence = checked.broken_sequence or 0
        return refused
    highest = checked.max_sequence if checked.max_sequence is not None else anchor.sequence
    if highest < end:
        # The newest entries of the range are gone: the chain head remembers them.
        refused.problem = pb.AUDIT_CHAIN_PROBLEM_SEQUENCE_GAP
        refused.first_broken_sequence = highest + 1
        refused.detail = (
            f"entries {highest + 1} to {end} are missing: the chain head records "
            f"{head.last_sequence} entries"
        )
        return refused
    if end == head.last_sequence and checked.verified and last_good != head.last_hash:
        refused.problem = pb.AUDIT_CHAIN_PROBLEM_CONTENT_MODIFIED
        refused.checked_count = checked.verified - 1
        refused.first_broken_sequence = end
        refused.detail = "the newest entry's hash does not match the chain head: it was rewritten"
        return refused
    return pb.VerifyAuditChainResponse(ok=True, checked_count=checked.verified, head_hash=head_hash)


def _sequence(value: int, field: str) -> int:
    if value < 0:
        raise errors.InvalidArgument(f"{field} must not be negative", field=field)
    return value


class AuditLogRpcs(RetentionBase):
    async def ListAuditEvents(
        self, request: pb.ListAuditEventsRequest, context: Context
    ) -> pb.ListAuditEventsResponse:
        size = pagination.page_size(request.page_size)
        span = Span.of(request.time_range, "time_range")
        where = AuditFilter(
            start=span.start,
            end=span.end,
            principal=request.principal.strip() or None,
            action=request.action.strip() or None,
            case_id=validation.optional_uuid(request.case_id, "case_id"),
        )
        filters = {
            **span.filters(),
            "principal": where.principal,
            "action": where.action,
            "case_id": str(where.case_id) if where.case_id else None,
        }
        after = pagination.int_key(request.page_token, filters)
        after_sequence = None if after is None else max(0, min(after, _MAX_SEQUENCE))
        events = await store.page(self._pool, where, after_sequence, size + 1)
        shown, token = pagination.page(events, size, filters, lambda last: [last.sequence])
        return pb.ListAuditEventsResponse(
            audit_events=[event_to_proto(e) for e in shown], next_page_token=token
        )

    async def VerifyAuditChain(
        self, request: pb.VerifyAuditChainRequest, context: Context
    ) -> pb.VerifyAuditChainResponse:
        start = _sequence(request.start_sequence, "start_sequence")
        end = _sequence(request.end_sequence, "end_sequence")
        if end and end < start:
            raise errors.InvalidArgument(
                "end_sequence is before start_sequence", field="end_sequence"
            )
        async with (
            self._pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            head = await store.head(conn)
            end = min(end or head.last_sequence, head.last_sequence)
            anchor = await anchor_of(conn, head, start)
            checked = await store.check(conn, anchor, end)
        answer = verdict(head, anchor, checked, end)
        result = "ok" if answer.ok else "broken"
        metrics.AUDIT_VERIFICATIONS.labels(result=result).inc()
        metrics.AUDIT_VERIFIED.labels(result=result).set_to_current_time()
        return answer
