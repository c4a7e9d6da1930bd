"""StreamScans: a device's check-in stream.

    reader task            per batch: decide every scan in memory (scans.py),
                           then hand the stored rows to the group committer
    commit tasks           wait for the group commit (commit.py), then queue the ack
    the handler itself     writes acks as they become durable, in that order

A batch is acknowledged only after its rows are committed, and after every
earlier batch of the stream was acknowledged: an ack says everything before it
is durable too, so a DUPLICATE answer never refers to a scan still in flight.
The reader refuses a device that keeps more than the window of batches
unacknowledged, and when the workers fall behind (inbox lag), commits are
delayed before they start, so acks slow, the device's window fills and it stops
sending: memory stays bounded by streams x window x batch size. A device that
sends but does not read is ended (SLOW_READER) when its unsent acks pass a byte
budget or one write waits too long, whichever comes first. Before that, what a
stream holds (batches in flight as received, plus unsent acks) is bounded in
bytes: at the bound the reader reads nothing more until an ack goes out, so the
device is held back by gRPC's flow control rather than in this server's memory.
A stream that holds nothing and receives nothing for STOPCOVID_STREAM_IDLE_S is
ended with OK (trailer stopcovid-stream-end: idle): a quiet door then costs the
server its connection only, and the device opens a new stream when it has scans.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator
from typing import Any

from opentelemetry.trace import Span
from stopcovid.checkin.v1 import checkin_service_pb2 as pb

from services.checkin.base import (
    _WAKE,
    CheckInBase,
    Q,
    _End,
    _Stream,
    duration,
    fingerprints,
    log,
    stream_superseded,
)
from services.checkin.commit import CommitFailed, Superseded
from services.checkin.scans import Entries, Ledger, us_to_datetime
from services.kernel import errors, metrics, tracing
from services.kernel.db import one
from services.kernel.rpc import Context, timestamp

ENDED_OK = "OK"
"""How a stream that ended without an error counts in metrics.STREAM_ENDINGS."""
ENDED_IDLE = "IDLE"
"""How a stream the server ended for idleness (STOPCOVID_STREAM_IDLE_S) counts there."""
STREAM_END_TRAILER = "stopcovid-stream-end"
"""Trailing metadata of a stream the server ended with OK: why ("idle")."""
_BATCH_SCANS = metrics.BATCH_SCANS
_ACK_SECONDS = metrics.ACK_SECONDS


class StreamRpcs(CheckInBase):
    # -- StreamScans -----------------------------------------------------------

    # Acks are written with context.write; the generated base declares an iterator.
    async def StreamScans(  # type: ignore[override]
        self, request_iterator: AsyncIterator[pb.StreamScansRequest], context: Context
    ) -> None:
        if self._draining:
            raise errors.Unavailable("the server is shutting down; reconnect")
        device = await self._device_of_caller()
        venue = await self.caches.venue(device.venue_id)
        # One connection for both statements (each still its own transaction, the
        # high water read after the epoch is taken): an acquire and release of the
        # pool costs a round trip of its own (the connection's reset).
        async with self._pool.acquire() as conn:
            epoch = int(await conn.fetchval(Q["take_device"], device.device_id))
            self._supersede(device.device_id, epoch)
            water = one(await conn.fetchrow(Q["device_high_water"], device.device_id))
        high_water = int(water["high_water"] or 0)
        settings = self._settings
        stream = _Stream(
            device,
            settings.max_in_flight_batches,
            epoch,
            Ledger(high_water, int(water["retired_through"])),
        )
        self._streams.setdefault(device.device_id, set()).add(stream)
        self._idle.clear()
        log.info("stream_opened", venue_known=venue is not None)
        try:
            await context.write(
                pb.StreamScansResponse(
                    settings=pb.StreamSettings(
                        device_id=str(device.device_id),
                        venue_id=str(device.venue_id),
                        last_stored_sequence=high_water,
                        max_scans_per_batch=settings.max_scans_per_batch,
                        max_in_flight_batches=settings.max_in_flight_batches,
                        max_scan_age=duration(settings.max_scan_age_s),
                        max_clock_skew=duration(settings.max_clock_skew_s),
                        server_time=timestamp(us_to_datetime(int(time.time() * 1e6))),
                        idle_timeout=(
                            duration(settings.stream_idle_s) if settings.stream_idle_s else None
                        ),
                    )
                )
            )
            stream.watch_idle(settings.stream_idle_s)
            await self._run_stream(stream, request_iterator, context)
            if stream.idle_ended:
                # Not an error: the device reopens on this connection when it has
                # scans (the SDK reads the trailer; any client may simply reopen).
                context.set_trailing_metadata(((STREAM_END_TRAILER, "idle"),))
                metrics.STREAM_ENDINGS.labels(ENDED_IDLE).inc()
                log.info("stream_idle_ended", idle_s=settings.stream_idle_s)
            else:
                metrics.STREAM_ENDINGS.labels(ENDED_OK).inc()
        except errors.DomainError as err:
            metrics.STREAM_ENDINGS.labels(reason=err.reason).inc()
            raise
        except BaseException as exc:
            # Cancelled by gRPC (the call ended under it), or anything unforeseen;
            # a reason the server had already given counts as that reason.
            ending = stream.end_error.reason if stream.end_error else type(exc).__name__
            metrics.STREAM_ENDINGS.labels(reason=ending).inc()
            raise
        finally:
            stream.stop_watching()
            streams = self._streams.get(device.device_id)
            if streams is not None:
                streams.discard(stream)
                if not streams:
                    del self._streams[device.device_id]
            if not self._streams:
                self._idle.set()

    async def _run_stream(
        self,
        stream: _Stream,
        requests: AsyncIterator[pb.StreamScansRequest],
        context: Context,
    ) -> None:
        commits: set[asyncio.Task[None]] = set()
        stream.reader = asyncio.create_task(self._read(stream, requests, commits))
        reader_done = False
        try:
            while not (reader_done and not commits and stream.queue.empty()):
                item = await stream.queue.get()
                if isinstance(item, _End):
                    reader_done = True
                    continue
                if isinstance(item, CommitFailed):
                    stream.end(
                        errors.Unavailable("the database is unavailable; resend unacked scans")
                    )
                    continue
                if not isinstance(item, pb.StreamScansResponse):  # _WAKE
                    continue
                if item.WhichOneof("kind") == "ack":
                    # Before the write: a device may send its next batch the moment
                    # the ack reaches it, and must find the window open.
                    stream.in_flight -= 1
                    if stream.hinted and not self.admission.lagging:
                        stream.hinted = False
                        await self._write(stream, context, self._flow_hint(stream, restore=True))
                    await self._write(stream, context, item)
                    stream.active_at = time.monotonic()
                    stream.unsent_bytes -= stream.unsent_sizes.popleft()
                    stream.release(self._settings.stream_held_bytes)
                else:
                    await self._write(stream, context, item)
        finally:
            stream.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stream.reader
        if stream.end_error is not None:
            raise stream.end_error

    async def _write(
        self, stream: _Stream, context: Context, message: pb.StreamScansResponse
    ) -> None:
        """Send one message, or end the stream if the device does not take it off the
        wire in time: gRPC holds what it cannot send, so a device that sends and
        never reads would keep its window's acks in this server's memory. (Giving
        up the write ends the call; the device, not reading, cannot be told why.)"""
        limit = self._settings.stream_write_timeout_s
        write = asyncio.ensure_future(context.write(message))
        overflow = asyncio.ensure_future(stream.overflowed.wait())
        try:
            await asyncio.wait(
                {write, overflow}, timeout=limit, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            overflow.cancel()
        if write.done() and not stream.overflowed.is_set():
            write.result()
            return
        if stream.overflowed.is_set():
            budget = self._settings.stream_buffer_bytes
            stream.end_error = errors.ResourceExhausted(
                f"the device has not read {budget} bytes of acks; read them as they come",
                reason="SLOW_READER",
                metadata={"stream_buffer_bytes": str(budget)},
            )
            log.info("stream_slow_reader", unsent_bytes=stream.unsent_bytes)
        else:
            stream.end_error = errors.ResourceExhausted(
                f"the device has not read its acks for {limit:.0f} s; read them as they come",
                reason="SLOW_READER",
                metadata={"stream_write_timeout_s": f"{limit:g}"},
            )
            log.info("stream_slow_reader", waited_s=limit)
        write.cancel()
        raise stream.end_error

    @staticmethod
    def _commit_done(
        stream: _Stream, commits: set[asyncio.Task[None]], task: asyncio.Task[None]
    ) -> None:
        """A commit task ended (acked, failed, or superseded: not every end queues
        something), so the writer loop must look again at whether it is done."""
        commits.discard(task)
        stream.queue.put_nowait(_WAKE)

    def _flow_hint(
        self, stream: _Stream, wait_s: float = 0.0, restore: bool = False
    ) -> pb.StreamScansResponse:
        """Halve the device's window while the inbox lags; `restore` gives the whole
        window back (and no wait) once it no longer does."""
        return pb.StreamScansResponse(
            flow_control=pb.FlowControlHint(
                retry_after=duration(0 if restore else wait_s),
                max_in_flight_batches=stream.window if restore else max(1, stream.window // 2),
            )
        )

    async def _read(
        self,
        stream: _Stream,
        requests: AsyncIterator[pb.StreamScansRequest],
        commits: set[asyncio.Task[None]],
    ) -> None:
        bound = self._settings.stream_held_bytes
        incoming = aiter(requests)
        try:
            while True:
                if stream.held_bytes >= bound:
                    # Read on only once an ack went out: until then gRPC's flow
                    # control holds the device's next batches on its side.
                    stream.room.clear()
                    metrics.STREAM_HOLDS.inc()
                    await stream.room.wait()
                try:
                    request = await anext(incoming)
                except StopAsyncIteration:
                    break
                await self._take(stream, request, commits)
                # The batch is decided and handed on: hold no reference to it here
                # while waiting for room (its message is most of what it weighs).
                del request
        except errors.DomainError as err:
            stream.end_error = stream.end_error or err
        except asyncio.CancelledError:
            pass  # end() was called; end_error says why
        finally:
            stream.queue.put_nowait(_End(stream.end_error))

    async def _take(
        self,
        stream: _Stream,
        request: pb.StreamScansRequest,
        commits: set[asyncio.Task[None]],
    ) -> None:
        """Check and decide one batch, and start the task that commits and acks it."""
        max_scans = self._settings.max_scans_per_batch
        if not request.HasField("batch"):
            raise errors.InvalidArgument("each message must carry a batch", field="batch")
        batch = request.batch
        if not 1 <= len(batch.batch_id) <= 64:
            raise errors.InvalidArgument(
                "batch_id must be 1 to 64 characters", field="batch.batch_id"
            )
        if not 1 <= len(batch.scans) <= max_scans:
            raise errors.InvalidArgument(
                f"a batch must carry 1 to {max_scans} scans",
                field="scans",
                metadata={"max_scans_per_batch": str(max_scans)},
            )
        if stream.in_flight >= stream.window:
            raise errors.ResourceExhausted(
                f"more than {stream.window} batches are unacknowledged; wait for acks",
                metadata={"max_in_flight_batches": str(stream.window)},
            )
        stream.in_flight += 1
        stream.active_at = time.monotonic()
        size = request.ByteSize()
        stream.batch_bytes += size
        arrived = time.perf_counter() if metrics.enabled else 0.0
        span = tracing.tracer().start_span("checkin.scan_batch") if tracing.enabled else None
        scans = batch.scans
        ledger = stream.ledger
        # The ack first, so that the results are made in it, not copied into it.
        ack = pb.StreamScansResponse()
        ack.ack.batch_id = batch.batch_id
        ack.ack.highest_sequence = max(s.sequence for s in scans)
        with ledger.deciding():  # what the lookup skips as held stays held
            lookup = ledger.needs_lookup(scans)
            if lookup:
                found = await self._pool.fetch(Q["stored_scans"], stream.device.device_id, lookup)
                ledger.recalled(fingerprints(found))
            venue = await self.caches.venue(stream.device.venue_id)
            _, rows, entries = self.decider.decide(
                scans, venue, stream.device.device_id, ledger, results=ack.ack.results
            )
        if metrics.enabled:
            _BATCH_SCANS.observe(len(scans))
        if span is not None:
            span.set_attributes({"stopcovid.scans": len(scans), "stopcovid.rows": len(rows)})
        previous, mine = stream.last_acked, asyncio.get_running_loop().create_future()
        stream.last_acked = mine
        task = asyncio.create_task(
            self._commit_then_ack(
                stream,
                rows=rows,
                ack=ack,
                entries=entries,
                previous=previous,
                mine=mine,
                batch_bytes=size,
                arrived=arrived,
                span=span,
            )
        )
        commits.add(task)
        task.add_done_callback(functools.partial(self._commit_done, stream, commits))

    async def _commit_then_ack(
        self,
        stream: _Stream,
        *,
        rows: list[Any],
        ack: pb.StreamScansResponse,
        entries: Entries | None,
        previous: asyncio.Future[bool],
        mine: asyncio.Future[bool],
        batch_bytes: int = 0,
        arrived: float = 0.0,
        span: Span | None = None,
    ) -> None:
        """Commit a batch's rows, then queue its ack once every earlier batch's is;
        resolve `mine` with whether it was (later batches wait on it). The batch's
        `batch_bytes` (its size) are held until then, its ack's from then until sent."""
        acked = False
        try:
            if self.admission.lagging and rows:
                # Tell the device first (at most once a second), then hold the batch
                # until the inbox drains enough to admit it.
                if time.monotonic() >= stream.hint_quiet_until:
                    stream.hint_quiet_until = time.monotonic() + 1.0
                    stream.hinted = True
                    wait = self.admission.expected_wait(len(rows))
                    stream.queue.put_nowait(self._flow_hint(stream, wait))
                waited = await self.admission.admit(len(rows))
                metrics.ADMISSION_WAIT.inc(waited)
            try:
                await self.committer.submit(
                    rows,
                    stream.device.device_id,
                    stream.epoch,
                    trace=None if span is None else span.get_span_context(),
                )
            except CommitFailed as failed:
                stream.queue.put_nowait(failed)
                return
            except Superseded:
                stream.end(stream_superseded())
                return
            if entries is not None:
                stream.ledger.settle(entries)
            if await previous:
                size = ack.ByteSize()
                stream.unsent_sizes.append(size)
                stream.queue.put_nowait(ack)
                acked = True
                stream.unsent_bytes += size
                if stream.unsent_bytes > self._settings.stream_buffer_bytes:
                    # The device is not reading: end now rather than hold more of
                    # its acks (they are durable; it resends and hears DUPLICATE).
                    stream.overflowed.set()
                if arrived:
                    _ACK_SECONDS.observe(time.perf_counter() - arrived)
        finally:
            stream.batch_bytes -= batch_bytes
            stream.release(self._settings.stream_held_bytes)
            if not mine.done():
                mine.set_result(acked)
            if span is not None:
                span.set_attribute("stopcovid.acked", acked)
                span.end()
