"""The check-in benchmark: acknowledged-durable scans per second, end to end.

    .venv/bin/python -m bench.checkin [--duration 60] [--devices 20] [--quick] [--json out.json]

One run, on this machine, in a private temporary Postgres:

1. ceiling "raw COPY": pre-made rows COPY'd straight into the partitioned `checkins`
   table (dedupe index and all) as the migrator; no gRPC, no crypto, no inbox. The
   rows are shaped like the server's (a 16-byte pseudonym per person of --people,
   one exit in four), so the trace's indexes grow as under the real load;
2. ceiling "raw gRPC": an in-bench grpc.aio server (mutual TLS, like the real one)
   that acks every batch at once with per-scan ADMITTED results; no database;
3. the naive design: one unary `CheckIn` RPC per scan against a CheckIn server
   started with STOPCOVID_COMMIT_MAX_ROWS=1 (one commit per scan);
4. the real thing, closed loop: simulated devices stream 1000-scan batches through
   the CheckIn server process, Postgres and one worker process, as fast as the
   window (StreamSettings.max_in_flight_batches) lets them;
5. the real thing, open loop at half the rate of 4, for the ack latency figure.

`--metrics-cost` runs instead the closed loop of 4 in rounds, each once with the
CheckIn server's metrics off (STOPCOVID_METRICS=off) and once on, alternating, and
reports the ratio of the mean rates (on / off): what metrics cost the hot path.

Load generators run in their own processes (they must not share the server's GIL)
and send pre-encoded requests, so that their cost stays small; their CPU share is
printed. Ack latency is measured per batch, from send (open loop: from the time the
batch was due, so a stalled server cannot hide its stall) to the arrival of its ack.
Only ADMITTED and DENIED results count as acknowledged scans.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import multiprocessing as mp
import operator
import os
import queue as queue_mod
import secrets
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from cryptography import x509
from stopcovid.checkin.v1 import checkin_service_pb2 as pb
from stopcovid.common.v1 import common_pb2

from bench import events
from bench.common import PrivateDatabase, clean_environment
from services.domain.checkins.inbox import COLUMNS as INBOX_COLUMNS
from services.domain.people.tokens import PersonalTokens
from services.kernel import db
from services.kernel.pki import Authority
from services.ops import setup
from services.ops.harness import Child

SERVICE = "stopcovid.checkin.v1.CheckInService"
STREAM_METHOD = f"/{SERVICE}/StreamScans"
UNARY_METHOD = f"/{SERVICE}/CheckIn"
MAX_MESSAGE = 16 * 1024 * 1024
COUNTED = ("ADMITTED", "DENIED")

# Settings that would point the benchmark at someone else's database, keys or ports.


# --------------------------------------------------------------------------- encoding
#
# Requests are written as protobuf wire bytes by hand: building a 1000-scan message
# with the protobuf library costs the generator more than the wire format needs.
# `Encoder.self_check` proves the bytes parse to the intended message.


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: int, payload: bytes) -> bytes:
    return bytes([tag]) + _varint(len(payload)) + payload


_ENTRY = b"\x20" + _varint(common_pb2.SCAN_DIRECTION_ENTRY)
_EXIT = b"\x20" + _varint(common_pb2.SCAN_DIRECTION_EXIT)


class Encoder:
    def __init__(self, tokens: Sequence[str]) -> None:
        self.tokens = list(tokens)
        self._frags = [_field(0x12, t.encode()) for t in tokens]

    @staticmethod
    def timestamp(now: float) -> bytes:
        seconds = int(now)
        nanos = int((now - seconds) * 1e9)
        inner = b"\x08" + _varint(seconds) + (b"\x10" + _varint(nanos) if nanos else b"")
        return _field(0x1A, inner)

    def scan(self, sequence: int, token: int, ts: bytes) -> bytes:
        # Scan{sequence=1, personal_token=2, scan_time=3, direction=4}; one exit in four.
        direction = _EXIT if sequence & 3 == 0 else _ENTRY
        frag = self._frags[token % len(self._frags)]
        return b"\x08" + _varint(sequence) + frag + ts + direction

    def batch(self, batch_id: str, first: int, count: int, token: int, now: float) -> bytes:
        ts = self.timestamp(now)
        parts = [_field(0x0A, batch_id.encode())]
        parts += [_field(0x12, self.scan(first + i, token + i, ts)) for i in range(count)]
        # StreamScansRequest{batch=1{batch_id=1, scans=2}}
        return _field(0x0A, b"".join(parts))

    def checkin(self, sequence: int, token: int, now: float) -> bytes:
        return _field(0x0A, self.scan(sequence, token, self.timestamp(now)))  # CheckInRequest

    def self_check(self) -> None:
        now = time.time()
        got = pb.StreamScansRequest.FromString(self.batch("b-1", 7, 3, 5, now))
        assert got.batch.batch_id == "b-1", got
        assert [s.sequence for s in got.batch.scans] == [7, 8, 9], got
        for i, s in enumerate(got.batch.scans):
            assert s.personal_token == self.tokens[(5 + i) % len(self.tokens)]
            assert abs(s.scan_time.ToNanoseconds() / 1e9 - now) < 1e-3
        assert got.batch.scans[1].direction == common_pb2.SCAN_DIRECTION_EXIT
        assert got.batch.scans[0].direction == common_pb2.SCAN_DIRECTION_ENTRY
        one = pb.CheckInRequest.FromString(self.checkin(12, 0, now))
        assert one.scan.sequence == 12 and one.scan.personal_token == self.tokens[0], one


_OUTCOME = operator.attrgetter("outcome")
_ADMITTED = pb.SCAN_OUTCOME_ADMITTED
_DENIED = pb.SCAN_OUTCOME_DENIED


def _outcome_name(outcome: int) -> str:
    return pb.ScanOutcome.Name(outcome).removeprefix("SCAN_OUTCOME_")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- /proc


def _proc_fields(pid: int, path: str) -> dict[str, int]:
    """`Name:  123 kB` lines of /proc/<pid>/{status,smaps_rollup}, in kB."""
    found: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/{path}").read_text()
    except OSError:
        return found
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            found[name] = int(parts[0])
    return found


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()  # fields from 3 (state) on


def _children(parent: int) -> list[int]:
    kids: list[int] = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None and int(stat[1]) == parent:
                kids.append(int(entry.name))
    return kids


_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int, with_reaped_children: bool = False) -> float:
    stat = _stat(pid)
    if stat is None:
        return 0.0
    ticks = int(stat[11]) + int(stat[12])  # utime, stime
    if with_reaped_children:
        ticks += int(stat[13]) + int(stat[14])  # cutime, cstime
    return ticks / _TICK


@dataclass
class Watched:
    """A process (or, for Postgres, a postmaster and its children) whose memory we follow."""

    name: str
    pid: int
    tree: bool = False  # Postgres: sum PSS over the postmaster and its children
    # (monotonic, kB, private kB): RSS for one process; for a tree PSS and the private part
    samples: list[tuple[float, int, int]] = field(default_factory=list)

    def pids(self) -> list[int]:
        return [self.pid, *_children(self.pid)] if self.tree else [self.pid]

    def sample(self, now: float) -> None:
        if not self.tree:
            rss = _proc_fields(self.pid, "status").get("VmRSS", 0)
            self.samples.append((now, rss, rss))
            return
        # RSS would count shared_buffers once per backend; PSS splits shared pages. The
        # anonymous part (backend heaps) leaves out shared_buffers, which is shared memory
        # and fills up (to its fixed size) with use.
        pss = private = 0
        for pid in self.pids():
            fields = _proc_fields(pid, "smaps_rollup")
            pss += fields.get("Pss", 0)
            private += fields.get("Anonymous", 0)
        self.samples.append((now, pss, private))

    def peak_kb(self) -> int:
        sampled = max((kb for _, kb, _ in self.samples), default=0)
        if self.tree:
            return sampled
        return max(sampled, _proc_fields(self.pid, "status").get("VmHWM", 0))

    def cpu_seconds(self) -> float:
        if not self.tree:
            return _cpu_seconds(self.pid)
        return _cpu_seconds(self.pid, True) + sum(_cpu_seconds(p) for p in _children(self.pid))


# --------------------------------------------------------------------------- load generator


@dataclass(frozen=True)
class DeviceCred:
    device_id: str
    cert_pem: bytes
    key_pem: bytes


@dataclass(frozen=True)
class LoadSpec:
    target: str
    ca_pem: bytes
    devices: list[DeviceCred]
    tokens: list[str]
    mode: str  # "closed", "open" (streams) or "unary"
    start_at: float  # time.monotonic() (system-wide on Linux) when load begins
    warmup: float
    duration: float
    batch_size: int
    seq_base: int
    rate: float = 0.0  # open loop: scans/s for this process
    concurrency: int = 0  # unary: calls in flight for this process
    tail_timeout: float = 15.0


@dataclass
class LoadResult:
    acked: int = 0  # ADMITTED + DENIED acknowledged inside the measured window
    outcomes: Counter[str] = field(default_factory=Counter)  # every result, whole run
    latencies: list[float] = field(default_factory=list)  # seconds, inside the window
    per_second: Counter[int] = field(default_factory=Counter)  # counted scans per second
    errors: Counter[str] = field(default_factory=Counter)
    hints: int = 0  # FlowControlHints received
    sent: int = 0
    unacked: int = 0
    late_start: float = 0.0
    cpu_seconds: float = 0.0

    def merge(self, other: LoadResult) -> None:
        self.acked += other.acked
        self.outcomes.update(other.outcomes)
        self.latencies += other.latencies
        self.per_second.update(other.per_second)
        self.errors.update(other.errors)
        self.sent += other.sent
        self.hints += other.hints
        self.unacked += other.unacked
        self.late_start = max(self.late_start, other.late_start)
        self.cpu_seconds += other.cpu_seconds


class _Clock:
    def __init__(self, spec: LoadSpec) -> None:
        self.begin = spec.start_at + spec.warmup
        self.end = self.begin + spec.duration

    def record(self, result: LoadResult, now: float, counted: int, latency: float | None) -> None:
        if self.begin <= now < self.end:
            result.acked += counted
            result.per_second[int(now - self.begin)] += counted
            # A batch's latency counts when the batch itself belongs to the window
            # (sent, or due, after the warm-up): a stall during the warm-up (the
            # previous phase's aftermath) is what the warm-up is there to absorb.
            if latency is not None and now - latency >= self.begin:
                result.latencies.append(latency)


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


def _channel(spec: LoadSpec, dev: DeviceCred) -> grpc.aio.Channel:
    return device_channel(spec.target, spec.ca_pem, dev)


def device_channel(target: str, ca_pem: bytes, dev: DeviceCred) -> grpc.aio.Channel:
    """A device's own channel (and so its own TLS connection) to `target`."""
    creds = grpc.ssl_channel_credentials(ca_pem, dev.key_pem, dev.cert_pem)
    return grpc.aio.secure_channel(
        target,
        creds,
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
            # One connection per device, as in the field.
            ("grpc.use_local_subchannel_pool", 1),
        ],
    )


