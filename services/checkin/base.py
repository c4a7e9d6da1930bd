"""What every part of the CheckIn server shares: its keys, caches, committer and
decider, the streams open on it, its lifecycle (start, drain, close) and the
background work beside the RPCs (inbox lag, activity of people), and the
caller's device.

A device has one writer at a time, cluster-wide (migration 0006): opening a
stream, or a unary CheckIn, takes the device's next epoch, and the stream that
held the previous one ends with ABORTED (STREAM_SUPERSEDED) on whichever server
it is; its rows can no longer be committed (commit.py). This module ends this
server's streams of a device when its epoch moves on or the device is revoked.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
import uuid
from pathlib import Path

import asyncpg
import structlog
from google.protobuf import duration_pb2
from stopcovid.checkin.v1 import checkin_service_pb2 as pb
from stopcovid.checkin.v1 import checkin_service_pb2_grpc as pb_grpc

from services.checkin.admission import Admission
from services.checkin.caches import Caches, DeviceInfo
from services.checkin.commit import CommitFailed, GroupCommitter
from services.checkin.scans import ENTRY, EXIT, Decider, Ledger, datetime_to_us
from services.domain.people.tokens import PersonalTokens, VenueCodes
from services.kernel import errors, keystores, metrics
from services.kernel.auth import current_principal
from services.kernel.config import Settings
from services.kernel.db import SERVICE_ROLES, TRANSIENT_ERRORS, load_queries

log = structlog.get_logger()

Q = load_queries(Path(__file__).with_name("queries.sql"))

_LAG_POLL_S = 0.5
_ACTIVITY_FLUSH_S = 60.0  # how often people seen are recorded as active


def duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def device_revoked() -> errors.PermissionDenied:
    return errors.PermissionDenied(
        "this device is not registered or was revoked", reason="DEVICE_REVOKED"
    )


def stream_superseded() -> errors.Aborted:
    return errors.Aborted(
        "another stream or CheckIn call of this device took over; this stream ends "
        "(its unacknowledged scans were not stored by it: resend them on the new stream)",
        reason="STREAM_SUPERSEDED",
    )


_DIRECTION_OF = {"entry": ENTRY, "exit": EXIT}


def fingerprints(rows: list[asyncpg.Record]) -> list[tuple[int, int]]:
    """(sequence, Ledger fingerprint) of stored or inbox rows (query stored_scans)."""
    return [
        (
            row["sequence"],
            Ledger.fingerprint(
                datetime_to_us(row["scan_time"]),
                _DIRECTION_OF[row["direction"]],
                bytes(row["person_ref"]),
            ),
        )
        for row in rows
    ]


_WAKE = object()
"""Queued when a commit task ends, so the stream's writer loop re-checks its end."""


class _End:
    """Queued by the reader when it stops; carries why (None: the device closed)."""

    __slots__ = ("error",)

    def __init__(self, error: errors.DomainError | None) -> None:
        self.error = error


