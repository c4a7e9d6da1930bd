"""The connections benchmark: what a device connection costs the CheckIn server.

    .venv/bin/python -m bench.connections [--devices 10000] [--quick] [--json out.json]

One run, on this machine, in a private temporary Postgres, against one CheckIn
server process and one worker process on loopback. Every simulated device has its
own client certificate and its own TLS connection (one channel each, no shared
subchannel), and the load generators run in processes of their own:

1. idle: `--idle` devices open a stream each, read their StreamSettings and then
   send nothing, as a door with nobody at it. Server memory per idle stream = the
   growth of the server's RSS over the devices that opened. After the server's idle
   limit (`--stream-idle`, STOPCOVID_STREAM_IDLE_S) it ends their streams, and the
   devices keep their connections open, as the device SDK does until its next scan:
   server memory per idle device connection = the RSS growth over the devices then
   (target: at most 64 KB).
   floor: the same, against a bare grpcio server in a process of its own, with the
   same TLS material and the same gRPC options (server_options) and a handler that
   answers the opening message and ends the stream at the same idle limit: what
   gRPC and TLS alone cost, measured in the same run, so the CheckIn figures are
   also printed as ratios to it.
2. slow readers: `--slow` devices each send their whole window of 1000-scan
   batches of people at the highest risk level (so every ack is big: a decision
   id per scan), then their process is stopped (SIGSTOP), so it reads nothing at
   all. Memory per slow reader = the server's RSS growth while they hold it, over
   their number (target: at most 1 MB), measured after a few devices sent the same
   batches and read every ack, so that what the server's first batches cost once
   (statements, caches, the group commit's buffers) is not counted as theirs.
3. soak: `--devices` devices, spread over `--generators` processes, each with a
   stream that sends a batch of `--batch` scans every `--interval` seconds
   (staggered), for `--duration` seconds after every device is connected:
   throughput, ack p99, and the server's RSS and file descriptors over time. Its
   server has no idle limit: the devices send nothing until the last one is
   connected, and the figures are for all their streams open at once.

Each figure is reported with its bound and PASS/FAIL. A device whose stream fails to
open tries again after the device SDK's backoff (ReconnectPolicy: exponential, with
jitter) until `--connect-deadline`, as a real device does, rather than giving up.

It checks `ulimit -n` first and refuses a device count the limit cannot hold.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import queue
import random
import resource
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from cryptography import x509
from stopcovid.checkin.v1 import checkin_service_pb2 as pb
from stopcovid.client.device import ReconnectPolicy

from bench.checkin import (
    STREAM_METHOD,
    DeviceCred,
    Encoder,
    _cpu_seconds,
    _proc_fields,
    device_channel,
)
from bench.common import PrivateDatabase, clean_environment
from services.domain.people.tokens import PersonalTokens
from services.kernel import db
from services.kernel.server import TlsMaterial, server_options
from services.ops import setup

# Descriptors each generator may open beyond its devices (imports, pipes, logs).
_SPARE_FDS = 200
# Streams opened first, so that the figures are what more connections cost.
_WARM = 20
# The device SDK's reconnect backoff, and the codes it never retries
# (clients/stopcovid/client/device.py).
_RECONNECT = ReconnectPolicy()
_FATAL = frozenset(
    {
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)
# The issue's bounds (issue 12): each figure is reported with its bound and PASS/FAIL.
BOUND_IDLE_KB = 64
BOUND_SLOW_KB = 1024


@dataclass(frozen=True)
class GenSpec:
    mode: str  # "idle", "slow", "soak" or "busy" (warming up)
    target: str
    ca_pem: bytes
    devices: list[DeviceCred]
    tokens: list[str]
    batch: int = 1000
    interval: float = 0.0
    duration: float = 0.0
    """soak: how long each device sends, from the moment all are released."""
    connect_deadline: float = 120.0
    """How long a device keeps reopening a stream that failed to open."""
    idled: Any = None
    """idle: a queue told how many of the generator's streams the server ended idle."""


@dataclass
class GenResult:
    opened: int = 0
    settled: int = 0
    """Devices whose stream opened or failed to."""
    retries: int = 0
    """Stream openings that failed and were tried again after a backoff."""
    retried: Counter[str] = field(default_factory=Counter)
    """Why they failed, by status code and the start of its details."""
    idled: int = 0
    """idle: streams the server ended for idleness (status OK, trailer idle)."""
    quiet: int = 0
    """idle: streams whose idle end came, or failed to."""
    batches: int = 0
    acked_scans: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    cpu_seconds: float = 0.0