async def _sleep_until(moment: float) -> None:
    delay = moment - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


class _Device:
    """One simulated scanner: opens a stream, keeps its window full (closed loop) or
    sends on a schedule (open loop), and opens a new stream when one fails. Batches
    unacknowledged on a failed stream are counted as unacked, not resent."""

    def __init__(
        self, spec: LoadSpec, index: int, enc: Encoder, clock: _Clock, result: LoadResult
    ) -> None:
        self.spec, self.index, self.enc, self.clock, self.result = spec, index, enc, clock, result
        self.sequence = spec.seq_base
        self.number = 0
        self.window = 0  # from StreamSettings, then from FlowControlHints
        self.open_loop = spec.mode == "open" and spec.rate > 0
        # Open loop: every device sends one batch per interval, the devices staggered.
        self.interval = spec.batch_size * len(spec.devices) / spec.rate if self.open_loop else 0.0
        self.due = spec.start_at + self.interval * index / len(spec.devices)

    async def run(self) -> None:
        async with _channel(self.spec, self.spec.devices[self.index]) as channel:
            await channel.channel_ready()
            late = time.monotonic() - self.spec.start_at
            self.result.late_start = max(self.result.late_start, late)
            await _sleep_until(self.spec.start_at)
            while time.monotonic() < self.clock.end:
                try:
                    await self._stream(channel)
                except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
                    self.result.errors[_error_text(exc)] += 1
                    await asyncio.sleep(0.2)
                else:
                    return

    async def _stream(self, channel: grpc.aio.Channel) -> None:
        spec, result, clock = self.spec, self.result, self.clock
        call: grpc.aio.StreamStreamCall[bytes, pb.StreamScansResponse] = channel.stream_stream(
            STREAM_METHOD,
            request_serializer=None,
            response_deserializer=pb.StreamScansResponse.FromString,
        )()

        async def read() -> pb.StreamScansResponse | None:
            msg = await call.read()
            return None if msg is grpc.aio.EOF else msg  # type: ignore[return-value]

        in_flight: dict[str, tuple[float, int]] = {}
        receiver: asyncio.Task[None] | None = None
        try:
            first = await read()
            if first is None or first.WhichOneof("kind") != "settings":
                result.errors["stream opened without StreamSettings"] += 1
                return
            stream_settings = first.settings
            self.window = max(1, self.window or stream_settings.max_in_flight_batches or 8)
            size = min(spec.batch_size, stream_settings.max_scans_per_batch or spec.batch_size)
            self.sequence = max(self.sequence, stream_settings.last_stored_sequence + 1)
            room = asyncio.Event()  # set on every ack and when the receiver ends
            hold_until = 0.0
            sender_done = False
            closed_writing = False

            async def finish_writing() -> None:
                nonlocal closed_writing
                if not closed_writing:
                    closed_writing = True
                    await call.done_writing()

            async def receive() -> None:
                nonlocal hold_until
                while (msg := await read()) is not None:
                    kind = msg.WhichOneof("kind")
                    now = time.monotonic()
                    if kind == "ack":
                        sent_at, count = in_flight.pop(msg.ack.batch_id, (now, 0))
                        results = msg.ack.results
                        by_code = Counter(map(_OUTCOME, results))
                        for code, n in by_code.items():
                            result.outcomes[_outcome_name(code)] += n
                        if len(results) != count:
                            result.errors["ack with a wrong number of results"] += 1
                        counted = by_code[_ADMITTED] + by_code[_DENIED]
                        clock.record(result, now, counted, now - sent_at)
                        room.set()
                        if sender_done and not in_flight:
                            await finish_writing()
                    elif kind == "flow_control":
                        # The hint's window stays in force until the next hint (the proto).
                        hint = msg.flow_control
                        self.window = max(1, hint.max_in_flight_batches)
                        hold_until = now + hint.retry_after.ToNanoseconds() / 1e9
                        result.hints += 1

            receiver = asyncio.create_task(receive())
            receiver.add_done_callback(lambda _: room.set())
            while True:
                if self.open_loop:
                    await _sleep_until(self.due)
                if time.monotonic() >= clock.end or receiver.done():
                    break
                try:
                    while len(in_flight) >= self.window and not receiver.done():
                        room.clear()
                        await asyncio.wait_for(room.wait(), clock.end - time.monotonic())
                except TimeoutError:
                    break  # the run ended with the window full: normal in a closed loop
                if receiver.done():
                    break
                await _sleep_until(min(hold_until, clock.end))
                now = time.monotonic()
                self.number += 1
                batch_id = f"{self.index}-{self.number}"
                first_seq = self.sequence
                token = first_seq + self.index * 7919
                payload = self.enc.batch(batch_id, first_seq, size, token, time.time())
                # Open loop: latency from when the batch was due, not when the window let it go.
                in_flight[batch_id] = (self.due if self.open_loop else now, size)
                self.sequence += size
                result.sent += size
                self.due += self.interval
                try:
                    await asyncio.wait_for(
                        call.write(payload), max(1.0, clock.end - time.monotonic())
                    )
                except TimeoutError:
                    result.errors["a write blocked past the end of the run"] += 1
                    break
            sender_done = True
            if not in_flight:
                await finish_writing()
            try:
                await asyncio.wait_for(asyncio.shield(receiver), spec.tail_timeout)
            except TimeoutError:
                result.errors["acks still missing at the end"] += 1
        finally:
            result.unacked += sum(count for _, count in in_flight.values())
            call.cancel()
            if receiver is not None and not receiver.done():
                receiver.cancel()
                with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                    await receiver


