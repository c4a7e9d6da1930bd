"""The notification outbox: what telling each contact of a case, once, takes. The
worker pool schedules it and sends the messages (workers/notify.py through
services/kernel/senders.py); this is each step's database work and rules.

Traces queue one `notifications` row per contact per case (trace_job.py). Per
batch:

1. `Outbox.claim` claims due rows with SKIP LOCKED in a short transaction of its
   own that counts the attempt and pushes next_attempt_time ahead by the lease,
   so a worker that dies mid-send leaves them to another once the lease passes;
   then, in one transaction, checks each row's grant (no longer active ->
   cancelled), opens the recipient (case key) and finds them still enrolled
   (erased -> cancelled) and not reported as a case since (-> cancelled), opens
   their phone (audited per grant: worker.notify.decrypt_phone) and renders the
   message (messages.py);
2. the worker sends each message, outside any transaction;
3. `after_attempt` says what an attempt's result means: sent; queued
   again with exponential backoff and jitter; or failed (a permanent refusal,
   or the last attempt); `Outbox.record` writes the outcomes set-based, audited
   per grant (worker.notify.deliver, counts only).

At-least-once delivery to the sender plus a sender idempotent by notification id
gives "no message sent twice". Messages say the risk level, the venue, the date
and what to do - never anything about the case. last_error and logs hold no
personal data.
"""

from __future__ import annotations

import datetime as dt
import random
import uuid
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg
from cryptography.exceptions import InvalidTag

from services.domain.exposure import grants
from services.domain.exposure.messages import check_budget, language_of, render
from services.kernel import audit, db, errors
from services.kernel.config import Settings
from services.kernel.keys import KeyError_, KeyStore, Sealed

Q = db.load_queries(Path(__file__).with_name("outbox.sql"))

JOB = "notify"
ACTION_DECRYPT_PHONE = audit.worker_action(JOB, "decrypt_phone")
ACTION_DELIVER = audit.worker_action(JOB, "deliver")

# notifications.state
QUEUED, SENT, FAILED, CANCELLED = "queued", "sent", "failed", "cancelled"
RETRY = "retry"
"""How an attempt that left the row queued is counted (logs and audit details)."""


@dataclass(frozen=True)
class Queued:
    """A notification claimed for an attempt (query claim_notifications)."""

    notification_id: uuid.UUID
    grant_id: uuid.UUID
    case_id: uuid.UUID
    person_enc: bytes
    """Sealed.NOTIFICATION_PERSON, bound to the notification."""
    risk_level: str
    template: str
    venue_id: uuid.UUID | None
    exposure_date: dt.date | None
    attempt_count: int


@dataclass(frozen=True)
class Recipient:
    """An enrolled person a message is for (query recipients)."""

    person_id: uuid.UUID
    phone_enc: bytes
    """Sealed.PHONE, bound to the person, under the people key `people_key_id`."""
    people_key_id: str
    confirmed_case: bool


@dataclass(frozen=True)
class Delivery:
    """A message to send."""

    notification_id: uuid.UUID
    grant_id: uuid.UUID
    case_id: uuid.UUID
    attempt_count: int
    phone: str
    text: str


@dataclass(frozen=True)
class Outcome:
    """What became of one notification's attempt."""

    notification_id: uuid.UUID
    grant_id: uuid.UUID
    case_id: uuid.UUID
    state: str
    last_error: str = ""
    """Never personal data."""
    next_attempt_time: dt.datetime | None = None

    @property
    def counted_as(self) -> str:
        return RETRY if self.state == QUEUED else self.state


@dataclass(frozen=True)
class Batch:
    """A claimed batch: the messages to send, and the rows already settled
    (cancelled or failed before any send, recorded in the claim's transaction)."""

    deliveries: list[Delivery]
    settled: list[Outcome]

    @property
    def claimed(self) -> int:
        return len(self.deliveries) + len(self.settled)


def retry_delay(base_s: float, cap_s: float, attempt: int) -> float:
    """Seconds before the next attempt after `attempt` failed ones: exponential,
    capped, with jitter so retries of one burst spread out."""
    delay = min(cap_s, base_s * 2 ** max(0, attempt - 1))
    return float(delay * random.uniform(0.5, 1.0))  # noqa: S311 - jitter, not a secret


async def _audit(
    conn: db.Conn,
    action: str,
    grant_id: uuid.UUID,
    case_id: uuid.UUID,
    counts: dict[str, int],
) -> None:
    """Audit what the outbox did under one grant: counts only."""
    await audit.record(
        conn,
        action,
        "grant",
        str(grant_id),
        counts,
        case_id=case_id,
        grant_id=grant_id,
        principal=audit.WORKER,
    )


def after_attempt(
    settings: Settings,
    d: Delivery,
    error: str | None = None,
    *,
    permanent: bool = False,
    now: dt.datetime | None = None,
) -> Outcome:
    """The outcome of one send: sent (no `error`); failed when `permanent` or out of
    attempts (`settings.notify_max_attempts`); otherwise queued again `retry_delay`
    after `now`."""
    if error is None:
        return Outcome(d.notification_id, d.grant_id, d.case_id, SENT)
    if permanent or d.attempt_count >= settings.notify_max_attempts:
        return Outcome(d.notification_id, d.grant_id, d.case_id, FAILED, error)
    delay = retry_delay(
        settings.notify_backoff_base_s, settings.notify_backoff_cap_s, d.attempt_count
    )
    when = (now or dt.datetime.now(dt.UTC)) + dt.timedelta(seconds=delay)
    return Outcome(d.notification_id, d.grant_id, d.case_id, QUEUED, error, when)