def _channel(spec: GenSpec, dev: DeviceCred) -> grpc.aio.Channel:
    return device_channel(spec.target, spec.ca_pem, dev)


def _error(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {(exc.details() or '')[:80]}"
    return type(exc).__name__


async def _device(
    spec: GenSpec,
    index: int,
    *,
    enc: Encoder,
    result: GenResult,
    settled: asyncio.Event,
    hold: Any,
    quieted: asyncio.Event,
) -> None:
    def settle() -> None:
        result.settled += 1
        if result.settled == len(spec.devices):
            settled.set()

    # A stream that fails to open is opened again after the device SDK's backoff
    # (exponential, with jitter), until the phase's connect deadline: what the
    # server does with devices that keep coming back, not one attempt each.
    rng = random.Random(index)  # noqa: S311 (jitter, not secrets)
    give_up_at = time.monotonic() + spec.connect_deadline
    failures = 0
    # One channel per device, as the SDK keeps one: a new call on it after each
    # failure (the channel reconnects underneath).
    async with _channel(spec, spec.devices[index]) as channel:
        while True:
            call: Any = channel.stream_stream(
                STREAM_METHOD,
                request_serializer=None,
                response_deserializer=pb.StreamScansResponse.FromString,
            )()
            try:
                first = await call.read()
            except grpc.aio.AioRpcError as exc:
                call.cancel()
                if exc.code() in _FATAL or time.monotonic() >= give_up_at:
                    settle()
                    raise
                failures += 1
                result.retries += 1
                result.retried[_error(exc)] += 1
                await asyncio.sleep(_RECONNECT.delay(failures, rng))
                continue
            settle()
            await _opened(
                spec,
                index,
                enc=enc,
                result=result,
                hold=hold,
                call=call,
                first=first,
                quieted=quieted,
            )
            return


async def _opened(
    spec: GenSpec,
    index: int,
    *,
    enc: Encoder,
    result: GenResult,
    hold: Any,
    call: Any,
    first: Any,
    quieted: asyncio.Event,
) -> None:
    try:
        if first is grpc.aio.EOF:
            result.errors["no StreamSettings"] += 1
            return
        result.opened += 1
        settings: pb.StreamSettings = first.settings
        sequence = settings.last_stored_sequence + 1
        if spec.mode == "idle" and spec.idled is None:
            await hold()  # warming up: streams held open until released
        elif spec.mode == "idle":
            # Nothing to send: the server ends the stream at its idle limit, and
            # the device keeps its connection (the channel) for its next scan.
            if await call.read() is grpc.aio.EOF and (
                await call.code() == grpc.StatusCode.OK
                and ("stopcovid-stream-end", "idle") in tuple(await call.trailing_metadata())
            ):
                result.idled += 1
            else:
                result.errors["stream not ended idle"] += 1
            result.quiet += 1
            quieted.set()
            await hold()
        elif spec.mode in ("slow", "busy"):
            for n in range(settings.max_in_flight_batches):
                await call.write(enc.batch(f"s{index}-{n}", sequence, spec.batch, n, time.time()))
                sequence += spec.batch
                result.batches += 1
            if spec.mode == "busy":  # warming up: the same batches, every ack read
                await call.done_writing()
                while await call.read() is not grpc.aio.EOF:
                    pass
            await hold()
        else:
            await hold()  # until every device is connected
            await _soak(spec, index, enc=enc, result=result, call=call, sequence=sequence)
    except grpc.aio.AioRpcError as exc:
        result.errors[_error(exc)] += 1
    finally:
        call.cancel()


async def _soak(
    spec: GenSpec, index: int, *, enc: Encoder, result: GenResult, call: Any, sequence: int
) -> None:
    sent: dict[str, float] = {}

    async def receive() -> None:
        while (msg := await call.read()) is not grpc.aio.EOF:
            if msg.WhichOneof("kind") == "ack":
                at = sent.pop(msg.ack.batch_id, None)
                if at is not None:
                    result.latencies.append(time.monotonic() - at)
                result.acked_scans += sum(
                    1
                    for r in msg.ack.results
                    if r.outcome in (pb.SCAN_OUTCOME_ADMITTED, pb.SCAN_OUTCOME_DENIED)
                )

    reader = asyncio.create_task(receive())
    begin = time.monotonic()
    end_at = begin + spec.duration
    due = begin + spec.interval * index / len(spec.devices)
    number = 0
    try:
        while True:
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if time.monotonic() >= end_at or reader.done():
                break
            number += 1
            batch_id = f"{index}-{number}"
            sent[batch_id] = time.monotonic()
            await call.write(
                enc.batch(batch_id, sequence, spec.batch, index * 31 + number, time.time())
            )
            sequence += spec.batch
            result.batches += 1
            due += spec.interval
        await call.done_writing()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(reader), 15)
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await reader