async def _drive_unary(
    spec: LoadSpec, enc: Encoder, clock: _Clock, result: LoadResult, channels: list[Any]
) -> None:
    n = len(spec.devices)
    sequences = [spec.seq_base] * n
    stubs = [
        ch.unary_unary(
            UNARY_METHOD,
            request_serializer=None,
            response_deserializer=pb.CheckInResponse.FromString,
        )
        for ch in channels
    ]

    async def caller(slot: int) -> None:
        dev = slot % n
        while time.monotonic() < clock.end:
            seq = sequences[dev]
            sequences[dev] += 1
            payload = enc.checkin(seq, seq + dev * 7919, time.time())
            began = time.monotonic()
            result.sent += 1
            try:
                reply = await stubs[dev](payload, timeout=30)
            except grpc.aio.AioRpcError as exc:
                result.errors[_error_text(exc)] += 1
                result.unacked += 1
                if exc.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNAVAILABLE):
                    await asyncio.sleep(0.1)
                continue
            now = time.monotonic()
            name = _outcome_name(reply.result.outcome)
            result.outcomes[name] += 1
            clock.record(result, now, 1 if name in COUNTED else 0, now - began)

    await _sleep_until(spec.start_at)
    await asyncio.gather(*(caller(i) for i in range(spec.concurrency)))


async def _generate(spec: LoadSpec) -> LoadResult:
    enc = Encoder(spec.tokens)
    enc.self_check()
    clock = _Clock(spec)
    result = LoadResult()
    cpu0 = time.process_time()
    if spec.mode == "unary":
        channels = [_channel(spec, dev) for dev in spec.devices]
        try:
            await asyncio.gather(*(ch.channel_ready() for ch in channels))
            result.late_start = max(0.0, time.monotonic() - spec.start_at)
            await _drive_unary(spec, enc, clock, result, channels)
        finally:
            await asyncio.gather(*(ch.close() for ch in channels))
    else:
        tasks = [_Device(spec, i, enc, clock, result).run() for i in range(len(spec.devices))]
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                result.errors[_error_text(outcome)] += 1
    result.cpu_seconds = time.process_time() - cpu0
    return result


def _generator_process(spec: LoadSpec, out: Any) -> None:
    try:
        out.put(asyncio.run(_generate(spec)))
    except BaseException as exc:
        failed = LoadResult()
        failed.errors[f"generator crashed: {_error_text(exc)}"] += 1
        out.put(failed)
        raise


# --------------------------------------------------------------------------- raw gRPC ceiling


def _ceiling_process(tls: tuple[bytes, bytes, bytes], window: int, out: Any) -> None:
    asyncio.run(_ceiling_server(tls, window, out))


