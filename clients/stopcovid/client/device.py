"""The scanner device SDK: streams a device's buffered scans to CheckInService.StreamScans.

    buffer = ScanBuffer("/var/lib/scanner/scans.db")
    config = ClientConfig.from_files("checkin.example:50051", ca, device_pem, device_key)
    async with DeviceClient(config, buffer, on_ack=show) as device:
        device.scan(token_from_camera)         # durable before it returns; sent soon after
        ...
        await device.drain()                   # every scan acknowledged

Why it is built this way:

- Every scan goes through the durable `ScanBuffer` first and leaves it only on its ack
  (whatever the outcome: REJECTED and DUPLICATE are final answers too). A lost
  connection, a killed server or a device reboot therefore loses nothing: after
  reconnecting, everything unacknowledged is resent with its original sequence number,
  and the server stores a resent scan once (SCAN_OUTCOME_DUPLICATE).
- Batches, not single scans, are the unit on the wire (per-message cost dominates in
  Python gRPC). The writer sends whatever is pending as soon as the server's window
  allows, so a quiet door gets answers at once and a busy one gets large batches: the
  window fills, scans pile up, and the next batch carries them all.
- At most `max_in_flight_batches` batches are unacknowledged: the server slows its acks
  when its inbox lags, and this window is what slows the device without either side's
  memory growing. A FlowControlHint replaces the window and pauses sending.
- Reconnects back off exponentially with jitter, so thousands of devices cut off by the
  same outage do not return in the same instant.
- Several CheckIn servers: a target of comma-separated addresses
  ("a.example:50051,b.example:50051") balances round robin over them, and a stream that
  failed is reopened on a fresh channel: a stream cut by a dead server, or by a server's
  `max_connection_age`, resumes on whichever server answers (clients/_channel.py).
- A quiet door holds no stream: the server ends a stream idle for its
  `StreamSettings.idle_timeout` (status OK, trailer `stopcovid-stream-end: idle`), and
  the client keeps the connection and opens its next stream on it with the next scan,
  not at once and without a backoff.
- The device's identity is its certificate. PERMISSION_DENIED (DEVICE_REVOKED: unknown or
  revoked device), UNAUTHENTICATED and UNIMPLEMENTED cannot be fixed by retrying; they
  stop the client and are raised to its owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import itertools
import logging
import random
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Self

import grpc
import grpc.aio
from google.protobuf import timestamp_pb2
from stopcovid.checkin.v1 import checkin_service_pb2 as pb
from stopcovid.client._closing import AsyncClosing
from stopcovid.client.buffer import BufferedScan, ScanBuffer
from stopcovid.client.checkin import AsyncCheckInClient
from stopcovid.client.config import ClientConfig
from stopcovid.client.errors import (
    InvalidArgument,
    PermissionDenied,
    StopCovidError,
    Unauthenticated,
    Unimplemented,
)
from stopcovid.common.v1 import common_pb2

if TYPE_CHECKING:
    from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

__all__ = ["BatchAck", "DeviceClient", "DeviceStats", "ReconnectPolicy"]

log = logging.getLogger(__name__)

_FATAL = (PermissionDenied, Unauthenticated, Unimplemented)
"""Errors no retry can fix: a revoked or unknown device, a certificate without the device
role, a server without the RPC. Everything else (UNAVAILABLE, CANCELLED when a server
stops, RESOURCE_EXHAUSTED, a broken connection, ...) is answered by reconnecting."""

_MAX_INVALID_ARGUMENT = 6
"""Consecutive INVALID_ARGUMENT endings, without any ack between them, after which the
client gives up: by then batches are down to one scan and the server still refuses."""


@dataclass(frozen=True, slots=True)
class ReconnectPolicy:
    """How long to wait before reconnecting after the stream ended with an error."""

    initial: float = 0.2
    """Seconds before the first reconnect."""
    maximum: float = 15.0
    """Upper bound of any wait."""
    multiplier: float = 2.0
    """Growth of the wait per consecutive failure."""
    jitter: float = 0.5
    """Fraction of each wait drawn at random: a wait `b` becomes uniform in
    `[b * (1 - jitter), b]`, spreading devices that lost the same server."""
    stable_after: float = 10.0
    """A stream that lived this long, or got an ack, resets the backoff."""

    def delay(self, failures: int, rng: random.Random) -> float:
        base = min(self.maximum, self.initial * self.multiplier ** max(0, failures - 1))
        return base * (1 - self.jitter * rng.random())


@dataclass(frozen=True, slots=True)
class BatchAck:
    """The server's answer to one batch, as handed to `on_ack` and `results()`."""

    batch_id: str
    results: RepeatedCompositeFieldContainer[pb.ScanResult]
    """One `ScanResult` (sequence, outcome, reject_reason, decision_id) per scan, in the
    order sent. Every one is final: the scans are already gone from the buffer."""
    sent_at: float
    """Event-loop clock when the batch was written."""
    acked_at: float
    """Event-loop clock when its ack was read."""

    @property
    def latency(self) -> float:
        """Seconds from writing the batch to reading its ack."""
        return self.acked_at - self.sent_at


