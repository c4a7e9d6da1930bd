"""The notification outbox job of the worker pool: the steps of
services/domain/exposure/outbox.py, scheduled in the worker runtime
(workers/runtime), with the messages sent through a sender (services/kernel/senders.py).

A claim takes a batch of due notifications, already checked, opened and rendered
(one crossing of the trio/asyncio bridge); a run sends its messages,
SEND_CONCURRENCY at a time and outside any transaction, and records what became
of each (one more crossing). A full batch means more is due, so the loop goes
again at once; otherwise it waits for NOTIFY stopcovid_notify or the poll, which
is also how soon a retry that came due is noticed.

A batch that fails on the database keeps its lease and is retried after it; any
other error (a key missing from the key store, a bug) is logged
`notifications_batch_error` and backed off from, and the worker carries on.
"""

from __future__ import annotations

from collections import Counter

import asyncpg
import structlog
import trio
import trio_asyncio

from services.domain.exposure.outbox import Batch, Delivery, Outbox, Outcome, after_attempt
from services.kernel import metrics
from services.kernel.config import Settings
from services.kernel.keys import KeyStore
from services.kernel.senders import Sender, SendError
from workers.runtime.loop import POLL_SECONDS

log = structlog.get_logger()

SEND_CONCURRENCY = 8
"""Messages of a batch in flight at once (a slow gateway must not serialise them)."""


class OutboxJob:
    """Drains the outbox: claim a batch, send it, record the outcomes."""

    name = "notifications_batch"

    def __init__(
        self, settings: Settings, pool: asyncpg.Pool, keystore: KeyStore, sender: Sender
    ) -> None:
        self.settings = settings
        self.outbox = Outbox(pool, keystore, settings)
        self.sender = sender
        self.poll_s = POLL_SECONDS
        self.counts: Counter[str] = Counter()

    async def claim(self) -> Batch | None:
        batch: Batch = await trio_asyncio.aio_as_trio(self.outbox.claim)()
        return batch if batch.claimed else None

    async def run(self, batch: Batch) -> bool:
        outcomes: list[Outcome] = []
        limiter = trio.CapacityLimiter(SEND_CONCURRENCY)

        async def one(d: Delivery) -> None:
            async with limiter:
                outcomes.append(await self._send(d))

        async with trio.open_nursery() as nursery:
            for d in batch.deliveries:
                nursery.start_soon(one, d)
        if outcomes:
            await trio_asyncio.aio_as_trio(self.outbox.record)(outcomes)
        tally = Counter(o.counted_as for o in (*batch.settled, *outcomes))
        attempts = {
            d.notification_id: metrics.attempt_label(d.attempt_count) for d in batch.deliveries
        }
        for o in (*batch.settled, *outcomes):
            # Settled at the claim (cancelled, say), before any send: no attempt made.
            attempt = attempts.get(o.notification_id, "none")
            metrics.NOTIFICATIONS.labels(state=o.counted_as, attempt=attempt).inc()
        self.counts.update(tally)
        log.info("notifications_batch", claimed=batch.claimed, **dict(tally))
        return batch.claimed >= self.outbox.batch

    async def _send(self, d: Delivery) -> Outcome:
        try:
            await self.sender.send(d.notification_id, d.phone, d.text)
        except SendError as exc:
            return after_attempt(self.settings, d, exc.message, permanent=exc.permanent)
        except Exception as exc:  # a custom sender's bug must not kill the outbox
            return after_attempt(self.settings, d, f"sender error: {type(exc).__name__}")
        return after_attempt(self.settings, d)