async def _ceiling_server(tls: tuple[bytes, bytes, bytes], window: int, out: Any) -> None:
    """StreamScans that acks each batch at once, every scan ADMITTED; no database."""
    ca_pem, cert_pem, key_pem = tls

    async def stream_scans(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        yield pb.StreamScansResponse(
            settings=pb.StreamSettings(
                device_id="ceiling",
                max_scans_per_batch=1000,
                max_in_flight_batches=window,
            )
        )
        async for request in requests:
            batch = request.batch
            ack = pb.ScanBatchAck(batch_id=batch.batch_id)
            for scan in batch.scans:
                ack.results.add(sequence=scan.sequence, outcome=pb.SCAN_OUTCOME_ADMITTED)
            ack.highest_sequence = max((s.sequence for s in batch.scans), default=0)
            yield pb.StreamScansResponse(ack=ack)

    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ]
    )
    handler = grpc.stream_stream_rpc_method_handler(
        stream_scans,
        request_deserializer=pb.StreamScansRequest.FromString,
        response_serializer=pb.StreamScansResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {"StreamScans": handler}),)
    )
    creds = grpc.ssl_server_credentials(
        [(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=True
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    out.put(port)
    await stop.wait()
    await server.stop(1)


# --------------------------------------------------------------------------- harness


def _mean_mb(samples: list[tuple[float, int, int]], i: int) -> float:
    return sum(s[i] for s in samples) / len(samples) / 1024


@dataclass
class Phase:
    name: str
    label: str
    result: LoadResult | None = None
    seconds: float = 0.0
    rate: float = 0.0
    inbox_start: int | None = None  # inbox rows when the measured window began
    inbox_max: int | None = None
    inbox_end: int | None = None
    drain_seconds: float | None = None  # None: not measured; inf: did not drain
    memory: dict[str, dict[str, float]] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)  # share of one core
    note: str = ""
    events: list[events.Event] = field(default_factory=list)
    """Checkpoints, autovacuum, slow statements, server pauses in the window."""


@dataclass
class Options:
    duration: float
    side_duration: float
    latency_duration: float
    warmup: float
    devices: int
    people: int
    batch_size: int
    clients: int
    naive_concurrency: int
    copy_connections: int
    copy_rows: int
    drain_timeout: float
    open_rate: float
    keep: bool
    json_path: Path | None
    skip: frozenset[str]
    ha: bool = False
    metrics_rounds: int = 0
    """0: the usual phases; else that many off/on pairs of the closed loop."""


class Bench:
    def __init__(self, opts: Options, *, ha: bool = False) -> None:
        self.opts = opts
        self.db = PrivateDatabase("stopcovid-bench-", ha=ha)
        self.tmp = self.db.tmp
        self.settings = self.db.settings
        self.devices: list[DeviceCred] = []
        self.tokens: list[str] = []
        self.venue_id = uuid.uuid4()
        self.phases: list[Phase] = []
        self.watched: list[Watched] = []
        self.inbox_samples: list[tuple[float, int]] = []
        self.phase_no = 0
        self.ca_pem = b""

    # -- setup

    def setup(self) -> None:
        began = time.monotonic()
        self.db.start()
        self.settings = self.db.settings
        ca = setup.ensure_pki(self.settings)
        store = self.db.keystore
        self.ca_pem = (self.settings.pki_dir / "ca.pem").read_bytes()
        current, token_keys = store.token_keys()
        tokens = PersonalTokens(current, token_keys, self.settings.token_window_s)
        self.tokens = [tokens.issue_static(uuid.uuid4()) for _ in range(self.opts.people)]
        rows = self._make_devices(ca.devices)
        asyncio.run(self._insert_devices(rows))
        print(
            f"setup: {len(self.devices)} devices, {len(self.tokens)} people, "
            f"{time.monotonic() - began:.1f}s",
            flush=True,
        )

    def _make_devices(self, ca: Authority) -> list[tuple[Any, ...]]:
        rows = []
        for i in range(self.opts.devices):
            device_id = uuid.uuid4()
            issued = ca.issue_client(str(device_id), "ROLE_DEVICE")
            cert = x509.load_pem_x509_certificate(issued.certificate_pem)
            self.devices.append(
                DeviceCred(str(device_id), issued.chain_pem, issued.private_key_pem)
            )
            rows.append(
                (
                    device_id,
                    self.venue_id,
                    f"bench scanner {i + 1}",
                    f"{cert.serial_number:x}",
                    cert.not_valid_after_utc,
                    "bench",
                )
            )
        return rows

    async def _settle(self) -> None:
        """Between the closed and the open loop: the closed loop leaves millions of
        dead inbox rows whose cleanup (autovacuum) would otherwise run during the
        latency measurement; the open loop is meant to see the steady state at half
        the rate, so the cleanup is done first, in the open."""
        conn = await self._connect()
        try:
            await conn.execute("VACUUM (ANALYZE) scan_inbox, checkins")
        finally:
            await conn.close()

    async def _connect(self) -> asyncpg.Connection:
        return await asyncpg.connect(**db.connect_args(self.settings, db.MIGRATOR).kwargs())

    async def _insert_devices(self, rows: list[tuple[Any, ...]]) -> None:
        conn = await self._connect()
        try:
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO venues (venue_id, display_name, setting, region_code, "
                    "capacity, created_by) VALUES ($1, 'Bench Market', 'indoor', 'KH-12', "
                    "100000, 'bench')",
                    self.venue_id,
                )
                await conn.executemany(
                    "INSERT INTO devices (device_id, venue_id, display_name, "
                    "certificate_serial, certificate_expire_time, created_by) "
                    "VALUES ($1, $2, $3, $4, $5, $6)",
                    rows,
                )
        finally:
            await conn.close()

    def start_checkin(self, name: str, **extra: str) -> tuple[Child, int]:
        """A CheckIn server on a port of its choosing, once it is healthy."""
        child = self.db.processes.server("checkin", port=0, name=name, env=extra)
        assert child.port is not None
        return child, child.port

    def close(self) -> None:
        self.db.close(keep=self.opts.keep)

    # -- load

    def _specs(
        self,
        target: str,
        mode: str,
        duration: float,
        rate: float = 0.0,
        concurrency: int = 0,
    ) -> list[LoadSpec]:
        """One LoadSpec per generator process; devices, rate and concurrency are split."""
        self.phase_no += 1
        clients = max(1, min(self.opts.clients, len(self.devices)))
        start_at = time.monotonic() + 4.0  # generator processes import and connect first
        return [
            LoadSpec(
                target=target,
                ca_pem=self.ca_pem,
                devices=self.devices[c::clients],
                tokens=self.tokens,
                mode=mode,
                start_at=start_at,
                warmup=self.opts.warmup,
                duration=duration,
                batch_size=self.opts.batch_size,
                seq_base=self.phase_no * 1_000_000_000 + 1,
                rate=rate / clients,
                concurrency=max(1, concurrency // clients),
            )
            for c in range(clients)
        ]

    async def _run_load(self, specs: list[LoadSpec], phase: Phase, database: bool = True) -> None:
        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        procs = [ctx.Process(target=_generator_process, args=(s, out), daemon=True) for s in specs]
        for p in procs:
            p.start()
        spec = specs[0]
        load_end = spec.start_at + spec.warmup + spec.duration
        await _sleep_until(spec.start_at)
        if database and self.inbox_samples:
            phase.inbox_start = self.inbox_samples[-1][1]
        await _sleep_until(spec.start_at + spec.warmup)
        wall_start = time.time()
        cpu0 = {w.name: w.cpu_seconds() for w in self.watched}
        first_sample = len(self.inbox_samples)
        mem_first = {w.name: len(w.samples) for w in self.watched}
        await _sleep_until(load_end)
        wall_end = time.time()
        cpu1 = {w.name: w.cpu_seconds() for w in self.watched}
        phase.cpu = {n: (cpu1[n] - cpu0.get(n, 0.0)) / spec.duration for n in cpu1}
        total = LoadResult()
        deadline = time.monotonic() + spec.tail_timeout + 30
        for _ in procs:
            try:
                got = await asyncio.to_thread(out.get, True, max(1.0, deadline - time.monotonic()))
            except queue_mod.Empty:
                total.errors["a generator process returned nothing"] += 1
                continue
            total.merge(got)
        for p in procs:
            await asyncio.to_thread(p.join, 5)
            if p.is_alive():
                p.kill()
        phase.result = total
        phase.seconds = spec.duration
        phase.rate = total.acked / spec.duration
        phase.cpu["load generator"] = total.cpu_seconds / (spec.duration + spec.warmup)
        if self.watched:
            phase.memory = self._memory_report(mem_first)
        if database:
            phase.events = events.postgres(self.db.postgres_log(), wall_start, wall_end)
            for log in sorted(self.tmp.glob("checkin*.log")):
                phase.events += events.server(log, wall_start, wall_end)
            phase.events.sort(key=operator.attrgetter("second"))
            inbox = [n for t, n in self.inbox_samples[first_sample:] if t <= load_end + 1]
            phase.inbox_max = max(inbox, default=None)
            await self._drain(phase, load_end)

    async def _drain(self, phase: Phase, load_end: float) -> None:
        conn = await self._connect()
        try:
            deadline = time.monotonic() + self.opts.drain_timeout
            count: int = await conn.fetchval("SELECT count(*) FROM scan_inbox")
            phase.inbox_end = count
            while count > 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.25)
                count = await conn.fetchval("SELECT count(*) FROM scan_inbox")
            phase.drain_seconds = (
                max(0.0, time.monotonic() - load_end) if count == 0 else float("inf")
            )
        finally:
            await conn.close()

    def _memory_report(self, first_index: dict[str, int]) -> dict[str, dict[str, float]]:
        report: dict[str, dict[str, float]] = {}
        window = min(10.0, max(1.0, self.opts.duration / 3))
        for w in self.watched:
            samples = w.samples[first_index.get(w.name, 0) :]
            if not samples:
                continue
            t0, t1 = samples[0][0], samples[-1][0]
            head = [s for s in samples if s[0] <= t0 + window]
            tail = [s for s in samples if s[0] >= t1 - window]
            report[w.name] = {
                "peak_mb": w.peak_kb() / 1024,
                "first_mb": _mean_mb(head, 1),
                "last_mb": _mean_mb(tail, 1),
                "window_s": window,
            }
            if w.tree:
                report[w.name]["private_first_mb"] = _mean_mb(head, 2)
                report[w.name]["private_last_mb"] = _mean_mb(tail, 2)
        return report

    async def _sampler(self) -> None:
        conn = await self._connect()
        try:
            while True:
                now = time.monotonic()
                for w in self.watched:
                    w.sample(now)
                with contextlib.suppress(asyncpg.PostgresError):
                    count = await conn.fetchval("SELECT count(*) FROM scan_inbox")
                    self.inbox_samples.append((now, int(count)))
                await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - now)))
        finally:
            await conn.close()

    # -- phases

    async def raw_copy(self) -> Phase:
        phase = Phase("raw_copy", "ceiling: raw COPY into checkins")
        conn0 = await self._connect()
        today = dt.datetime.now(dt.UTC).date()
        for day in (today, today + dt.timedelta(days=1)):
            await conn0.execute("SELECT ensure_checkin_partition($1)", day)
        conns = [await self._connect() for _ in range(self.opts.copy_connections)]
        columns = list(INBOX_COLUMNS)  # the store has the same columns
        # Rows shaped like the server's: a 16-byte pseudonym per person of the
        # bench's people, in the order the load generator scans them, one exit
        # in four, so the trace's indexes grow as they do under the real load
        # (1,024 distinct values kept the person index small and cached).
        people = max(1, self.opts.people)
        refs = [secrets.token_bytes(16) for _ in range(people)]
        encs = [secrets.token_bytes(12 + 16 + 16) for _ in range(1024)]
        devices = [uuid.UUID(d.device_id) for d in self.devices]
        rows_per_copy = self.opts.copy_rows
        begin = time.monotonic() + 0.5
        end = begin + self.opts.side_duration
        stored = 0
        latencies: list[float] = []
        per_second: Counter[int] = Counter()

        async def copier(k: int, conn: asyncpg.Connection) -> None:
            nonlocal stored
            sequence = 1 + k * 1_000_000_000
            person = k * 7919
            device = devices[k % len(devices)]
            while time.monotonic() < end:
                now = dt.datetime.now(dt.UTC)
                rows = [
                    (
                        now.date(),
                        self.venue_id,
                        device,
                        sequence + i,
                        now,
                        "exit" if (sequence + i) & 3 == 0 else "entry",
                        "admitted",
                        None,
                        "bench",
                        refs[(person + i) % people],
                        encs[i & 1023],
                        now,
                    )
                    for i in range(rows_per_copy)
                ]
                sequence += rows_per_copy
                person += rows_per_copy
                t = time.monotonic()
                await conn.copy_records_to_table("checkins", records=rows, columns=columns)
                done = time.monotonic()
                if begin <= done < end:
                    stored += rows_per_copy
                    latencies.append(done - t)
                    per_second[int(done - begin)] += rows_per_copy

        try:
            await _sleep_until(begin - 0.5)
            await asyncio.gather(*(copier(k, c) for k, c in enumerate(conns)))
            # Leave the store empty for the phases after this one.
            await conn0.execute("TRUNCATE checkins")
        finally:
            for c in (conn0, *conns):
                await c.close()
        result = LoadResult(acked=stored, latencies=latencies, per_second=per_second)
        phase.result = result
        phase.seconds = self.opts.side_duration - 0.5
        phase.rate = stored / phase.seconds
        phase.note = (
            f"{self.opts.copy_connections} connection(s), {rows_per_copy} rows per COPY, "
            "one commit each; latency = one COPY"
        )
        return phase

    async def raw_grpc(self) -> Phase:
        phase = Phase("raw_grpc", "ceiling: raw gRPC stream (mTLS, no DB)")
        pki = self.settings.pki_dir
        tls = (self.ca_pem, (pki / "server.pem").read_bytes(), (pki / "server.key").read_bytes())
        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        server = ctx.Process(
            target=_ceiling_process,
            args=(tls, self.settings.max_in_flight_batches, out),
            daemon=True,
        )
        server.start()
        try:
            port = await asyncio.to_thread(out.get, True, 30)
            assert server.pid is not None
            self.watched = [Watched("ceiling server", server.pid)]
            specs = self._specs(f"127.0.0.1:{port}", "closed", duration=self.opts.side_duration)
            await self._run_load(specs, phase, database=False)
        finally:
            self.watched = []
            if server.pid is not None and server.is_alive():
                os.kill(server.pid, signal.SIGTERM)
            await asyncio.to_thread(server.join, 10)
            if server.is_alive():
                server.kill()
        phase.note = "acks at once, every scan ADMITTED; same window and batches"
        return phase

    async def naive(self, worker: Watched, postgres: Watched) -> Phase:
        phase = Phase("naive", "naive: unary CheckIn, 1 commit/scan")
        proc, port = await asyncio.to_thread(
            self.start_checkin, "checkin-naive", STOPCOVID_COMMIT_MAX_ROWS="1"
        )
        try:
            self.watched = [Watched("checkin server", proc.pid), worker, postgres]
            specs = self._specs(
                f"127.0.0.1:{port}",
                "unary",
                duration=self.opts.side_duration,
                concurrency=self.opts.naive_concurrency,
            )
            await self._run_load(specs, phase)
        finally:
            await asyncio.to_thread(self.db.processes.stop_child, proc)
        phase.note = (
            f"{self.opts.naive_concurrency} calls in flight over {len(self.devices)} devices, "
            "STOPCOVID_COMMIT_MAX_ROWS=1"
        )
        return phase

    async def streaming(self, worker: Watched, postgres: Watched, rate: float) -> list[Phase]:
        proc, port = await asyncio.to_thread(self.start_checkin, "checkin")
        phases = []
        try:
            server = Watched("checkin server", proc.pid)
            self.watched = [server, worker, postgres]
            target = f"127.0.0.1:{port}"
            if "closed" not in self.opts.skip:
                closed = Phase("closed", "streaming, closed loop (max rate)")
                await self._run_load(
                    self._specs(target, "closed", duration=self.opts.duration), closed
                )
                closed.note = (
                    f"{len(self.devices)} device streams, {self.opts.batch_size} scans/batch"
                )
                phases.append(closed)
                rate = rate or closed.rate / 2
            if "open" not in self.opts.skip and rate > 0:
                if phases:
                    await self._settle()
                opened = Phase("open", "streaming, open loop (1/2 rate)")
                for w in self.watched:
                    w.samples.clear()
                await self._run_load(
                    self._specs(target, "open", duration=self.opts.latency_duration, rate=rate),
                    opened,
                )
                opened.note = f"offered {rate:,.0f} scans/s; latency from when each batch was due"
                phases.append(opened)
        finally:
            await asyncio.to_thread(self.db.processes.stop_child, proc)
        return phases

    async def metrics_cost(self, worker: Watched, postgres: Watched) -> list[Phase]:
        """Closed loops with the CheckIn server's metrics off and on, alternating (so
        drift of the machine falls on both), each on a server of its own."""
        phases: list[Phase] = []
        for round_no in range(1, self.opts.metrics_rounds + 1):
            for mode in ("off", "on"):
                if phases:
                    await self._settle()
                name = f"checkin-metrics-{mode}-{round_no}"
                proc, port = await asyncio.to_thread(
                    self.start_checkin, name, STOPCOVID_METRICS=mode
                )
                try:
                    self.watched = [Watched("checkin server", proc.pid), worker, postgres]
                    phase = Phase(f"metrics_{mode}", f"closed loop, metrics {mode} ({round_no})")
                    specs = self._specs(f"127.0.0.1:{port}", "closed", duration=self.opts.duration)
                    await self._run_load(specs, phase)
                    phase.note = f"round {round_no}: STOPCOVID_METRICS={mode}"
                    phases.append(phase)
                finally:
                    await asyncio.to_thread(self.db.processes.stop_child, proc)
        return phases

    async def run(self) -> None:
        if self.opts.metrics_rounds:
            await events.enable(self.db.superuser_dsn())
            watching = asyncio.create_task(self._sampler())
            try:
                worker_proc = self.db.processes.worker()
                postmaster = self.db.postmaster_pid()
                assert postmaster is not None
                worker = Watched("worker", worker_proc.pid)
                postgres = Watched("postgres (PSS sum)", postmaster, tree=True)
                self._announce(f"metrics cost, {self.opts.metrics_rounds} off/on rounds")
                self.phases += await self.metrics_cost(worker, postgres)
            finally:
                watching.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watching
            return
        skip = self.opts.skip
        sampler: asyncio.Task[None] | None = None
        await events.enable(self.db.superuser_dsn())
        if "copy" not in skip:
            self._announce("raw COPY ceiling")
            self.phases.append(await self.raw_copy())
        sampler = asyncio.create_task(self._sampler())
        try:
            if "grpc" not in skip:
                self._announce("raw gRPC ceiling")
                self.phases.append(await self.raw_grpc())
            worker_proc = self.db.processes.worker()
            postmaster = self.db.postmaster_pid()
            assert postmaster is not None
            worker = Watched("worker", worker_proc.pid)
            postgres = Watched("postgres (PSS sum)", postmaster, tree=True)
            if "naive" not in skip:
                self._announce("naive design")
                self.phases.append(await self.naive(worker, postgres))
            self._announce("streaming, closed then open loop")
            self.phases += await self.streaming(worker, postgres, self.opts.open_rate)
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler

    def _announce(self, what: str) -> None:
        print(f"running: {what} ...", flush=True)