@dataclass(slots=True)
class DeviceStats:
    """What the client has done since it was made. Counts are scans unless named batches."""

    sent: int = 0
    """Scans written to a stream, resends included."""
    resent: int = 0
    """Scans written again after a reconnect because their ack had not arrived."""
    acked: int = 0
    """Scans acknowledged (and so removed from the buffer)."""
    outcomes: Counter[str] = field(default_factory=Counter)
    """Acknowledged scans by outcome name: ADMITTED, DENIED, REJECTED, DUPLICATE."""
    reject_reasons: Counter[str] = field(default_factory=Counter)
    """Rejected scans by reason name (MALFORMED_TOKEN, SCAN_TIME_TOO_OLD, ...)."""
    batches_sent: int = 0
    batches_acked: int = 0
    connects: int = 0
    """Streams opened (StreamSettings received)."""
    reconnects: int = 0
    """Attempts to reopen the stream after it ended with an error."""
    idle_ends: int = 0
    """Streams the server ended for idleness; the next opened with the next scan."""
    flow_control_hints: int = 0
    batch_shrinks: int = 0
    """Times a batch was refused as INVALID_ARGUMENT and the batch size cut."""

    def copy(self) -> DeviceStats:
        return dataclasses.replace(
            self, outcomes=Counter(self.outcomes), reject_reasons=Counter(self.reject_reasons)
        )


_OUTCOME_NAMES = {
    v.number: v.name.removeprefix("SCAN_OUTCOME_") for v in pb.ScanOutcome.DESCRIPTOR.values
}
_REASON_NAMES = {
    v.number: v.name.removeprefix("SCAN_REJECT_REASON_")
    for v in pb.ScanRejectReason.DESCRIPTOR.values
}


class _StreamLost(Exception):
    """The stream ended without an error status, broke the protocol, or went silent."""


class _IdleEnded(Exception):
    """The server ended the stream for idleness (OK, trailer stopcovid-stream-end: idle)."""


_STREAM_END_TRAILER = "stopcovid-stream-end"


@dataclass(slots=True)
class _InFlight:
    sequences: list[int]
    sent_at: float


@dataclass(slots=True)
class _Session:
    """The state of one open stream; a reconnect starts a new one, so everything in flight
    on a dead stream is simply forgotten and resent from the buffer."""

    call: Any
    number: int
    last_rx: float
    cursor: int = 0
    """Highest sequence written on this stream: everything at or below it is in flight or
    acknowledged, so the next batch is what the buffer holds above it."""
    in_flight: dict[str, _InFlight] = field(default_factory=dict)
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    acked_any: bool = False
    largest_batch: int = 0


def _timestamp(micros: int) -> timestamp_pb2.Timestamp:
    seconds, rest = divmod(micros, 1_000_000)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=rest * 1000)


