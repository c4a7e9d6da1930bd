"""The notification outbox: tells each contact of a case, once, through a sender.

Traces queue one `notifications` row per contact per case (workers/traces.py).
An outbox task, per batch:

1. claims due rows with SKIP LOCKED in a short transaction of its own that
   counts the attempt and pushes next_attempt_time ahead by the lease, so a
   worker that dies mid-send leaves them to another once the lease passes;
2. in one transaction: checks each row's grant (no longer active -> cancelled),
   decrypts the recipient (case key) and finds them still enrolled (erased ->
   cancelled) and not reported as a case since (-> cancelled), decrypts their
   phone (audited per grant: worker.notify.decrypt_phone) and renders the
   message;
3. sends each message through the sender (workers/senders.py), outside any
   transaction, a few at a time;
4. records each outcome set-based: sent; or queued again with exponential
   backoff and jitter; or failed (a permanent refusal, or the last attempt).

At-least-once delivery to the sender plus a sender idempotent by notification
id gives "no message sent twice". Messages say the risk level, the venue, the
date and what to do - never anything about the case. last_error and logs hold
no personal data.
"""

from __future__ import annotations

import datetime as dt
import random
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import structlog
import trio
import trio_asyncio
from cryptography.exceptions import InvalidTag

from services.domain.exposure import grants
from services.kernel import audit, db, errors
from services.kernel.config import Settings
from services.kernel.keys import KeyError_, KeyStore
from workers import ingest
from workers.messages import check_budget, language_of, render
from workers.senders import Sender, SendError

log = structlog.get_logger()

Q = db.load_queries(Path(__file__).with_name("exposure.sql"))

POLL_SECONDS = 1.0
"""How long an idle outbox task waits for a NOTIFY before looking anyway (this is
also how soon a retry that came due is noticed)."""

SEND_CONCURRENCY = 8
"""Messages of a batch in flight at once (a slow gateway must not serialise them)."""

ACTION_DECRYPT_PHONE = "worker.notify.decrypt_phone"
ACTION_DELIVER = "worker.notify.deliver"


def retry_delay(settings: Settings, attempt: int) -> float:
    """Seconds before the next attempt after `attempt` failed ones: exponential,
    capped, with jitter so retries of one burst spread out."""
    base = settings.notify_backoff_base_s * 2 ** max(0, attempt - 1)
    delay = min(settings.notify_backoff_cap_s, base)
    return float(delay * random.uniform(0.5, 1.0))  # noqa: S311 - jitter, not a secret


# -- the outbox -----------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    notification_id: uuid.UUID
    grant_id: uuid.UUID
    case_id: uuid.UUID
    attempt_count: int
    phone: str
    text: str


@dataclass(frozen=True)
class Outcome:
    notification_id: uuid.UUID
    grant_id: uuid.UUID
    case_id: uuid.UUID
    state: str  # queued (retry), sent, failed, cancelled
    last_error: str = ""
    next_attempt_time: dt.datetime | None = None