# --------------------------------------------------------------------------- report


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:,.0f} ms" if v >= 0.01 else f"{v * 1000:.1f} ms"


def _windows(per_second: Counter[int], seconds: float, width: int) -> float | None:
    n = int(seconds)
    if n < width:
        return None
    return min(
        sum(per_second[s] for s in range(i, i + width)) / width for i in range(n - width + 1)
    )


def summarize(phases: list[Phase]) -> dict[str, Any]:
    by = {p.name: p for p in phases}
    naive = by["naive"].rate if "naive" in by else None
    copy = by["raw_copy"].rate if "raw_copy" in by else None
    grpc_ceiling = by["raw_grpc"].rate if "raw_grpc" in by else None
    rows = []
    for p in phases:
        r = p.result or LoadResult()
        rows.append(
            {
                "phase": p.name,
                "label": p.label,
                "scans_per_s": p.rate,
                "x_naive": p.rate / naive if naive else None,
                "of_raw_copy": p.rate / copy if copy else None,
                "of_raw_grpc": p.rate / grpc_ceiling if grpc_ceiling else None,
                "ack_p50_s": _pct(r.latencies, 0.5),
                "ack_p99_s": _pct(r.latencies, 0.99),
                "ack_p999_s": _pct(r.latencies, 0.999),
                "ack_max_s": max(r.latencies, default=None),
                "latency_samples": len(r.latencies),
                "min_1s_rate": _windows(r.per_second, p.seconds, 1),
                "min_5s_rate": _windows(r.per_second, p.seconds, 5),
                "per_second": [r.per_second[i] for i in range(int(p.seconds))],
                "inbox_start": p.inbox_start,
                "inbox_max": p.inbox_max,
                "inbox_end": p.inbox_end,
                "drain_s": p.drain_seconds,
                "outcomes": dict(r.outcomes),
                "errors": dict(r.errors),
                "sent": r.sent,
                "hints": r.hints,
                "unacked": r.unacked,
                "seconds": p.seconds,
                "late_start_s": r.late_start,
                "cpu_cores": p.cpu,
                "cpu_us_per_scan": {
                    k: v * 1e6 / p.rate
                    for k, v in p.cpu.items()
                    if p.rate and k != "load generator"
                },
                "memory": p.memory,
                "note": p.note,
                "events": [asdict(e) for e in p.events],
            }
        )
    summary: dict[str, Any] = {"phases": rows}
    off = [p.rate for p in phases if p.name == "metrics_off"]
    on = [p.rate for p in phases if p.name == "metrics_on"]
    if off and on:
        mean_off, mean_on = sum(off) / len(off), sum(on) / len(on)
        summary["metrics_cost"] = {
            "off_scans_per_s": off,
            "on_scans_per_s": on,
            "ratio_on_to_off": mean_on / mean_off if mean_off else None,
        }
    return summary