class _Stream:
    """One open StreamScans call: the device's writer while its epoch is current."""

    def __init__(self, device: DeviceInfo, window: int, epoch: int, ledger: Ledger) -> None:
        self.device = device
        self.window = window
        self.epoch = epoch
        self.ledger = ledger
        self.in_flight = 0
        self.queue: asyncio.Queue[pb.StreamScansResponse | _End | CommitFailed | object] = (
            asyncio.Queue()
        )
        self.reader: asyncio.Task[None] | None = None
        self.end_error: errors.DomainError | None = None
        self.unsent_bytes = 0
        """Serialized size of the acks queued and not yet taken by the device."""
        self.unsent_sizes: collections.deque[int] = collections.deque()
        """The size of each of those acks, oldest first: the queue is FIFO, so the
        writer takes off what the committer put on without measuring it again."""
        self.overflowed = asyncio.Event()
        """Set when unsent_bytes passed the stream's budget: the device stopped reading."""
        self.batch_bytes = 0
        """Serialized size of the batches read and not yet acknowledged or given up."""
        self.room = asyncio.Event()
        """Set while held_bytes is under the stream's bound: the reader may read on."""
        self.room.set()
        self.hint_quiet_until = 0.0
        self.hinted = False  # a window-halving hint is in force at the device
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        done.set_result(True)
        self.last_acked: asyncio.Future[bool] = done
        """Resolves when the latest batch so far is acknowledged (True) or never will be."""
        self.active_at = time.monotonic()
        """When the stream last received a batch or sent an ack."""
        self.idle_ended = False
        """The server ended the stream for idleness (STOPCOVID_STREAM_IDLE_S)."""
        self._idle_timer: asyncio.TimerHandle | None = None

    @property
    def held_bytes(self) -> int:
        """What the stream holds for its device (STOPCOVID_STREAM_HELD_BYTES)."""
        return self.batch_bytes + self.unsent_bytes

    def release(self, bound: int) -> None:
        """Bytes went out or were let go: let the reader read on if under `bound`."""
        if self.held_bytes < bound:
            self.room.set()

    def watch_idle(self, idle_s: float) -> None:
        """End the stream once it held nothing and received nothing for `idle_s` (0:
        never). A timer, not a task: checked once per `idle_s` at most, and a batch
        or ack in between only moves the moment the next check looks at."""
        if idle_s <= 0:
            return
        loop = asyncio.get_running_loop()

        def check() -> None:
            due = self.active_at + idle_s
            if time.monotonic() < due or self.in_flight or self.unsent_sizes:
                # Busy, or active since: look again when it may have been quiet long
                # enough (an ack still to come moves active_at on).
                later = max(due, time.monotonic() + 1.0)
                self._idle_timer = loop.call_later(later - time.monotonic(), check)
                return
            if self.end_error is None and self.reader is not None:
                self.idle_ended = True
                self.reader.cancel()  # the reader stops; the handler ends with OK

        self._idle_timer = loop.call_later(idle_s, check)

    def stop_watching(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def end(self, error: errors.DomainError) -> None:
        """Stop reading; acknowledge what is committing; then end with `error`."""
        if self.end_error is None:
            self.end_error = error
        if self.reader is not None:
            self.reader.cancel()


class CheckInBase(pb_grpc.CheckInServiceServicer):
    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        self._pool = pool
        self._settings = settings
        self._keys = keystores.open_for(settings, SERVICE_ROLES["checkin"])
        current, token_keys = self._keys.token_keys()
        self._tokens = PersonalTokens(current, token_keys, settings.token_window_s)
        self._venue_codes = VenueCodes(self._keys.venue_public_keys())
        self._blind_key = self._keys.blind_index_key()
        self.caches = Caches(pool, settings)
        self.caches.on_device_change = self._device_changed
        self.caches.on_stream_change = self._supersede
        self.caches.watched_devices = lambda: list(self._streams)
        self.committer = GroupCommitter(
            pool, settings.commit_interval_ms / 1000, settings.commit_max_rows
        )
        self.decider = Decider(settings, self._tokens, self._keys, self.caches)
        self._streams: dict[uuid.UUID, set[_Stream]] = {}
        self.admission = Admission(settings.inbox_lag_limit)
        self._lag_task: asyncio.Task[None] | None = None
        self._activity_task: asyncio.Task[None] | None = None
        self._draining = False
        self._idle = asyncio.Event()  # set while no stream is open
        self._idle.set()

    def most_held_bytes(self) -> int:
        """The most bytes one open stream holds now (0 without streams)."""
        return max((s.held_bytes for st in self._streams.values() for s in st), default=0)

    # -- lifecycle (called by services.kernel.server) ----------------------------

    async def start(self) -> None:
        metrics.scrape_function(
            metrics.OPEN_STREAMS, lambda: sum(len(s) for s in self._streams.values())
        )
        metrics.scrape_function(metrics.STREAM_HELD_BYTES, self.most_held_bytes)
        metrics.scrape_function(
            metrics.CACHE_ENTRIES, lambda: len(self.decider.verified), cache="tokens"
        )
        await self.caches.start()
        await self.committer.start()
        self._lag_task = asyncio.create_task(self._watch_lag(), name="inbox-lag")
        self._activity_task = asyncio.create_task(self._flush_activity(), name="activity")

    async def drain(self, grace: float) -> None:
        """End every stream: acknowledge what is committing, then UNAVAILABLE."""
        self._draining = True
        for streams in self._streams.values():
            for stream in streams:
                stream.end(errors.Unavailable("the server is shutting down; reconnect"))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace)

    async def close(self) -> None:
        for task in (self._lag_task, self._activity_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self._touch_active()
        await self.committer.close()
        await self.caches.close()
        self._keys.close()  # the PKCS#11 store holds a session and a connection

    async def _watch_lag(self) -> None:
        while True:
            try:
                row = await self._pool.fetchrow(Q["inbox_state"])
                low, high = (row["low"], row["high"]) if row else (None, None)
                lag = 0 if low is None or high is None else high - low + 1
                self.admission.observe(lag, low)
                metrics.INBOX_LAG_ROWS.set(lag)
                metrics.INBOX_LAG_SECONDS.set(max(0.0, float(row["oldest_s"] or 0) if row else 0))
            except TRANSIENT_ERRORS as exc:
                log.warning("inbox_lag_unknown", error_type=type(exc).__name__)
            await asyncio.sleep(_LAG_POLL_S)

    async def _flush_activity(self) -> None:
        while True:
            await asyncio.sleep(_ACTIVITY_FLUSH_S)
            await self._touch_active()

    async def _touch_active(self) -> None:
        """Record who was active (inactive enrollments expire by it); best effort:
        a lost flush only makes an enrollment look older by up to a flush interval."""
        people, self.decider.active = self.decider.active, set()
        if not people:
            return
        try:
            await self._pool.execute(Q["touch_people"], list(people))
        except TRANSIENT_ERRORS as exc:
            self.decider.active |= people
            log.warning("activity_flush_failed", error_type=type(exc).__name__)

    def _supersede(self, device_id: uuid.UUID, epoch: int) -> None:
        """End this server's streams of the device that hold an epoch below `epoch`."""
        for stream in list(self._streams.get(device_id, ())):
            if stream.epoch < epoch:
                stream.end(stream_superseded())

    def _device_changed(self, device_id: uuid.UUID) -> None:
        streams = self._streams.get(device_id)
        if not streams:
            return
        current = self.caches.device_now(device_id)
        for stream in list(streams):
            if (
                current is None
                or not current.active
                or current.certificate_serial != stream.device.certificate_serial
            ):
                stream.end(device_revoked())

    async def _device_of_caller(self) -> DeviceInfo:
        principal = current_principal()
        try:
            device_id = uuid.UUID(principal.name)
        except ValueError:
            raise device_revoked() from None
        device = await self.caches.device(device_id)
        # A re-issued certificate replaces the old one: only the current serial counts.
        if device is None or not device.active:
            raise device_revoked()
        if device.certificate_serial != principal.certificate_serial:
            raise device_revoked()
        return device