class Outbox:
    """The outbox's database steps, for one worker process (asyncio: each call
    crosses the workers' bridge once)."""

    def __init__(self, pool: asyncpg.Pool, keystore: KeyStore, settings: Settings) -> None:
        self.pool = pool
        self.keystore = keystore
        self.settings = settings
        check_budget(settings.sms_max_segments)  # refuses to start with too small a budget
        self.batch = max(1, settings.notify_batch)

    async def claim(self) -> Batch:
        """Claim a batch (committed at once: the lease), then check, open and render
        in one transaction."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                Q["claim_notifications"], self.batch, float(self.settings.notify_lease_s)
            )
            if not rows:
                return Batch([], [])
            async with conn.transaction():
                return await self._prepare(conn, [db.record(Queued, r) for r in rows])

    async def _prepare(self, conn: db.Conn, rows: Sequence[Queued]) -> Batch:
        settled: list[Outcome] = []

        def settle(q: Queued, state: str, error: str) -> None:
            settled.append(Outcome(q.notification_id, q.grant_id, q.case_id, state, error))

        by_grant: dict[tuple[uuid.UUID, uuid.UUID], list[Queued]] = defaultdict(list)
        for q in rows:
            by_grant[(q.grant_id, q.case_id)].append(q)

        live: list[tuple[Queued, uuid.UUID]] = []
        for (grant_id, case_id), group in by_grant.items():
            try:
                await grants.check(conn, grant_id, case_id)
                key = self.keystore.case_key(case_id)
            except errors.PermissionDenied as exc:
                for q in group:
                    settle(q, CANCELLED, f"cancelled: access grant no longer active ({exc.reason})")
                continue
            except KeyError_:
                for q in group:
                    settle(q, CANCELLED, "cancelled: the case's records were purged")
                continue
            for q in group:
                try:
                    opened = Sealed.NOTIFICATION_PERSON.open(key, q.notification_id, q.person_enc)
                except InvalidTag:
                    settle(q, FAILED, "recipient does not decrypt")
                    continue
                live.append((q, uuid.UUID(bytes=opened)))

        found = await conn.fetch(Q["recipients"], [person for _, person in live])
        people = {r["person_id"]: db.record(Recipient, r) for r in found}
        venue_ids = list({q.venue_id for q, _ in live if q.venue_id is not None})
        venues = {
            v["venue_id"]: v["display_name"] for v in await conn.fetch(Q["venue_names"], venue_ids)
        }
        deliveries: list[Delivery] = []
        decrypted: Counter[tuple[uuid.UUID, uuid.UUID]] = Counter()
        for q, person in live:
            recipient = people.get(person)
            if recipient is None:
                settle(q, CANCELLED, "cancelled: person not enrolled")
                continue
            if recipient.confirmed_case:
                # Reported as a case since the trace: told as a case, not as a contact.
                settle(q, CANCELLED, "cancelled: a confirmed case")
                continue
            try:
                people_key = self.keystore.people_key(recipient.people_key_id)
            except KeyError_:
                settle(q, FAILED, "phone key not available")
                continue
            try:
                phone = Sealed.PHONE.open(people_key, person, recipient.phone_enc).decode()
            except InvalidTag:
                settle(q, FAILED, "phone does not decrypt")
                continue
            decrypted[(q.grant_id, q.case_id)] += 1
            text = render(
                q.risk_level,
                venues.get(q.venue_id, ""),
                q.exposure_date,
                language_of(q.template),
                self.settings.sms_max_segments,
            )
            deliveries.append(
                Delivery(q.notification_id, q.grant_id, q.case_id, q.attempt_count, phone, text)
            )

        for (grant_id, case_id), count in decrypted.items():
            await _audit(conn, ACTION_DECRYPT_PHONE, grant_id, case_id, {"phones": count})
        if settled:
            await self._write(conn, settled)
        return Batch(deliveries, settled)

    async def record(self, outcomes: Sequence[Outcome]) -> None:
        """Record the outcomes of a batch's sends, in a transaction of their own."""
        async with self.pool.acquire() as conn, conn.transaction():
            await self._write(conn, outcomes)

    async def _write(self, conn: db.Conn, outcomes: Sequence[Outcome]) -> None:
        """Record outcomes (one statement) and audit them per grant, counts only."""
        await conn.fetch(
            Q["finish_notifications"],
            [o.notification_id for o in outcomes],
            [o.state for o in outcomes],
            [o.last_error[:500] for o in outcomes],
            [o.next_attempt_time for o in outcomes],
        )
        per_grant: dict[tuple[uuid.UUID, uuid.UUID], Counter[str]] = defaultdict(Counter)
        for o in outcomes:
            per_grant[(o.grant_id, o.case_id)][o.counted_as] += 1
        for (grant_id, case_id), counts in per_grant.items():
            await _audit(conn, ACTION_DELIVER, grant_id, case_id, dict(sorted(counts.items())))