def render(summary: dict[str, Any], opts: Options) -> str:
    rows = summary["phases"]
    out = []
    head = (
        f"{'phase':<38} {'scans/s':>9} {'x naive':>8} {'/COPY':>6} {'/gRPC':>6} "
        f"{'ack p50':>8} {'ack p99':>8} {'inbox max':>10} {'inbox end':>10} {'drain':>7}"
    )
    out += [head, "-" * len(head)]
    for r in rows:

        def opt(v: float | None, fmt: str) -> str:
            return "-" if v is None else format(v, fmt)

        drain = r["drain_s"]
        drain_text = (
            "-" if drain is None else ("never" if drain == float("inf") else f"{drain:.1f}s")
        )
        out.append(
            f"{r['label']:<38} {r['scans_per_s']:>9,.0f} "
            f"{opt(r['x_naive'], ',.1f') + ('x' if r['x_naive'] else ''):>8} "
            f"{opt(r['of_raw_copy'], '.2f'):>6} {opt(r['of_raw_grpc'], '.2f'):>6} "
            f"{_ms(r['ack_p50_s']):>8} {_ms(r['ack_p99_s']):>8} "
            f"{opt(r['inbox_max'], ','):>10} {opt(r['inbox_end'], ','):>10} {drain_text:>7}"
        )
    out.append("")
    for r in rows:
        details = [f"{r['label']}: {r['note']}"]
        details.append(
            f"    measured {r['seconds']:.0f}s; {r['latency_samples']} latency samples; "
            f"ack p99.9 {_ms(r['ack_p999_s'])}, max {_ms(r['ack_max_s'])}; "
            f"slowest 1s {_fmt_rate(r['min_1s_rate'])}, slowest 5s {_fmt_rate(r['min_5s_rate'])}"
        )
        details += [
            "    " + line
            for line in events.render([events.Event(**e) for e in r["events"]])
            if r["phase"] in ("closed", "open")
        ]
        if r["late_start_s"] > 0.5:
            details.append(
                f"    NOTE: the load generators started {r['late_start_s']:.1f}s late "
                "(inside the warm-up unless this exceeds it)"
            )
        if r["inbox_start"]:
            details.append(
                f"    NOTE: the inbox already held {r['inbox_start']:,} rows when this run began "
                "(the previous run's backlog), so this figure is disturbed"
            )
        if r["phase"] in ("closed", "open", "naive"):
            timeline = " ".join(f"{n / 1000:.0f}k" for n in r["per_second"])
            details.append(f"    acked per second (thousands): {timeline}")
        if r["outcomes"]:
            outcomes = ", ".join(f"{k} {v:,}" for k, v in sorted(r["outcomes"].items()))
            details.append(
                f"    outcomes: {outcomes}; sent {r['sent']:,}, unacked {r['unacked']:,}, "
                f"flow-control hints {r['hints']:,}"
            )
        if r["errors"]:
            errs = "; ".join(f"{k} (x{v})" for k, v in r["errors"].items())
            details.append(f"    errors: {errs}")
        if r["cpu_cores"]:
            cpu = ", ".join(f"{k} {v:.2f}" for k, v in r["cpu_cores"].items())
            details.append(f"    CPU (cores): {cpu}")
        if r["cpu_us_per_scan"]:
            per = ", ".join(f"{k} {v:.1f}" for k, v in r["cpu_us_per_scan"].items())
            details.append(f"    CPU per acknowledged scan (us): {per}")
        for name, m in r["memory"].items():
            growth = m["last_mb"] - m["first_mb"]
            text = (
                f"    memory {name}: peak {m['peak_mb']:,.0f} MB; mean first {m['window_s']:.0f}s "
                f"{m['first_mb']:,.0f} MB, last {m['window_s']:.0f}s {m['last_mb']:,.0f} MB "
                f"({growth:+,.0f} MB)"
            )
            if "private_first_mb" in m:
                text += (
                    f"; heaps (no shared_buffers) {m['private_first_mb']:,.0f} -> "
                    f"{m['private_last_mb']:,.0f} MB"
                )
            details.append(text)
        out += details
    cost = summary.get("metrics_cost")
    if cost is not None:
        ratio = cost["ratio_on_to_off"]
        ok = ratio is not None and ratio >= 0.95
        shown = "-" if ratio is None else f"{ratio:.3f}"
        out += [
            "",
            f"metrics cost: on/off = {shown} of the closed-loop rate "
            f"(off {', '.join(f'{v:,.0f}' for v in cost['off_scans_per_s'])}; "
            f"on {', '.join(f'{v:,.0f}' for v in cost['on_scans_per_s'])} scans/s)",
            f"  [{'ok' if ok else 'MISSED'}] metrics on at most 5% lower than off (issue 16)",
        ]
        return "\n".join(out)
    out += ["", *_targets(rows, opts)]
    return "\n".join(out)