async def _generate(spec: GenSpec, ready: Any, release: Any) -> GenResult:
    enc = Encoder(spec.tokens)
    result = GenResult()
    settled, quieted = asyncio.Event(), asyncio.Event()
    cpu0 = time.process_time()

    async def hold() -> None:
        await asyncio.to_thread(release.wait)

    reported: set[str] = set()

    async def report() -> None:
        await settled.wait()
        ready.put(result.opened)
        reported.add("opened")
        if spec.idled is not None:
            while result.quiet < result.opened:
                quieted.clear()
                await quieted.wait()
            spec.idled.put(result.idled)
            reported.add("idled")

    reporter = asyncio.create_task(report())
    # Connect in waves: ten thousand handshakes at once would only time out.
    tasks = []
    for i in range(len(spec.devices)):
        tasks.append(
            asyncio.create_task(
                _device(
                    spec, i, enc=enc, result=result, settled=settled, hold=hold, quieted=quieted
                )
            )
        )
        if i % 50 == 49:
            await asyncio.sleep(0.25)
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            result.errors[_error(outcome)] += 1
    if not reporter.done():
        reporter.cancel()
        if "opened" not in reported:
            ready.put(result.opened)
        if spec.idled is not None and "idled" not in reported:
            spec.idled.put(result.idled)
    result.cpu_seconds = time.process_time() - cpu0
    return result


def _generator(spec: GenSpec, ready: Any, release: Any, out: Any) -> None:
    try:
        out.put(asyncio.run(_generate(spec, ready, release)))
    except BaseException as exc:
        failed = GenResult()
        failed.errors[f"generator crashed: {_error(exc)}"] += 1
        out.put(failed)
        raise


# --------------------------------------------------------------------------- the run


def _floor_serve(tls: TlsMaterial, options: list[tuple[str, int]], idle_s: float, out: Any) -> None:
    """A bare grpcio server: StreamScans answers StreamSettings, then ends the stream
    after `idle_s` as the CheckIn server does an idle one. No database, no
    interceptors, no Python state per call beyond the handler's coroutine."""
    opening = pb.StreamScansResponse(
        settings=pb.StreamSettings(
            device_id=str(uuid.uuid4()),
            venue_id=str(uuid.uuid4()),
            max_scans_per_batch=1000,
            max_in_flight_batches=8,
        )
    ).SerializeToString()

    async def stream(requests: Any, context: grpc.aio.ServicerContext[bytes, bytes]) -> None:
        await context.write(opening)
        await asyncio.sleep(idle_s)
        context.set_trailing_metadata((("stopcovid-stream-end", "idle"),))

    async def serve() -> None:
        server = grpc.aio.server(options=options)
        method = STREAM_METHOD.rsplit("/", 1)
        handler: Any = grpc.stream_stream_rpc_method_handler(stream)
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(method[0].strip("/"), {method[1]: handler})]
        )
        credentials = grpc.ssl_server_credentials(
            [(tls.key_pem, tls.cert_pem)], root_certificates=tls.ca_pem, require_client_auth=True
        )
        port = server.add_secure_port("127.0.0.1:0", credentials)
        await server.start()
        out.put(port)
        await server.wait_for_termination()

    asyncio.run(serve())


def _rss_kb(pid: int) -> int:
    return _proc_fields(pid, "status").get("VmRSS", 0)


def _fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def _verdict(figure: dict[str, Any]) -> str:
    return "PASS" if figure["pass"] else "FAIL"


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Options:
    devices: int
    idle: int
    slow: int
    generators: int
    batch: int
    interval: float
    duration: float
    json_path: Path | None
    keep: bool
    connect_deadline: float = 600.0
    phases: tuple[str, ...] = ("floor", "idle", "slow", "soak")
    stream_idle: float = 20.0


