"""Simulated venue scanner devices: load, and proof that nothing is lost on the way.

    python -m services.ops.simulator --pki-dir .stopcovid/pki --devices 8 --rate 5000 --duration 30

Sets up its own synthetic world through the public API, the way real operators would:
venues (VenueService.CreateVenue) and devices with their certificates
(VenueService.RegisterDevice) as dev-venue-operator, and people enrolled with
synthetic +855 99 numbers from a seeded RNG (CheckInService.EnrollPerson, both
steps: the one-time code is read from the file the dev stack's file sender writes,
`--codes-file`) as dev-registrar. Then each device runs a `DeviceClient` over its own
scan buffer, fed at its share of the target rate, with a live view of what the
platform answers.

At the end it drains every device: the exit status is 1 if any scan recorded was not
acknowledged (lost), or a device stopped on a fatal error, so a CI job can run it.
Buffers are durable SQLite files in a temporary directory unless `--volatile-buffers`
says to keep them in memory (for load runs that must measure the server, not this disk).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from rich.console import Console
from rich.live import Live
from rich.table import Table
from stopcovid.checkin.v1 import checkin_service_pb2 as cpb
from stopcovid.client.buffer import ScanBuffer
from stopcovid.client.checkin import AsyncCheckInClient
from stopcovid.client.config import ClientConfig
from stopcovid.client.device import BatchAck, DeviceClient, DeviceStats
from stopcovid.client.errors import StopCovidError
from stopcovid.client.venue import AsyncVenueClient
from stopcovid.common.v1 import common_pb2
from stopcovid.venue.v1 import venue_service_pb2 as vpb

from services.domain.people import verification

__all__ = ["SimulationReport", "SimulatorOptions", "main", "register_devices", "simulate"]

_TICK = 0.02
"""Seconds between a device's feeds: scans arrive in small bursts, as at a busy door."""


@dataclass(frozen=True)
class SimulatorOptions:
    """What to simulate and where. Field docs double as the command's help."""

    pki_dir: Path = Path(".stopcovid/pki")
    checkin_target: str = "localhost:50051"
    venue_target: str = "localhost:50052"
    devices: int = 4
    venues: int = 0
    """0: one venue per two devices."""
    people: int = 200
    rate: float = 1000.0
    """Target scans per second, all devices together."""
    duration: float = 10.0
    seed: int = 1
    exit_share: float = 0.3
    """Fraction of scans that are exits."""
    max_scans_per_batch: int | None = None
    volatile_buffers: bool = False
    buffer_dir: Path | None = None
    db_dsn: str | None = None
    """If set, the inbox lag (rows in scan_inbox) is shown, read once a second."""
    drain_timeout: float = 60.0
    codes_file: Path = Path(".stopcovid/notifications.jsonl")
    """Where the CheckIn server's file sender writes SMS: the enrollment codes are read
    there (EnrollPerson's second step)."""
    live: bool | None = None
    """None: a live display on a terminal (and not under CI), log lines otherwise."""


@dataclass
class SimulationReport:
    created: int = 0
    """Scans recorded by the simulated devices."""
    stats: DeviceStats = field(default_factory=DeviceStats)
    """All devices' counters added up."""
    elapsed: float = 0.0
    """Seconds from the first scan to the last ack (drain included)."""
    errors: list[str] = field(default_factory=list)
    """Fatal errors of devices, one line each."""
    latencies: list[float] = field(default_factory=list)

    @property
    def lost(self) -> int:
        return self.created - self.stats.acked

    @property
    def ok(self) -> bool:
        return self.lost == 0 and not self.errors


@dataclass
class _Device:
    config: ClientConfig
    buffer: ScanBuffer
    client: DeviceClient
    created: int = 0


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _total(devices: Sequence[_Device]) -> DeviceStats:
    total = DeviceStats()
    for d in devices:
        s = d.client.stats
        total.sent += s.sent
        total.resent += s.resent
        total.acked += s.acked
        total.outcomes.update(s.outcomes)
        total.reject_reasons.update(s.reject_reasons)
        total.batches_sent += s.batches_sent
        total.batches_acked += s.batches_acked
        total.connects += s.connects
        total.reconnects += s.reconnects
        total.flow_control_hints += s.flow_control_hints
        total.batch_shrinks += s.batch_shrinks
    return total


# -- setup ---------------------------------------------------------------------------------