class Outbox:
    """The outbox tasks of one worker process."""

    def __init__(
        self, settings: Settings, pool: asyncpg.Pool, keystore: KeyStore, sender: Sender
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.keystore = keystore
        self.sender = sender
        check_budget(settings.sms_max_segments)
        self.batch = max(1, settings.notify_batch)
        self.wakeup = ingest.InboxWakeup()
        self.counts: Counter[str] = Counter()

    # -- asyncio side: one bridge crossing each -----------------------------------

    async def _claim(self) -> tuple[list[Delivery], list[Outcome]]:
        """Claim a batch (committed at once: the lease), then check, decrypt and
        render in one transaction. Returns what to send, and what was cancelled
        (already recorded)."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                Q["claim_notifications"], self.batch, float(self.settings.notify_lease_s)
            )
            if not rows:
                return [], []
            async with conn.transaction():
                return await self._prepare(conn, rows)

    async def _prepare(
        self, conn: db.Conn, rows: list[asyncpg.Record]
    ) -> tuple[list[Delivery], list[Outcome]]:
        cancelled: list[Outcome] = []
        by_grant: dict[tuple[uuid.UUID, uuid.UUID], list[asyncpg.Record]] = defaultdict(list)
        for row in rows:
            by_grant[(row["grant_id"], row["case_id"])].append(row)

        live: list[tuple[asyncpg.Record, uuid.UUID]] = []
        for (grant_id, case_id), group in by_grant.items():
            try:
                await grants.check(conn, grant_id, case_id)
                key = self.keystore.case_key(case_id)
            except errors.PermissionDenied as exc:
                cancelled += [
                    Outcome(r["notification_id"], grant_id, case_id, "cancelled",
                            f"cancelled: access grant no longer active ({exc.reason})")
                    for r in group
                ]  # fmt: skip
                continue
            except KeyError_:
                cancelled += [
                    Outcome(r["notification_id"], grant_id, case_id, "cancelled",
                            "cancelled: the case's records were purged")
                    for r in group
                ]  # fmt: skip
                continue
            for r in group:
                aad = b"notification|" + r["notification_id"].bytes
                try:
                    person = uuid.UUID(bytes=key.decrypt(bytes(r["person_enc"]), aad))
                except InvalidTag:
                    cancelled.append(
                        Outcome(r["notification_id"], grant_id, case_id, "failed",
                                "recipient does not decrypt")
                    )  # fmt: skip
                    continue
                live.append((r, person))

        people = {
            p["person_id"]: p
            for p in await conn.fetch(Q["recipients"], [person for _, person in live])
        }
        venue_ids = list({r["venue_id"] for r, _ in live if r["venue_id"] is not None})
        venues = {
            v["venue_id"]: v["display_name"] for v in await conn.fetch(Q["venue_names"], venue_ids)
        }
        deliveries: list[Delivery] = []
        decrypted: Counter[tuple[uuid.UUID, uuid.UUID]] = Counter()
        for r, person in live:
            found = people.get(person)
            nid, grant_id, case_id = r["notification_id"], r["grant_id"], r["case_id"]
            if found is None:
                cancelled.append(
                    Outcome(nid, grant_id, case_id, "cancelled", "cancelled: person not enrolled")
                )
                continue
            if found["confirmed_case"]:
                # Reported as a case since the trace: told as a case, not as a contact.
                cancelled.append(
                    Outcome(nid, grant_id, case_id, "cancelled", "cancelled: a confirmed case")
                )
                continue
            try:
                people_key = self.keystore.people_key(found["people_key_id"])
            except KeyError_:
                cancelled.append(
                    Outcome(nid, grant_id, case_id, "failed", "phone key not available")
                )
                continue
            try:
                phone = people_key.decrypt(
                    bytes(found["phone_enc"]), b"phone|" + person.bytes
                ).decode()
            except InvalidTag:
                cancelled.append(
                    Outcome(nid, grant_id, case_id, "failed", "phone does not decrypt")
                )
                continue
            decrypted[(grant_id, case_id)] += 1
            text = render(
                r["risk_level"],
                venues.get(r["venue_id"], ""),
                r["exposure_date"],
                language_of(r["template"]),
                self.settings.sms_max_segments,
            )
            deliveries.append(
                Delivery(nid, grant_id, case_id, int(r["attempt_count"]), phone, text)
            )

        for (grant_id, case_id), count in decrypted.items():
            await audit.record(
                conn,
                ACTION_DECRYPT_PHONE,
                "grant",
                str(grant_id),
                {"phones": count},
                case_id=case_id,
                grant_id=grant_id,
                principal=audit.WORKER,
            )
        if cancelled:
            await self._write(conn, cancelled)
        return deliveries, cancelled

    async def _write(self, conn: db.Conn, outcomes: list[Outcome]) -> None:
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
            per_grant[(o.grant_id, o.case_id)]["retry" if o.state == "queued" else o.state] += 1
        for (grant_id, case_id), counts in per_grant.items():
            await audit.record(
                conn,
                ACTION_DELIVER,
                "grant",
                str(grant_id),
                dict(sorted(counts.items())),
                case_id=case_id,
                grant_id=grant_id,
                principal=audit.WORKER,
            )

    async def _record(self, outcomes: list[Outcome]) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await self._write(conn, outcomes)

    # -- trio side --------------------------------------------------------------

    async def _deliver(self, d: Delivery, limiter: trio.CapacityLimiter) -> Outcome:
        async with limiter:
            try:
                await self.sender.send(d.notification_id, d.phone, d.text)
            except SendError as exc:
                error, permanent = exc.message, exc.permanent
            except Exception as exc:  # a custom sender's bug must not kill the outbox
                error, permanent = f"sender error: {type(exc).__name__}", False
            else:
                return Outcome(d.notification_id, d.grant_id, d.case_id, "sent")
        if permanent or d.attempt_count >= self.settings.notify_max_attempts:
            return Outcome(d.notification_id, d.grant_id, d.case_id, "failed", error)
        delay = retry_delay(self.settings, d.attempt_count)
        when = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=delay)
        return Outcome(d.notification_id, d.grant_id, d.case_id, "queued", error, when)

    async def run_once(self) -> int:
        """One batch: claim, send, record. Returns how many were claimed."""
        deliveries, cancelled = await trio_asyncio.aio_as_trio(self._claim)()
        outcomes: list[Outcome] = []
        limiter = trio.CapacityLimiter(SEND_CONCURRENCY)

        async def one(d: Delivery) -> None:
            outcomes.append(await self._deliver(d, limiter))

        async with trio.open_nursery() as nursery:
            for d in deliveries:
                nursery.start_soon(one, d)
        if outcomes:
            await trio_asyncio.aio_as_trio(self._record)(outcomes)
        for o in (*cancelled, *outcomes):
            self.counts["retry" if o.state == "queued" else o.state] += 1
        if deliveries or cancelled:
            log.info(
                "notifications_batch",
                claimed=len(deliveries) + len(cancelled),
                **{state: n for state, n in Counter(
                    "retry" if o.state == "queued" else o.state for o in (*cancelled, *outcomes)
                ).items()},
            )  # fmt: skip
        return len(deliveries) + len(cancelled)

    async def outbox_task(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Drain the outbox: a full batch means more is due, so go again at once;
        otherwise wait for a NOTIFY or the poll (retries come due by time)."""
        backoff = ingest.Backoff()
        task_status.started()
        while True:
            wake = self.wakeup.current()
            try:
                claimed = await self.run_once()
            except ingest.DB_ERRORS as exc:
                # The claimed rows keep their lease and are retried after it.
                log.warning("notifications_batch_failed", **ingest.error_fields(exc))
                await trio.sleep(backoff.next())
                continue
            except Exception as exc:
                # A key missing from the key store, or a bug: the batch is retried
                # after its lease (and given up after the attempts); the worker
                # carries on.
                log.error("notifications_batch_error", error_type=type(exc).__name__)
                await trio.sleep(backoff.next())
                continue
            backoff.reset()
            if claimed >= self.batch:
                await trio.lowlevel.checkpoint()
                continue
            with trio.move_on_after(POLL_SECONDS):
                await wake.wait()
