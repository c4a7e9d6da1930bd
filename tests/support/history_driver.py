"""The devices of a randomized exactly-once history (tests/test_history.py,
tests/test_failover.py): each misbehaves on purpose through real CheckIn servers
(reconnects at random, a second stream while the first is open, resends, reused
numbers with other content, on other UTC days too, a scan repeated inside one
batch, streams dropped with acks pending, unary calls mixed in) and records every
scan sent and every answer in a `History` (tests/support/history.py); and the
store read back, decrypted, to be checked against it."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc.aio
import stopcovid.client as clients
from google.protobuf import timestamp_pb2
from stopcovid.checkin.v1 import checkin_service_pb2 as pb
from stopcovid.client import ClientConfig, RetryPolicy

from services.kernel.keys import open_keystore, row_aad
from tests.support.database import Query
from tests.support.history import (
    ADMITTED,
    DENIED,
    DUPLICATE,
    REJECTED,
    Content,
    History,
    Key,
)
from tests.support.servers import Pki

WINDOW = 4
"""Batches a device keeps unacknowledged (the server allows 8)."""

_OUTCOMES = {
    pb.SCAN_OUTCOME_ADMITTED: ADMITTED,
    pb.SCAN_OUTCOME_DENIED: DENIED,
    pb.SCAN_OUTCOME_DUPLICATE: DUPLICATE,
    pb.SCAN_OUTCOME_REJECTED: REJECTED,
}
Scanned = tuple[int, Content]
"""(sequence number, content) of one scan sent."""

_US = 1_000_000
_DAY_US = 86_400 * _US


def _reason(value: int) -> str:
    if not value:
        return ""
    return pb.ScanRejectReason.Name(value).removeprefix("SCAN_REJECT_REASON_")  # type: ignore[arg-type]


def _timestamp(us: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=us // _US, nanos=(us % _US) * 1000)


@dataclass
class Device:
    device_id: str
    rng: random.Random
    next_sequence: int = 1
    contents: dict[int, list[Content]] = field(default_factory=dict)
    """Every content sent under each number, the first one first."""
    unanswered: dict[tuple[int, Content], None] = field(default_factory=dict)
    """Scans sent that no answer has covered yet, in the order sent."""
    streams: int = 0


class Run:
    """The devices, the servers they reach, and what happened."""

    def __init__(
        self, pki: Pki, ports: list[int], tokens: dict[str, str], seed: int, history: History
    ) -> None:
        self.pki = pki
        self.ports = ports
        self.tokens = tokens  # person id -> static token
        self.people = sorted(tokens)
        self.seed = seed
        self.history = history

    balanced = False
    """Every call through one target over all the servers, balanced round robin
    (as the device SDK does), instead of the server `port` a call names."""

    def client(self, device: Device, port: int) -> clients.AsyncCheckInClient:
        target = f"localhost:{port}"
        if self.balanced:
            target = ",".join(f"localhost:{p}" for p in self.ports)
        config = replace(
            ClientConfig.from_pki_dir(target, self.pki.dir, device.device_id),
            retry=RetryPolicy(max_attempts=1),
        )
        return clients.AsyncCheckInClient(config)

    # -- what a device sends -----------------------------------------------------

    def _content(self, rng: random.Random, avoid: list[Content] | None = None) -> Content:
        """A scan's content; days back as well, so numbers meet other UTC days."""
        while True:
            back = rng.choice([0, 0, 0, 3600 * _US, _DAY_US, 2 * _DAY_US])
            at = time.time_ns() // 1000 - back - rng.randrange(60 * _US)
            direction = 1 if rng.random() < 0.7 else 2
            content = Content(rng.choice(self.people), at, direction)
            if not avoid or content not in avoid:
                return content

    @staticmethod
    def _used(device: Device) -> int:
        """A number the device used: mostly a recent one, which another stream of the
        device may be sending at this moment, where a race would show."""
        rng = device.rng
        if rng.random() < 0.6:
            return rng.randrange(max(1, device.next_sequence - 64), device.next_sequence)
        return rng.randrange(1, device.next_sequence)

    def next_batch(self, device: Device) -> list[Scanned]:
        rng = device.rng
        scans: list[Scanned] = []
        for _ in range(rng.randint(1, 12)):
            roll = rng.random()
            if roll < 0.12 and device.contents:  # a resend: the same scan again
                if device.unanswered and rng.random() < 0.5:
                    scan = rng.choice(list(device.unanswered))
                else:
                    sequence = self._used(device)
                    scan = (sequence, rng.choice(device.contents[sequence]))
            elif roll < 0.2 and device.contents:  # a reused number, other content
                sequence = self._used(device)
                scan = (sequence, self._content(rng, device.contents[sequence]))
            elif roll < 0.24 and scans:  # the same scan twice in one batch
                scan = scans[-1]
            else:
                scan = (device.next_sequence, self._content(rng))
                device.next_sequence += 1
            sequence, content = scan
            known = device.contents.setdefault(sequence, [])
            if content not in known:
                known.append(content)
            device.unanswered[scan] = None
            self.history.send(device.device_id, sequence, content)
            scans.append(scan)
        return scans

    def _scan(self, sequence: int, content: Content) -> pb.Scan:
        return pb.Scan(
            sequence=sequence,
            personal_token=self.tokens[content.person],
            scan_time=_timestamp(content.scan_us),
            direction=content.direction,  # type: ignore[arg-type]
        )

    def record(
        self,
        device: Device,
        scans: list[Scanned],
        results: list[pb.ScanResult],
        via: str,
    ) -> None:
        assert [r.sequence for r in results] == [s for s, _ in scans], "results out of order"
        for (sequence, content), result in zip(scans, results, strict=True):
            self.history.answer(
                device.device_id,
                sequence,
                content,
                outcome=_OUTCOMES[result.outcome],
                reason=_reason(result.reject_reason),
                via=via,
            )
            device.unanswered.pop((sequence, content), None)

    # -- streams and calls -------------------------------------------------------

    async def stream(
        self,
        device: Device,
        port: int,
        until: float,
        batches: Callable[[], list[Scanned]],
    ) -> None:
        """One StreamScans call: send batches until `until` (or until `batches` has
        none), keeping WINDOW unacknowledged, sometimes walking away mid-flight."""
        device.streams += 1
        via = f"{device.device_id[:8]}/stream-{device.streams}@{port}"
        pending: dict[str, list[Scanned]] = {}
        room = asyncio.Semaphore(WINDOW)
        events = self.history.events
        async with self.client(device, port) as client:
            call = client.rpc.StreamScans(timeout=max(0.0, until - time.monotonic()) + 15)

            async def read() -> None:
                while True:
                    message = await call.read()
                    if message is grpc.aio.EOF:
                        return
                    assert isinstance(message, pb.StreamScansResponse)
                    if message.WhichOneof("kind") == "ack":
                        scans = pending.pop(message.ack.batch_id)
                        self.record(device, scans, list(message.ack.results), via)
                        room.release()

            reader: asyncio.Task[None] | None = None
            try:
                first = await call.read()
                assert isinstance(first, pb.StreamScansResponse)
                assert first.WhichOneof("kind") == "settings"
                reader = asyncio.create_task(read())
                number = 0
                while time.monotonic() < until and not reader.done():
                    if device.rng.random() < 0.01:
                        events["streams_abandoned"] += 1
                        call.cancel()
                        break
                    slot = asyncio.ensure_future(room.acquire())
                    await asyncio.wait({slot, reader}, return_when=asyncio.FIRST_COMPLETED)
                    if not slot.done():  # the stream ended while the window was full
                        slot.cancel()
                        break
                    scans = batches()
                    if not scans:
                        break
                    number += 1
                    batch_id = f"b{number}"
                    pending[batch_id] = scans
                    await call.write(
                        pb.StreamScansRequest(
                            batch=pb.ScanBatch(
                                batch_id=batch_id, scans=[self._scan(*s) for s in scans]
                            )
                        )
                    )
                if not call.cancelled():
                    if not reader.done():
                        await call.done_writing()
                    await reader
            except clients.Aborted as err:
                events[f"stream_ended_{err.reason}"] += 1
            except (clients.StopCovidError, asyncio.InvalidStateError) as err:
                events[f"stream_ended_{type(err).__name__}"] += 1
            finally:
                if reader is not None:
                    reader.cancel()
                    with contextlib.suppress(BaseException):
                        await reader

    async def unary(self, device: Device, port: int) -> None:
        scans = self.next_batch(device)[:1]
        async with self.client(device, port) as client:
            try:
                reply = await client.rpc.CheckIn(
                    pb.CheckInRequest(scan=self._scan(*scans[0])), timeout=15
                )
            except clients.StopCovidError as err:
                self.history.events[f"unary_failed_{type(err).__name__}"] += 1
                return
        self.record(device, scans, [reply.result], f"{device.device_id[:8]}/unary@{port}")

    async def misbehave(self, device: Device, until: float) -> None:
        """The device's life until `until`: streams on random servers, sometimes two
        at once, sometimes a unary call."""
        rng = device.rng
        tasks: set[asyncio.Task[None]] = set()
        while time.monotonic() < until:
            port = rng.choice(self.ports)
            roll = rng.random()
            if roll < 0.05:
                await self.unary(device, port)
                continue
            end = min(until, time.monotonic() + rng.uniform(0.5, 6))
            task = asyncio.create_task(
                self.stream(device, port, end, functools.partial(self.next_batch, device))
            )
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            if roll < 0.2:  # a reconnect that arrives while the old stream is open
                await asyncio.sleep(rng.uniform(0, 1))
                self.history.events["concurrent_streams"] += 1
                continue
            await asyncio.wait({task})
        await asyncio.gather(*tasks, return_exceptions=True)

    async def resend_unanswered(self, device: Device, deadline: float) -> None:
        """What a real device does after the storm: resend every scan that has no
        answer, the same scan under the same number, until each has one."""
        while device.unanswered and time.monotonic() < deadline:
            port = device.rng.choice(self.ports)
            left = list(device.unanswered)

            def take(left: list[Scanned] = left) -> list[Scanned]:
                batch, left[:] = left[:20], left[20:]
                return batch

            await self.stream(device, port, deadline, take)
        assert not device.unanswered, f"{device.device_id}: scans never answered (seed {self.seed})"


def stored_scans(settings_keystore: Path, secrets: Path, query: Query) -> list[tuple[Key, Content]]:
    """Every device scan in the store, as (device, sequence) and decrypted content."""
    keys = open_keystore(settings_keystore, secrets)
    rows = query(
        "SELECT day, venue_id, device_id, sequence, scan_time, direction, person_enc"
        " FROM checkins WHERE device_id IS NOT NULL"
    )
    stored = []
    for row in rows:
        aad = row_aad(row["venue_id"].bytes, row["device_id"].bytes, row["sequence"], row["day"])
        person = keys.day_key(row["day"]).decrypt(row["person_enc"], aad)
        at = row["scan_time"]
        scan_us = (at - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1)
        direction = 1 if row["direction"] == "entry" else 2
        stored.append(
            (
                (str(row["device_id"]), row["sequence"]),
                Content(str(uuid.UUID(bytes=person)), scan_us, direction),
            )
        )
    return stored