def _fmt_rate(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}/s"


def _targets(rows: list[dict[str, Any]], opts: Options) -> list[str]:
    by = {r["phase"]: r for r in rows}
    lines = ["targets (issue):"]

    def line(ok: bool | None, text: str) -> None:
        mark = "n/a " if ok is None else ("PASS" if ok else "FAIL")
        lines.append(f"  [{mark}] {text}")

    closed, opened = by.get("closed"), by.get("open")
    if closed:
        rate = closed["scans_per_s"]
        short = " (shorter than 60 s: not the target's run)" if closed["seconds"] < 60 else ""
        line(
            rate >= 50_000,
            f">= 50,000 acked scans/s sustained: {rate:,.0f}/s over "
            f"{closed['seconds']:.0f}s{short}",
        )
        x = closed["x_naive"]
        line(None if x is None else x >= 30, f">= 30x the naive design: {_fmt_x(x)}")
        drained = [r for r in (closed, opened) if r and r["drain_s"] is not None]
        if drained:
            ok = all(r["drain_s"] != float("inf") for r in drained)
            never = f"never (waited {opts.drain_timeout:.0f}s)"
            times = ", ".join(
                f"{r['phase']} "
                + (never if r["drain_s"] == float("inf") else f"{r['drain_s']:.1f}s")
                for r in drained
            )
            line(ok, f"inbox drains to zero after the load stops: {times}")
        flat = _flatness(closed)
        if flat:
            line(
                all(ok for ok, _ in flat),
                "memory flat (last window <= first + max(10%, 32 MB)): "
                + "; ".join(t for _, t in flat),
            )
    if opened:
        p99 = opened["ack_p99_s"]
        line(
            None if p99 is None else p99 <= 0.1,
            f"p99 ack latency <= 100 ms at half rate: {_ms(p99)} at {opened['scans_per_s']:,.0f}/s",
        )
    lines += _steadiness_targets(closed, opened)
    return lines


def _steadiness_targets(closed: dict[str, Any] | None, opened: dict[str, Any] | None) -> list[str]:
    """Issue 14's targets: near the store's ceiling, and steady."""
    lines = ["targets (issue 14, a steady hot path):"]

    def line(ok: bool | None, text: str) -> None:
        mark = "n/a " if ok is None else ("PASS" if ok else "FAIL")
        lines.append(f"  [{mark}] {text}")

    if closed:
        share = closed["of_raw_copy"]
        line(
            None if share is None else share >= 0.40,
            "closed loop >= 0.40 of the raw-COPY ceiling: "
            + ("-" if share is None else f"{share:.2f}"),
        )
        slowest, mean = closed["min_1s_rate"], closed["scans_per_s"]
        line(
            None if slowest is None or not mean else slowest >= 0.5 * mean,
            "no 1-second window below 50% of the closed-loop mean: slowest "
            + ("-" if slowest is None or not mean else f"{slowest:,.0f}/s = {slowest / mean:.0%}"),
        )
    if opened:
        p99, p999 = opened["ack_p99_s"], opened["ack_p999_s"]
        line(None if p99 is None else p99 <= 0.05, f"open loop ack p99 <= 50 ms: {_ms(p99)}")
        line(None if p999 is None else p999 <= 0.1, f"open loop ack p99.9 <= 100 ms: {_ms(p999)}")
    return lines