async def register_devices(options: SimulatorOptions) -> list[ClientConfig]:
    """Create the venues and register the devices; return one config per device, with
    the certificate and key RegisterDevice returned (kept in memory only)."""
    operator = ClientConfig.from_pki_dir(
        options.venue_target, options.pki_dir, "dev-venue-operator"
    )
    venue_count = options.venues or max(1, (options.devices + 1) // 2)
    async with AsyncVenueClient(operator) as venues:
        made = await asyncio.gather(
            *(
                venues.rpc.CreateVenue(
                    vpb.CreateVenueRequest(
                        venue=vpb.Venue(
                            display_name=f"Simulated venue {i + 1}",
                            setting=vpb.VENUE_SETTING_INDOOR,
                            region_code="KH-12",
                        )
                    )
                )
                for i in range(venue_count)
            )
        )
        venue_ids = [m.venue.venue_id for m in made]
        registered = await asyncio.gather(
            *(
                venues.rpc.RegisterDevice(
                    vpb.RegisterDeviceRequest(
                        device=vpb.Device(
                            venue_id=venue_ids[i % venue_count],
                            display_name=f"Simulated door {i + 1}",
                        )
                    )
                )
                for i in range(options.devices)
            )
        )
    return [
        ClientConfig(
            target=options.checkin_target,
            ca_cert_pem=operator.ca_cert_pem,
            client_cert_pem=r.credential.certificate_pem.encode(),
            client_key_pem=r.credential.private_key_pem.encode(),
        )
        for r in registered
    ]


async def enroll_people(options: SimulatorOptions) -> list[str]:
    """Enroll synthetic people and return their static tokens. The numbers (+855 99
    xxxxxx, a range no real subscriber holds here) come from the seeded RNG, so a rerun
    with the same seed enrolls the same people again (EnrollPerson answers a number the
    registrar enrolled at once, with the same person)."""
    rng = random.Random(options.seed)  # noqa: S311 (synthetic data, not secrets)
    numbers = rng.sample(range(1_000_000), options.people)
    registrar = ClientConfig.from_pki_dir(options.checkin_target, options.pki_dir, "dev-registrar")
    limit = asyncio.Semaphore(32)
    async with AsyncCheckInClient(registrar) as checkin:

        async def enroll(number: int) -> str:
            async with limit:
                answer = await verification.enroll_reading_codes(
                    checkin.rpc.EnrollPerson,
                    cpb.EnrollPersonRequest(
                        phone_number=f"+85599{number:06d}",
                        consent_given=True,
                        consent_text_version="simulator-1",
                        language_code="km",
                    ),
                    options.codes_file,
                )
            return answer.personal_token.token

        return list(await asyncio.gather(*(enroll(n) for n in numbers)))


# -- the run -------------------------------------------------------------------------------


async def _feed(
    device: _Device,
    rate: float,
    tokens: Sequence[str],
    rng: random.Random,
    options: SimulatorOptions,
) -> None:
    """Record scans at `rate` per second until cancelled, in bursts every tick."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    entry, exit_ = common_pb2.SCAN_DIRECTION_ENTRY, common_pb2.SCAN_DIRECTION_EXIT
    while True:
        due = int((loop.time() - start) * rate) - device.created
        if due > 0:
            now = dt.datetime.now(dt.UTC)
            device.client.scan_many(
                (rng.choice(tokens), now, exit_ if rng.random() < options.exit_share else entry)
                for _ in range(due)
            )
            device.created += due
        await asyncio.sleep(_TICK)


class _Monitor:
    """Samples the devices once a second and shows rates, totals and latencies."""

    def __init__(self, devices: Sequence[_Device], options: SimulatorOptions, out: Console):
        self.devices = devices
        self.options = options
        self.out = out
        self.window: list[float] = []
        self.all_latencies: list[float] = []
        self.inbox: int | None = None
        self.phase = "running"
        self._last = (time.monotonic(), 0, 0, 0)
        self.rates = (0.0, 0.0, 0.0)

    def on_ack(self, ack: BatchAck) -> None:
        self.window.append(ack.latency)

    def sample(self) -> dict[str, str]:
        now = time.monotonic()
        stats = _total(self.devices)
        created = sum(d.created for d in self.devices)
        then, c0, s0, a0 = self._last
        span = max(1e-6, now - then)
        self.rates = (
            (created - c0) / span,
            (stats.sent - s0) / span,
            (stats.acked - a0) / span,
        )
        self._last = (now, created, stats.sent, stats.acked)
        latencies, self.window = self.window, []
        self.all_latencies.extend(latencies)
        backlog = sum(len(d.buffer) for d in self.devices)
        row = {
            "phase": self.phase,
            "scanned/s": f"{self.rates[0]:,.0f}",
            "sent/s": f"{self.rates[1]:,.0f}",
            "acked/s": f"{self.rates[2]:,.0f}",
            "acked": f"{stats.acked:,}",
            "rejected": f"{stats.outcomes['REJECTED']:,}",
            "denied": f"{stats.outcomes['DENIED']:,}",
            "duplicates": f"{stats.outcomes['DUPLICATE']:,}",
            "reconnects": f"{stats.reconnects:,}",
            "backlog": f"{backlog:,}",
            "ack p50 ms": f"{_percentile(latencies, 0.5) * 1000:.1f}",
            "ack p99 ms": f"{_percentile(latencies, 0.99) * 1000:.1f}",
        }
        if self.options.db_dsn:
            row["inbox lag"] = "?" if self.inbox is None else f"{self.inbox:,}"
        return row

    @staticmethod
    def table(row: dict[str, str]) -> Table:
        # One metric per line: readable on an 80-column terminal.
        table = Table(title="Stop COVID devices", show_header=False)
        table.add_column("metric")
        table.add_column("value", justify="right")
        for name, value in row.items():
            table.add_row(name, value)
        return table

    async def watch_inbox(self) -> None:
        """Rows waiting in scan_inbox, once a second: how far the workers lag behind."""
        import asyncpg  # noqa: PLC0415 (only with --db-dsn)

        conn = await asyncpg.connect(self.options.db_dsn)
        try:
            while True:
                self.inbox = int(await conn.fetchval("SELECT count(*) FROM scan_inbox"))
                await asyncio.sleep(1.0)
        finally:
            await conn.close()

    async def show(self, live: bool) -> None:
        if live:
            with Live(self.table(self.sample()), console=self.out, auto_refresh=False) as view:
                while True:
                    await asyncio.sleep(1.0)
                    view.update(self.table(self.sample()), refresh=True)
        else:
            while True:
                await asyncio.sleep(1.0)
                self.out.print(
                    " ".join(f"{k}={v.replace(',', '')}" for k, v in self.sample().items()),
                    markup=False,
                    highlight=False,
                    soft_wrap=True,
                )


def _wants_live(options: SimulatorOptions, out: Console) -> bool:
    if options.live is not None:
        return options.live
    return out.is_terminal and not os.environ.get("CI")


async def simulate(
    options: SimulatorOptions,
    *,
    device_configs: Sequence[ClientConfig] | None = None,
    tokens: Sequence[str] | None = None,
    out: TextIO | None = None,
) -> SimulationReport:
    """Run the simulation and return what happened. Devices and people are set up
    through the API unless given."""
    console = Console(file=out) if out is not None else Console()
    if device_configs is None:
        device_configs = await register_devices(options)
    if tokens is None:
        tokens = await enroll_people(options)
    with contextlib.ExitStack() as stack:
        if options.volatile_buffers:
            directory = None
        elif options.buffer_dir is not None:
            directory = options.buffer_dir
            directory.mkdir(parents=True, exist_ok=True)
        else:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sim-")))
        devices: list[_Device] = []
        monitor = _Monitor(devices, options, console)
        for i, config in enumerate(device_configs):
            buffer = stack.enter_context(
                ScanBuffer.volatile()
                if directory is None
                else ScanBuffer(directory / f"device-{options.seed}-{i}.db")
            )
            client = DeviceClient(
                config,
                buffer,
                on_ack=monitor.on_ack,
                max_scans_per_batch=options.max_scans_per_batch,
                rng=random.Random(options.seed * 7919 + i),  # noqa: S311
            )
            devices.append(_Device(config, buffer, client))
        return await _run(devices, monitor, options, tokens, console)


async def _run(
    devices: list[_Device],
    monitor: _Monitor,
    options: SimulatorOptions,
    tokens: Sequence[str],
    console: Console,
) -> SimulationReport:
    report = SimulationReport()
    per_device = options.rate / max(1, len(devices))
    background: list[asyncio.Task[None]] = []
    started = time.monotonic()
    try:
        for d in devices:
            await d.client.start()
        if options.db_dsn:
            background.append(asyncio.create_task(monitor.watch_inbox()))
        background.append(asyncio.create_task(monitor.show(_wants_live(options, console))))
        feeders = [
            asyncio.create_task(
                _feed(d, per_device, tokens, random.Random(options.seed + i), options)  # noqa: S311
            )
            for i, d in enumerate(devices)
        ]
        await asyncio.sleep(options.duration)
        for task in feeders:
            task.cancel()
        await asyncio.gather(*feeders, return_exceptions=True)
        monitor.phase = "draining"
        drains = await asyncio.gather(
            *(asyncio.wait_for(d.client.drain(), options.drain_timeout) for d in devices),
            return_exceptions=True,
        )
        for i, outcome in enumerate(drains):
            if isinstance(outcome, TimeoutError):
                report.errors.append(f"device {i}: not drained in {options.drain_timeout:.0f} s")
            elif isinstance(outcome, BaseException):
                report.errors.append(f"device {i}: {outcome}")
    finally:
        report.elapsed = time.monotonic() - started
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        for i, d in enumerate(devices):
            try:
                await d.client.close()
            except Exception as err:
                report.errors.append(f"device {i}: {err}")
    report.created = sum(d.created for d in devices)
    report.stats = _total(devices)
    report.latencies = monitor.all_latencies + monitor.window
    _summary(report, console)
    return report


def _summary(report: SimulationReport, console: Console) -> None:
    s = report.stats
    lines = [
        f"scans recorded {report.created:,}, acknowledged {s.acked:,}, lost {report.lost:,}",
        f"throughput {s.acked / max(report.elapsed, 1e-9):,.0f} acked scans/s over "
        f"{report.elapsed:.1f} s (drain included)",
        "outcomes " + ", ".join(f"{k} {v:,}" for k, v in sorted(s.outcomes.items())),
        f"sent {s.sent:,} in {s.batches_sent:,} batches (resent {s.resent:,}), "
        f"reconnects {s.reconnects}, flow-control hints {s.flow_control_hints}",
        f"batch ack latency p50 {_percentile(report.latencies, 0.5) * 1000:.1f} ms, "
        f"p99 {_percentile(report.latencies, 0.99) * 1000:.1f} ms",
    ]
    if s.reject_reasons:
        lines.append("rejected: " + ", ".join(f"{k} {v}" for k, v in s.reject_reasons.items()))
    lines.extend(f"error: {e}" for e in report.errors)
    lines.append("OK: every scan acknowledged" if report.ok else "FAILED: scans were lost")
    for line in lines:
        console.print(line, markup=False, highlight=False, soft_wrap=True)


# -- the command ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    d = SimulatorOptions()
    p = argparse.ArgumentParser(
        prog="python -m services.ops.simulator",
        description="Run simulated venue scanner devices against Stop COVID's CheckIn service.",
    )
    p.add_argument("--pki-dir", type=Path, default=d.pki_dir, help="dev certificates (ca.pem, ...)")
    p.add_argument("--checkin", default=d.checkin_target, help="CheckIn host:port")
    p.add_argument("--venue", default=d.venue_target, help="Venue host:port")
    p.add_argument("--devices", type=int, default=d.devices)
    p.add_argument("--venues", type=int, default=d.venues, help="0: one per two devices")
    p.add_argument("--people", type=int, default=d.people, help="synthetic people to enroll")
    p.add_argument("--rate", type=float, default=d.rate, help="scans/s, all devices together")
    p.add_argument("--duration", type=float, default=d.duration, help="seconds of scanning")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--exit-share", type=float, default=d.exit_share)
    p.add_argument("--batch", type=int, default=None, help="cap scans per batch")
    p.add_argument(
        "--volatile-buffers",
        action="store_true",
        help="keep scan buffers in memory (NOT durable; for load runs)",
    )
    p.add_argument("--buffer-dir", type=Path, default=None, help="where durable buffers go")
    p.add_argument("--db-dsn", default=None, help="Postgres DSN to show the inbox lag")
    p.add_argument("--drain-timeout", type=float, default=d.drain_timeout)
    p.add_argument(
        "--codes-file",
        type=Path,
        default=d.codes_file,
        help="the CheckIn server's file sender output, where enrollment codes are read",
    )
    view = p.add_mutually_exclusive_group()
    view.add_argument("--live", dest="live", action="store_true", default=None)
    view.add_argument("--plain", dest="live", action="store_false")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.devices < 1 or args.rate <= 0 or args.duration <= 0 or args.people < 1:
        _parser().error("--devices, --rate, --duration and --people must be positive")
    options = SimulatorOptions(
        pki_dir=args.pki_dir,
        checkin_target=args.checkin,
        venue_target=args.venue,
        devices=args.devices,
        venues=args.venues,
        people=args.people,
        rate=args.rate,
        duration=args.duration,
        seed=args.seed,
        exit_share=args.exit_share,
        max_scans_per_batch=args.batch,
        volatile_buffers=args.volatile_buffers,
        buffer_dir=args.buffer_dir,
        db_dsn=args.db_dsn,
        drain_timeout=args.drain_timeout,
        codes_file=args.codes_file,
        live=args.live,
    )
    try:
        report = asyncio.run(simulate(options))
    except KeyboardInterrupt:
        return 130
    except (StopCovidError, OSError) as err:
        # Setup failed (servers down, wrong PKI directory, an RPC refused): say so plainly.
        print(f"simulator: setup failed: {err}", file=sys.stderr)
        return 2
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