class DeviceClient(AsyncClosing):
    """One scanner device's connection to CheckInService.

    `config` must carry the device's own certificate and key (role device): the server
    takes the device, and through it the venue, from the certificate. `buffer` belongs to
    the caller, who opens and closes it; the client only adds, reads and acks.

    Use `async with`, or `start()` and `close()`. Record scans with `scan()` or
    `scan_many()`; follow results with `on_ack` (called on the event loop for each
    acknowledged batch; keep it quick) or `async for ack in client.results()`.
    """

    def __init__(
        self,
        config: ClientConfig,
        buffer: ScanBuffer,
        *,
        on_ack: Callable[[BatchAck], object] | None = None,
        reconnect: ReconnectPolicy | None = None,
        max_scans_per_batch: int | None = None,
        keepalive_time: float | None = 30.0,
        stall_timeout: float = 60.0,
        rng: random.Random | None = None,
    ) -> None:
        """`max_scans_per_batch` caps batches below the server's own maximum;
        `keepalive_time` (seconds) makes the connection ping when idle so a silently dead
        network is noticed (applied only when `config` sets none); `stall_timeout` is how
        long batches may wait without any message from the server before the stream is
        considered dead and reopened."""
        if config.keepalive_time is None and keepalive_time is not None:
            config = dataclasses.replace(config, keepalive_time=keepalive_time)
        self._config = config
        self._buffer = buffer
        self._on_ack = on_ack
        self._reconnect = reconnect or ReconnectPolicy()
        self._cap = max_scans_per_batch
        self._stall_timeout = stall_timeout
        self._rng = rng or random.Random()  # noqa: S311 (jitter, not secrets)
        self.stats = DeviceStats()
        self.settings: pb.StreamSettings | None = None
        """The StreamSettings of the current (or last) stream."""
        self._server_max = 1000
        self._window = 1
        self._hold_until = 0.0
        self._highest_sent = 0
        self._invalid_in_a_row = 0
        self._session: _Session | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()
        self._close_requested = asyncio.Event()
        self._closing_grace = 0.0
        self._error: BaseException | None = None
        self._error_raised = False
        self._subscribers: list[asyncio.Queue[BatchAck | None]] = []

    # -- recording scans -----------------------------------------------------------------

    def scan(
        self,
        personal_token: str,
        *,
        scan_time: dt.datetime | None = None,
        direction: int = common_pb2.SCAN_DIRECTION_ENTRY,
    ) -> int:
        """Record a scan durably and queue it for sending; return its sequence number.
        `scan_time` defaults to now (the device's clock)."""
        return self.scan_many([(personal_token, scan_time or dt.datetime.now(dt.UTC), direction)])[
            0
        ]

    def scan_many(self, scans: Iterable[tuple[str, dt.datetime, int]]) -> list[int]:
        """Record (token, scan_time, direction) scans in one buffer transaction."""
        self._raise_if_failed()
        numbers = self._buffer.add_many(scans)
        self._wake.set()
        return numbers

    def notify(self) -> None:
        """Tell the client the buffer grew behind its back (scans added to the buffer
        directly), so it sends them now rather than on its next wake-up."""
        self._wake.set()

    # -- observing -----------------------------------------------------------------------

    async def results(self) -> AsyncIterator[BatchAck]:
        """Every batch acknowledged from now on, until the client closes."""
        queue: asyncio.Queue[BatchAck | None] = asyncio.Queue()
        self._subscribers.append(queue)
        try:
            while (item := await queue.get()) is not None:
                yield item
        finally:
            self._subscribers.remove(queue)

    @property
    def buffered(self) -> int:
        """Scans in the buffer: not yet acknowledged."""
        return len(self._buffer)

    @property
    def in_flight_batches(self) -> int:
        return 0 if self._session is None else len(self._session.in_flight)

    @property
    def error(self) -> BaseException | None:
        """The fatal error that stopped the client, if any."""
        return self._error

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Start streaming in the background (idempotent)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="device-stream")

    async def drain(self) -> None:
        """Wait until every buffered scan is acknowledged (bound it with
        `asyncio.timeout`). Raises the fatal error if the client stops on one."""
        await self.start()
        while True:
            self._raise_if_failed()
            if len(self._buffer) == 0:
                return
            if self._task is not None and self._task.done():
                raise RuntimeError("the device client is closed")
            self._progress.clear()
            await self._progress.wait()

    async def close(self, grace: float = 2.0) -> None:
        """Stop: send nothing more, give batches in flight `grace` seconds to be
        acknowledged, then end the stream. What is still unacknowledged stays in the
        buffer for the next run. Raises a fatal error the caller has not yet seen."""
        if self._task is not None:
            self._closing_grace = grace
            self._close_requested.set()
            self._wake.set()
            try:
                await asyncio.wait_for(asyncio.shield(self._task), grace + 2.0)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            except Exception:  # noqa: S110 (the run task's own failure is kept in _error)
                pass
        for queue in self._subscribers:
            queue.put_nowait(None)
        if self._error is not None and not self._error_raised:
            self._raise_if_failed()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    def _raise_if_failed(self) -> None:
        if self._error is not None and not self._error_raised:
            self._error_raised = True
            raise self._error
        if self._error is not None:
            raise RuntimeError("the device client stopped") from self._error

    # -- the connection loop -------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        number = 0
        client: AsyncCheckInClient | None = None
        try:
            while not self._close_requested.is_set():
                number += 1
                opened = loop.time()
                if client is None:
                    client = AsyncCheckInClient(self._config)
                try:
                    await self._stream(number, client)
                    if self._close_requested.is_set():
                        break
                    log.info("device_stream_ended")
                except _IdleEnded:
                    # Not a failure: the connection stays, and the next stream opens
                    # on it once there is something to send.
                    self._session = None
                    self.stats.idle_ends += 1
                    failures = 0
                    log.info("device_stream_idle_ended")
                    await self._until_pending()
                    continue
                except _FATAL as err:
                    log.error("device_stream_refused code=%s reason=%s", err.code.name, err.reason)
                    raise
                except InvalidArgument as err:
                    self._shrink(err)
                except (StopCovidError, _StreamLost, grpc.RpcError, OSError) as err:
                    # OSError includes TimeoutError (no StreamSettings in time).
                    log.info("device_stream_lost error=%s", err)
                # A channel that lost its server may sit in gRPC's own reconnect
                # backoff (up to minutes), which would override this client's.
                await client.close(None)
                client = None
                session, self._session = self._session, None
                if session is not None and (
                    session.acked_any or loop.time() - opened >= self._reconnect.stable_after
                ):
                    failures = 0
                failures += 1
                delay = self._reconnect.delay(failures, self._rng)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._close_requested.wait(), delay)
                if not self._close_requested.is_set():
                    self.stats.reconnects += 1
        except BaseException as err:
            if not isinstance(err, asyncio.CancelledError):
                self._error = err
            raise
        finally:
            self._session = None
            if client is not None:
                await client.close(None)
            self._progress.set()

    async def _until_pending(self) -> None:
        """Wait until the buffer holds a scan to send, or the client is closing."""
        while len(self._buffer) == 0 and not self._close_requested.is_set():
            self._wake.clear()
            await self._wake.wait()

    def _shrink(self, err: InvalidArgument) -> None:
        """The server refused a batch as malformed or too large: cut the batch size to the
        server's maximum and halve it on each refusal in a row, then retry."""
        self._invalid_in_a_row += 1
        if self._invalid_in_a_row >= _MAX_INVALID_ARGUMENT:
            raise err
        last = self._session.largest_batch if self._session else self._server_max
        self._cap = max(1, min(self._server_max, last // 2 or 1))
        self.stats.batch_shrinks += 1
        log.warning(
            "device_batch_refused reason=%s metadata=%s new_batch_limit=%d",
            err.reason,
            err.metadata,
            self._cap,
        )

    async def _stream(self, number: int, client: AsyncCheckInClient) -> None:
        """One stream on `client`'s channel, from StreamSettings until it ends; returns
        normally only when the client is closing, else raises why it ended."""
        loop = asyncio.get_running_loop()
        self._session = None
        call: Any = None
        try:
            call = client.rpc.StreamScans()
            first = await asyncio.wait_for(call.read(), self._stall_timeout)
            if first is grpc.aio.EOF or first.WhichOneof("kind") != "settings":
                raise _StreamLost("the stream did not start with StreamSettings")
            self._apply_settings(first.settings)
            session = _Session(call=call, number=number, last_rx=loop.time())
            self._session = session
            self.stats.connects += 1
            reader = asyncio.create_task(self._read(session))
            writer = asyncio.create_task(self._write(session))
            try:
                done, _ = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (reader, writer):
                    task.cancel()
                for task in (reader, writer):
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            # Propagate the reader's error by preference: it carries the call's status.
            for task in (reader, writer):
                failure = task.exception() if task in done else None
                if failure is not None:
                    raise failure
        finally:
            if call is not None:
                call.cancel()

    def _apply_settings(self, settings: pb.StreamSettings) -> None:
        self.settings = settings
        self._server_max = settings.max_scans_per_batch or 1000
        self._window = max(1, settings.max_in_flight_batches)
        self._hold_until = 0.0
        self._buffer.raise_floor(settings.last_stored_sequence)

    def _batch_limit(self) -> int:
        return max(1, min(self._server_max, self._cap or self._server_max))

    async def _write(self, s: _Session) -> None:
        """Send pending scans while the window has room; finish when closing."""
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            now = loop.time()
            if self._close_requested.is_set():
                await self._finish(s)
                return
            if s.in_flight and now - s.last_rx > self._stall_timeout:
                raise _StreamLost(f"no answer for {self._stall_timeout:.0f} s")
            timeout: float | None = None
            if now < self._hold_until:
                timeout = self._hold_until - now
            elif len(s.in_flight) < self._window:
                batch = self._buffer.pending(self._batch_limit(), after=s.cursor)
                if batch:
                    await self._send(s, batch, now)
                    continue
            if s.in_flight:
                stall_check = max(0.05, s.last_rx + self._stall_timeout - now)
                timeout = stall_check if timeout is None else min(timeout, stall_check)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def _send(self, s: _Session, batch: list[BufferedScan], now: float) -> None:
        batch_id = f"{s.number}-{next(s.ids)}"
        sequences = [b.sequence for b in batch]
        request = pb.StreamScansRequest(
            batch=pb.ScanBatch(
                batch_id=batch_id,
                scans=[
                    pb.Scan(
                        sequence=b.sequence,
                        personal_token=b.token,
                        scan_time=_timestamp(b.scan_time_us),
                        direction=b.direction,  # type: ignore[arg-type]
                    )
                    for b in batch
                ],
            )
        )
        s.in_flight[batch_id] = _InFlight(sequences, now)
        s.cursor = sequences[-1]
        s.largest_batch = max(s.largest_batch, len(sequences))
        if sequences[0] <= self._highest_sent:
            self.stats.resent += sum(1 for q in sequences if q <= self._highest_sent)
        self._highest_sent = max(self._highest_sent, sequences[-1])
        self.stats.sent += len(sequences)
        self.stats.batches_sent += 1
        try:
            await s.call.write(request)
        except asyncio.InvalidStateError as err:
            # grpc.aio refuses writes once the call has ended; the reader reports why.
            raise _StreamLost("the stream ended") from err

    async def _finish(self, s: _Session) -> None:
        """On close: let batches in flight be acknowledged within the grace period."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._closing_grace
        while s.in_flight and loop.time() < deadline:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), deadline - loop.time())
        with contextlib.suppress(Exception):
            await s.call.done_writing()

    async def _read(self, s: _Session) -> None:
        loop = asyncio.get_running_loop()
        while True:
            message = await s.call.read()
            if message is grpc.aio.EOF:
                if await s.call.code() == grpc.StatusCode.OK and (
                    (_STREAM_END_TRAILER, "idle") in tuple(await s.call.trailing_metadata() or ())
                ):
                    raise _IdleEnded
                raise _StreamLost("the server closed the stream")
            s.last_rx = loop.time()
            kind = message.WhichOneof("kind")
            if kind == "ack":
                self._on_batch_ack(s, message.ack, s.last_rx)
            elif kind == "flow_control":
                self._on_flow_control(message.flow_control, s.last_rx)
            elif kind == "settings":
                self._apply_settings(message.settings)
            self._wake.set()

    def _on_flow_control(self, hint: pb.FlowControlHint, now: float) -> None:
        self.stats.flow_control_hints += 1
        if hint.max_in_flight_batches > 0:
            self._window = hint.max_in_flight_batches
        wait = hint.retry_after.ToTimedelta().total_seconds()
        self._hold_until = max(self._hold_until, now + wait)
        log.debug("device_flow_control window=%d retry_after=%.3f", self._window, wait)

    def _on_batch_ack(self, s: _Session, ack: pb.ScanBatchAck, now: float) -> None:
        sent = s.in_flight.get(ack.batch_id)
        if sent is None:
            log.warning("device_ack_for_unknown_batch batch_id=%s", ack.batch_id[:64])
            return
        if [r.sequence for r in ack.results] != sent.sequences:
            # Deleting by a garbled ack could lose scans; reconnecting resends them instead.
            raise _StreamLost(f"ack of batch {ack.batch_id} does not match the batch sent")
        del s.in_flight[ack.batch_id]
        self._buffer.ack(sent.sequences)
        s.acked_any = True
        self._invalid_in_a_row = 0
        stats = self.stats
        stats.acked += len(sent.sequences)
        stats.batches_acked += 1
        outcomes = stats.outcomes
        for result in ack.results:
            outcomes[_OUTCOME_NAMES.get(result.outcome, str(result.outcome))] += 1
            if result.outcome == pb.SCAN_OUTCOME_REJECTED:
                reason = _REASON_NAMES.get(result.reject_reason, str(result.reject_reason))
                stats.reject_reasons[reason] += 1
                if result.reject_reason == pb.SCAN_REJECT_REASON_SEQUENCE_REUSED:
                    log.warning("device_sequence_reused sequence=%d", result.sequence)
        self._progress.set()
        if self._on_ack is None and not self._subscribers:
            return
        event = BatchAck(ack.batch_id, ack.results, sent.sent_at, now)
        if self._on_ack is not None:
            try:
                self._on_ack(event)
            except Exception:
                log.exception("device_on_ack_failed")
        for queue in self._subscribers:
            queue.put_nowait(event)