def _fmt_x(x: float | None) -> str:
    return "-" if x is None else f"{x:,.1f}x"


def _flatness(row: dict[str, Any]) -> list[tuple[bool, str]]:
    found = []
    for name, m in row["memory"].items():
        private = "private_first_mb" in m
        first = m["private_first_mb"] if private else m["first_mb"]
        last = m["private_last_mb"] if private else m["last_mb"]
        grew = last - first
        what = f"{name} heaps" if private else name
        found.append((grew <= max(0.10 * first, 32.0), f"{what} {grew:+,.0f} MB"))
    return found


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m bench.checkin",
        description="End-to-end check-in benchmark with the naive design and two ceilings.",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        help="seconds of the closed-loop (max rate) run (default 60; --quick 5)",
    )
    parser.add_argument(
        "--side-duration",
        type=float,
        default=None,
        help="seconds of each ceiling and of the naive run (default 15; --quick 5)",
    )
    parser.add_argument(
        "--latency-duration",
        type=float,
        default=None,
        help="seconds of the open-loop half-rate run (default 30; --quick 5)",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds of load before measuring (default 3; --quick 1)",
    )
    parser.add_argument("--devices", type=int, default=20, help="device streams (default 20)")
    parser.add_argument(
        "--people", type=int, default=50_000, help="distinct personal tokens (default 50000)"
    )
    parser.add_argument("--batch-size", type=int, default=1000, help="scans per batch (1000)")
    parser.add_argument(
        "--clients", type=int, default=1, help="load generator processes (default 1)"
    )
    parser.add_argument(
        "--naive-concurrency",
        type=int,
        default=256,
        help="unary calls in flight in the naive run (default 256)",
    )
    parser.add_argument(
        "--copy-connections",
        type=int,
        default=2,
        help="connections of the raw COPY ceiling (default 2)",
    )
    parser.add_argument(
        "--copy-rows",
        type=int,
        default=5000,
        help="rows per COPY in the raw COPY ceiling (default 5000)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=None,
        help="longest wait for the inbox to empty after a run (default 120; --quick 30)",
    )
    parser.add_argument(
        "--open-rate",
        type=float,
        default=0.0,
        help="scans/s of the open-loop run (default: half the closed-loop rate)",
    )
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=["copy", "grpc", "naive", "closed", "open"],
        help="leave a phase out (repeatable)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 5 s phases, 1 s warm-up, 30 s drain timeout",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary directory (logs, cluster)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    parser.add_argument(
        "--ha",
        action="store_true",
        help="streaming only, on one embedded Postgres, then on the HA Postgres of `up --ha` "
        "(a synchronous standby), at the same offered rate; prints HA as a ratio of single",
    )
    parser.add_argument(
        "--metrics-cost",
        type=int,
        nargs="?",
        const=2,
        default=0,
        metavar="ROUNDS",
        help="only closed loops, metrics off then on, ROUNDS times (default 2): their ratio",
    )
    a = parser.parse_args(argv)
    # --quick changes the defaults only; durations given explicitly win.
    defaults = (
        {
            "duration": 5.0,
            "side_duration": 5.0,
            "latency_duration": 5.0,
            "warmup": 1.0,
            "drain_timeout": 30.0,
        }
        if a.quick
        else {
            "duration": 60.0,
            "side_duration": 15.0,
            "latency_duration": 30.0,
            "warmup": 3.0,
            "drain_timeout": 120.0,
        }
    )
    for name, value in defaults.items():
        if getattr(a, name) is None:
            setattr(a, name, value)
    if a.devices < 1 or a.batch_size < 1 or a.duration <= 0:
        parser.error("--devices, --batch-size and --duration must be positive")
    return Options(
        duration=a.duration,
        side_duration=a.side_duration,
        latency_duration=a.latency_duration,
        warmup=a.warmup,
        devices=a.devices,
        people=max(1, a.people),
        batch_size=a.batch_size,
        clients=a.clients,
        naive_concurrency=max(1, a.naive_concurrency),
        copy_connections=max(1, a.copy_connections),
        copy_rows=max(1, a.copy_rows),
        drain_timeout=a.drain_timeout,
        open_rate=a.open_rate,
        keep=a.keep,
        json_path=a.json,
        skip=frozenset(a.skip) | ({"copy", "grpc", "naive"} if a.ha else frozenset()),
        ha=a.ha,
        metrics_rounds=max(0, a.metrics_cost),
    )


def _run_bench(opts: Options, *, ha: bool = False) -> list[Phase]:
    """One benchmark, from setup to its servers' and database's stop; its phases.
    KeyboardInterrupt on SIGTERM too."""
    bench = Bench(opts, ha=ha)
    stop: Callable[..., None] = signal.getsignal(signal.SIGTERM)  # type: ignore[assignment]

    def on_term(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        bench.setup()
        asyncio.run(bench.run())
    finally:
        bench.close()
        signal.signal(signal.SIGTERM, stop)
    return bench.phases


def _ha_phases(opts: Options) -> list[Phase]:
    """Single node, then HA at the open-loop rate single node was offered: the
    latency ratio compares like with like."""
    print("== single node (embedded Postgres)", flush=True)
    single = _run_bench(opts)
    closed = next((p for p in single if p.name == "closed"), None)
    rate = opts.open_rate or (closed.rate / 2 if closed else 0.0)
    print("== HA (Patroni: a primary and a synchronous standby)", flush=True)
    ha = _run_bench(replace(opts, open_rate=rate), ha=True)
    for phase in ha:
        phase.name = f"ha_{phase.name}"
        phase.label = f"HA {phase.label}"
    return single + ha


def ha_ratios(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """Each HA figure as a ratio of the single-node one of the same phase."""
    by = {r["phase"]: r for r in rows}
    ratios: dict[str, float | None] = {}
    for phase in ("closed", "open"):
        single, ha = by.get(phase), by.get(f"ha_{phase}")
        if single is None or ha is None:
            continue
        for figure in ("scans_per_s", "ack_p99_s"):
            a, b = single[figure], ha[figure]
            ratios[f"{phase}_{figure}"] = b / a if a and b is not None else None
    return ratios


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    started = time.monotonic()
    with clean_environment():
        try:
            phases = _ha_phases(opts) if opts.ha else _run_bench(opts)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
    summary = summarize(phases)
    if opts.ha:
        summary["ha_ratio"] = ha_ratios(summary["phases"])
    summary["options"] = {
        k: (str(v) if isinstance(v, Path | frozenset) else v) for k, v in asdict(opts).items()
    }
    summary["environment"] = {
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "grpcio": grpc.__version__,
        "checkin_settings": {k: v for k, v in os.environ.items() if k.startswith("STOPCOVID_")},
        "total_seconds": time.monotonic() - started,
    }
    print()
    print(render(summary, opts))
    if opts.ha:
        print()
        print("HA / single node, same run (a synchronous standby on the same machine):")
        for name, ratio in summary["ha_ratio"].items():
            print(f"  {name:<22} {'-' if ratio is None else f'{ratio:.2f}'}")
    if opts.json_path is not None:
        opts.json_path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
        print(f"\nwrote {opts.json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