class Bench:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.db = PrivateDatabase("stopcovid-bench-conn-")
        self.settings = self.db.settings
        self.devices: list[DeviceCred] = []
        self.tokens: list[str] = []
        self.risky: list[str] = []
        self.ca_pem = b""
        self.ctx = mp.get_context("spawn")
        self.figures: dict[str, Any] = {}
        self.target = ""

    def setup(self) -> None:
        began = time.monotonic()
        self.db.start()
        self.settings = self.db.settings
        cas = setup.ensure_pki(self.settings)
        self.ca_pem = (self.settings.pki_dir / "ca.pem").read_bytes()
        current, token_keys = self.db.keystore.token_keys()
        tokens = PersonalTokens(current, token_keys, self.settings.token_window_s)
        self.tokens = [tokens.issue_static(uuid.uuid4()) for _ in range(1000)]
        risky_people = [uuid.uuid4() for _ in range(1000)]
        self.risky = [tokens.issue_static(p) for p in risky_people]
        venue = uuid.uuid4()
        rows = []
        count = max(self.opts.devices, 2 * self.opts.idle + self.opts.slow + 5 * _WARM)
        for i in range(count):
            device_id = uuid.uuid4()
            issued = cas.devices.issue_client(str(device_id), "ROLE_DEVICE")
            cert = x509.load_pem_x509_certificate(issued.certificate_pem)
            self.devices.append(
                DeviceCred(str(device_id), issued.chain_pem, issued.private_key_pem)
            )
            rows.append(
                (
                    device_id,
                    venue,
                    f"scanner {i}",
                    f"{cert.serial_number:x}",
                    cert.not_valid_after_utc,
                )
            )
        asyncio.run(self._insert(venue, rows, risky_people))
        print(
            f"setup: {count} devices with their own certificates, {time.monotonic() - began:.0f}s"
        )

    async def _insert(
        self, venue: uuid.UUID, rows: list[tuple[Any, ...]], risky: list[uuid.UUID]
    ) -> None:
        conn = await asyncpg.connect(**db.connect_args(self.settings, db.MIGRATOR).kwargs())
        try:
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO venues (venue_id, display_name, setting, region_code, capacity,"
                    " created_by) VALUES ($1, 'Bench Market', 'indoor', 'KH-12', 100000, 'bench')",
                    venue,
                )
                await conn.executemany(
                    "INSERT INTO devices (device_id, venue_id, display_name, certificate_serial,"
                    " certificate_expire_time, created_by) VALUES ($1, $2, $3, $4, $5, 'bench')",
                    rows,
                )
                await conn.executemany(
                    "INSERT INTO risk_status (person_id, level, expire_time)"
                    " VALUES ($1, 'high', now() + interval '1 day')",
                    [(p,) for p in risky],
                )
        finally:
            await conn.close()

    def _spawn(
        self, mode: str, devices: list[DeviceCred], tokens: list[str], **extra: Any
    ) -> tuple[list[Any], Any, Any, Any]:
        ready, release, out = self.ctx.Queue(), self.ctx.Event(), self.ctx.Queue()
        per = max(1, -(-len(devices) // self.opts.generators))
        procs = []
        for start in range(0, len(devices), per):
            spec = GenSpec(
                mode, self.target, self.ca_pem, devices[start : start + per], tokens, **extra
            )
            proc = self.ctx.Process(target=_generator, args=(spec, ready, release, out))
            proc.start()
            procs.append(proc)
        return procs, ready, release, out

    def _wait_opened(self, procs: list[Any], ready: Any, timeout: float) -> int:
        opened, deadline = 0, time.monotonic() + timeout
        for _ in procs:
            opened += ready.get(timeout=max(1.0, deadline - time.monotonic()))
        return opened

    def _collect(self, procs: list[Any], out: Any) -> GenResult:
        total = GenResult()
        for _ in procs:
            part: GenResult = out.get(timeout=120)
            total.opened += part.opened
            total.retries += part.retries
            total.retried.update(part.retried)
            total.batches += part.batches
            total.acked_scans += part.acked_scans
            total.latencies += part.latencies
            total.errors.update(part.errors)
            total.cpu_seconds += part.cpu_seconds
        for proc in procs:
            proc.join(timeout=30)
        return total

    def _settle(self, pid: int) -> int:
        """The server's RSS once it stopped moving (allocator and gRPC settle)."""
        last = _rss_kb(pid)
        for _ in range(10):
            time.sleep(0.5)
            now = _rss_kb(pid)
            if abs(now - last) < 256:
                return now
            last = now
        return last

    def floor_phase(self) -> None:
        """The idle phase against a bare grpcio server (see the module docstring)."""
        options = server_options(self.settings)
        port_q = self.ctx.Queue()
        proc = self.ctx.Process(
            target=_floor_serve,
            args=(TlsMaterial.from_settings(self.settings), options, self.opts.stream_idle, port_q),
        )
        proc.start()
        try:
            self.target = f"localhost:{port_q.get(timeout=60)}"
            assert proc.pid is not None
            self._warm(self._take(_WARM))
            self.idle_phase(proc.pid, self._take(self.opts.idle), figure="floor")
        finally:
            proc.kill()
            proc.join(10)

    def _take(self, count: int) -> list[DeviceCred]:
        return [next(self._unused) for _ in range(count)]

    def run(self) -> None:
        self.setup()
        self.db.processes.worker()
        devices = self._unused = iter(self.devices)
        if "floor" in self.opts.phases:
            self.floor_phase()
        phases: dict[str, Callable[[int], None]] = {
            "idle": lambda pid: self.idle_phase(
                pid, [next(devices) for _ in range(self.opts.idle)]
            ),
            "slow": lambda pid: self.slow_phase(
                pid, [next(devices) for _ in range(self.opts.slow)]
            ),
            "soak": lambda pid: self.soak_phase(pid, self.devices[: self.opts.devices]),
        }
        for name, phase in phases.items():
            if name in self.opts.phases:
                # A server of its own per phase: memory an earlier phase freed would
                # otherwise be reused and hide what this one costs.
                # idle: a short idle limit, so that the phase sees it. soak: none,
                # since its devices hold their streams, sending nothing, until the
                # last one is connected (a ramp that may take minutes), and its
                # figures are for every stream open at once.
                idle_s = {"idle": f"{self.opts.stream_idle:g}", "soak": "0"}.get(name)
                server = self.db.processes.server(
                    "checkin",
                    port=0,
                    name=f"checkin-{name}",
                    env=None if idle_s is None else {"STOPCOVID_STREAM_IDLE_S": idle_s},
                )
                assert server.port is not None
                self.target = f"localhost:{server.port}"
                self._warm([next(devices) for _ in range(_WARM)])
                if name == "slow":
                    # What the first batches cost once (caches, statements, the
                    # group commit's buffers) is not what a slow reader costs.
                    self._warm([next(devices) for _ in range(_WARM)], "busy", self.risky)
                phase(server.pid)
                self.db.processes.stop_child(server)

    def _warm(
        self, devices: list[DeviceCred], mode: str = "idle", tokens: list[str] | None = None
    ) -> None:
        """Open and close a few streams (first stream, caches, TLS), so that the
        figures are what more connections cost, not what the first one does; "busy":
        streams that send their window of batches and read every ack."""
        procs, ready, release, out = self._spawn(mode, devices, tokens or self.tokens)
        self._wait_opened(procs, ready, 60)
        release.set()
        self._collect(procs, out)

    def idle_phase(self, pid: int, devices: list[DeviceCred], figure: str = "idle") -> None:
        before, fds_before = self._settle(pid), _fds(pid)
        idled_q = self.ctx.Queue()
        began = time.monotonic()
        procs, ready, release, out = self._spawn("idle", devices, self.tokens, idled=idled_q)
        opened = self._wait_opened(procs, ready, 120)
        streams, fds_streams = self._settle(pid), _fds(pid)
        if time.monotonic() - began >= self.opts.stream_idle:
            print("idle: the streams were measured after the first idle ends; raise --stream-idle")
        # The server's idle limit ends every stream; the devices keep their connections.
        idled = self._wait_opened(procs, idled_q, 120 + self.opts.stream_idle)
        quiet, fds_quiet = self._settle(pid), _fds(pid)
        release.set()
        result = self._collect(procs, out)
        per_stream = (streams - before) / max(1, opened)
        per = (quiet - before) / max(1, idled)
        self.figures[figure] = {
            "devices": len(devices),
            "opened": opened,
            "ended_idle": idled,
            "stream_idle_s": self.opts.stream_idle,
            "rss_before_mb": round(before / 1024, 1),
            "rss_streams_open_mb": round(streams / 1024, 1),
            "rss_connections_only_mb": round(quiet / 1024, 1),
            "kb_per_idle_stream": round(per_stream, 1),
            "kb_per_idle_device_connection": round(per, 1),
            "bound_kb": BOUND_IDLE_KB,
            "pass": opened == idled == len(devices) and per <= BOUND_IDLE_KB,
            "fds_per_device": round((fds_quiet - fds_before) / max(1, idled), 2),
            "fds_per_stream": round((fds_streams - fds_before) / max(1, opened), 2),
            "errors": dict(result.errors),
        }
        floor = self.figures.get("floor") if figure == "idle" else None
        ratios = ""
        if floor:
            stream_ratio = per_stream / max(floor["kb_per_idle_stream"], 1e-9)
            connection_ratio = per / max(floor["kb_per_idle_device_connection"], 1e-9)
            self.figures[figure]["stream_vs_floor"] = round(stream_ratio, 2)
            self.figures[figure]["connection_vs_floor"] = round(connection_ratio, 2)
            ratios = f" [x{stream_ratio:.2f} and x{connection_ratio:.2f} the floor]"
        print(
            f"{figure}: {opened} streams open, {per_stream:.1f} KB each; after the server's "
            f"idle end ({self.opts.stream_idle:g} s), {idled} connections held, {per:.1f} KB "
            f"each (bound {BOUND_IDLE_KB} KB): {_verdict(self.figures[figure])}{ratios}",
            flush=True,
        )

    def slow_phase(self, pid: int, devices: list[DeviceCred]) -> None:
        before = self._settle(pid)
        procs, ready, _release, _out = self._spawn("slow", devices, self.risky)
        opened = self._wait_opened(procs, ready, 60)
        time.sleep(2.0)  # let every window's batches arrive and be decided
        for proc in procs:
            os.kill(proc.pid, signal.SIGSTOP)
        held = self._settle(pid)
        peak = _rss_kb(pid)
        for proc in procs:
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(timeout=10)
        per = (max(held, peak) - before) / max(1, opened)
        self.figures["slow"] = {
            "devices": len(devices),
            "opened": opened,
            "rss_before_mb": round(before / 1024, 1),
            "rss_held_mb": round(held / 1024, 1),
            "kb_per_slow_reader": round(per, 1),
            "bound_kb": BOUND_SLOW_KB,
            "pass": opened == len(devices) and per <= BOUND_SLOW_KB,
        }
        print(
            f"slow readers: {opened}, {per:.0f} KB each (bound {BOUND_SLOW_KB} KB): "
            f"{_verdict(self.figures['slow'])}",
            flush=True,
        )

    def soak_phase(self, pid: int, devices: list[DeviceCred]) -> None:
        opts = self.opts
        began = time.monotonic()
        cpu_began = _cpu_seconds(pid)
        procs, ready, release, out = self._spawn(
            "soak",
            devices,
            self.tokens,
            batch=opts.batch,
            interval=opts.interval,
            duration=opts.duration,
            connect_deadline=opts.connect_deadline,
        )
        samples: list[tuple[float, int, int]] = []
        # Every device connects (each generator at most 200 a second), then all are
        # released at once and send, staggered over one interval.
        connected = 0
        for _ in procs:
            while True:
                samples.append((round(time.monotonic() - began, 1), _rss_kb(pid), _fds(pid)))
                try:
                    connected += ready.get(timeout=2.0)
                    break
                except queue.Empty:
                    continue
        ramp = time.monotonic() - began
        # What the openings cost the server, whatever else the machine was doing.
        connect_cpu = _cpu_seconds(pid) - cpu_began
        print(
            f"soak: {connected}/{len(devices)} connected in {ramp:.0f}s, server CPU "
            f"{1e3 * connect_cpu / max(1, connected):.2f} ms per opening",
            flush=True,
        )
        release.set()
        end_at = time.monotonic() + opts.duration + 5
        while time.monotonic() < end_at:
            samples.append((round(time.monotonic() - began, 1), _rss_kb(pid), _fds(pid)))
            time.sleep(2.0)
        result = self._collect(procs, out)
        rate = opts.batch * len(devices) / opts.interval
        p99 = _pct(result.latencies, 0.99)
        self.figures["soak"] = {
            "devices": len(devices),
            "generators": len(procs),
            "opened": result.opened,
            "bound_devices": len(devices),
            "pass": result.opened == len(devices),
            "connect_s": round(ramp, 1),
            "openings_per_s": round(connected / max(ramp, 1e-9), 1),
            "open_retries": result.retries,
            "open_retried_for": dict(result.retried.most_common(5)),
            "server_cpu_s_connecting": round(connect_cpu, 1),
            "server_cpu_ms_per_opening": round(1e3 * connect_cpu / max(1, connected), 2),
            "offered_scans_per_s": round(rate),
            "acked_scans_per_s": round(result.acked_scans / opts.duration),
            "ack_p50_ms": round(1e3 * (_pct(result.latencies, 0.5) or 0), 1),
            "ack_p99_ms": round(1e3 * (p99 or 0), 1),
            "rss_peak_mb": round(max(sample[1] for sample in samples) / 1024, 1),
            "fds_peak": max(sample[2] for sample in samples),
            "generator_cpu_s": round(result.cpu_seconds, 1),
            "errors": dict(result.errors.most_common(5)),
            "samples_s_rss_kb_fds": samples,
        }
        print(
            f"soak: {result.opened}/{len(devices)} devices, {rate:.0f} scans/s offered, "
            f"{result.acked_scans / opts.duration:.0f} acked/s, ack p99 "
            f"{1e3 * (p99 or 0):.0f} ms, server RSS peak "
            f"{max(sample[1] for sample in samples) / 1024:.0f} MB, "
            f"fds peak {max(sample[2] for sample in samples)}; {result.retries} openings "
            f"retried; devices connected (bound {len(devices)}): "
            f"{_verdict(self.figures['soak'])}",
            flush=True,
        )

    def close(self) -> None:
        self.db.close(keep=self.opts.keep)


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="bench.connections", description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=10_000, help="soak devices (10000)")
    parser.add_argument("--idle", type=int, default=1000, help="idle streams measured (1000)")
    parser.add_argument("--slow", type=int, default=20, help="slow readers measured (20)")
    parser.add_argument("--generators", type=int, default=4, help="load processes (4)")
    parser.add_argument("--batch", type=int, default=5, help="scans per soak batch (5)")
    parser.add_argument("--interval", type=float, default=25.0, help="s between batches (25)")
    parser.add_argument("--duration", type=float, default=60.0, help="soak seconds (60)")
    parser.add_argument(
        "--connect-deadline",
        type=float,
        default=600.0,
        help="s a device keeps reopening a stream that failed to open (600)",
    )
    parser.add_argument(
        "--stream-idle",
        type=float,
        default=20.0,
        help="idle: the server's STOPCOVID_STREAM_IDLE_S (20)",
    )
    parser.add_argument("--quick", action="store_true", help="1000 devices, 20 s soak")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument(
        "--phases",
        default="floor,idle,slow,soak",
        help="which phases run (floor,idle,slow,soak)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.devices, args.idle, args.duration, args.interval = 1000, 300, 20.0, 5.0
    return Options(
        args.devices,
        args.idle,
        args.slow,
        args.generators,
        args.batch,
        args.interval,
        args.duration,
        args.json,
        args.keep,
        args.connect_deadline,
        tuple(p.strip() for p in args.phases.split(",") if p.strip()),
        args.stream_idle,
    )


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = max(opts.devices, opts.idle + opts.slow) + _SPARE_FDS
    if soft < needed and hard >= needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))  # children inherit it
    elif soft < needed:
        print(f"ulimit -n is {soft} (hard {hard}); {needed} are needed", file=sys.stderr)
        return 2
    with clean_environment():
        bench = Bench(opts)
        try:
            bench.run()
        finally:
            bench.close()
    if opts.json_path is not None:
        opts.json_path.write_text(
            json.dumps(
                {"options": asdict(opts) | {"json_path": None}, **bench.figures},
                indent=2,
                default=str,
            )
        )
    print(
        json.dumps(
            {
                k: {n: v for n, v in f.items() if n != "samples_s_rss_kb_fds"}
                for k, f in bench.figures.items()
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
