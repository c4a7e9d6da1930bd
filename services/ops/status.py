"""`stopcovid status`: a running installation's key figures in the terminal, read
from the processes' metrics endpoints, for an operator without a Prometheus.

It reads every endpoint twice, `interval` seconds apart: rates (scans and RPCs per
second, ingest) come from the difference, levels (inbox lag, open streams, ages)
from the second reading. `--watch` keeps reading and redraws. Endpoints are the
configured metrics ports on `STOPCOVID_METRICS_HOST` (what `up` uses), or those
given with `--endpoint name=host:port`. The exit code is 1 when an endpoint does
not answer.
"""

from __future__ import annotations

import math
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, Group
from rich.table import Table

from services.kernel.config import PROCESSES, Settings

Labels = frozenset[tuple[str, str]]


@dataclass
class Reading:
    """One endpoint's samples at one moment (None: it did not answer)."""

    at: float
    samples: dict[str, dict[Labels, float]] | None
    error: str = ""

    def value(self, name: str, **labels: str) -> float:
        """The sum of `name`'s samples whose labels include `labels`."""
        if self.samples is None:
            return 0.0
        want = set(labels.items())
        return sum(v for k, v in self.samples.get(name, {}).items() if want <= k)

    def by(self, name: str, label: str) -> dict[str, float]:
        """`name`'s samples summed by one label's value."""
        out: dict[str, float] = defaultdict(float)
        for labels, v in (self.samples or {}).get(name, {}).items():
            out[dict(labels).get(label, "")] += v
        return dict(out)

    def has(self, name: str) -> bool:
        return bool((self.samples or {}).get(name))


def read(endpoint: str, timeout: float = 2.0) -> Reading:
    """The samples `http://endpoint/metrics` serves now."""
    at = time.time()
    try:
        with urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=timeout) as reply:
            text = reply.read().decode()
    except OSError as exc:
        return Reading(at, None, type(exc).__name__)
    samples: dict[str, dict[Labels, float]] = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name][frozenset(sample.labels.items())] = sample.value
    return Reading(at, dict(samples))


@dataclass
class Figures:
    """What the view shows, from two readings per process."""

    processes: list[tuple[str, str, Reading, Reading]] = field(default_factory=list)

    def _pairs(self) -> Iterable[tuple[Reading, Reading]]:
        return ((a, b) for _, _, a, b in self.processes if b.samples is not None)

    def rate(self, name: str, **labels: str) -> float:
        total = 0.0
        for a, b in self._pairs():
            if a.samples is not None and b.at > a.at:
                total += max(0.0, b.value(name, **labels) - a.value(name, **labels)) / (b.at - a.at)
        return total

    def total(self, name: str, **labels: str) -> float:
        return sum(b.value(name, **labels) for _, b in self._pairs())

    def highest(self, name: str) -> float | None:
        found = [b.value(name) for _, b in self._pairs() if b.has(name)]
        return max(found) if found else None

    def lowest(self, name: str, **labels: str) -> float | None:
        found = [
            v
            for _, b in self._pairs()
            for k, v in (b.samples or {}).get(name, {}).items()
            if set(labels.items()) <= k
        ]
        return min(found) if found else None

    def mean(self, name: str) -> float | None:
        """The mean of a histogram's observations between the two readings."""
        count = self.rate(f"{name}_count")
        return self.rate(f"{name}_sum") / count if count else None

    def by(self, name: str, label: str) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for _, b in self._pairs():
            for key, v in b.by(name, label).items():
                out[key] += v
        return dict(out)

    @property
    def now(self) -> float:
        return max((b.at for _, _, _, b in self.processes), default=time.time())


def gather(endpoints: Mapping[str, str], interval: float) -> Figures:
    first = {name: read(where) for name, where in endpoints.items()}
    time.sleep(interval)
    figures = Figures()
    for name, where in endpoints.items():
        figures.processes.append((name, where, first[name], read(where)))
    return figures


def _age(now: float, stamp: float | None) -> str:
    if stamp is None or stamp <= 0:
        return "never"
    seconds = max(0.0, now - stamp)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _n(value: float | None, unit: str = "", digits: int = 0) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:,.{digits}f}{unit}"


def render(figures: Figures) -> Group:
    now = figures.now
    procs = Table(title="Processes", title_justify="left")
    for column in ("process", "metrics", "state", "up for", "RPCs/s", "RPC errors/s"):
        procs.add_column(column)
    for name, where, a, b in figures.processes:
        if b.samples is None:
            procs.add_row(name, where, f"[red]down ({b.error})[/red]", "-", "-", "-")
            continue
        started = b.value("process_start_time_seconds") or None
        single = Figures([(name, where, a, b)])
        errors = sum(
            single.rate("grpc_server_handled_total", grpc_code=code)
            for code in ("UNKNOWN", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "DEADLINE_EXCEEDED")
        )
        procs.add_row(
            name,
            where,
            "[green]up[/green]",
            _age(now, started).removesuffix(" ago") if started else "-",
            _n(single.rate("grpc_server_started_total"), digits=1),
            _n(errors, digits=2),
        )

    key = Table(title="Key figures", title_justify="left", show_header=False)
    key.add_column("figure")
    key.add_column("value")

    def row(label: str, value: str) -> None:
        key.add_row(label, value)

    scans = "stopcovid_checkin_scans_total"
    row(
        "scans/s admitted, denied, rejected",
        ", ".join(
            _n(figures.rate(scans, outcome=o), digits=1) for o in ("admitted", "denied", "rejected")
        ),
    )
    row("scans decided (since start)", _n(figures.total(scans)))
    row("open streams", _n(figures.total("stopcovid_checkin_open_streams")))
    row("ack latency (mean)", _n(_ms(figures.mean("stopcovid_checkin_ack_seconds")), " ms", 1))
    row(
        "group commit (mean time, rows)",
        f"{_n(_ms(figures.mean('stopcovid_checkin_group_commit_seconds')), ' ms', 1)}, "
        f"{_n(figures.mean('stopcovid_checkin_group_commit_rows'), digits=0)}",
    )
    row(
        "inbox lag (rows, oldest)",
        f"{_n(figures.highest('stopcovid_checkin_inbox_lag_rows'))}, "
        f"{_n(figures.highest('stopcovid_checkin_inbox_lag_seconds'), ' s', 1)}",
    )
    row(
        "ingest rows/s (stored, duplicates)",
        f"{_n(figures.rate('stopcovid_ingest_rows_total', result='stored'), digits=1)}, "
        f"{_n(figures.rate('stopcovid_ingest_rows_total', result='duplicate'), digits=1)}",
    )
    row(
        "caches last reloaded",
        _age(now, figures.lowest("stopcovid_checkin_cache_last_reload_timestamp_seconds")),
    )
    row("traces by state", _counts(figures.by("stopcovid_traces_by_state", "state"), "-"))
    row(
        "notifications (due, oldest waiting, failed)",
        f"{_n(figures.highest('stopcovid_notifications_due'))}, "
        f"{_n(figures.highest('stopcovid_notification_lag_seconds'), ' s')}, "
        f"{_n(figures.total('stopcovid_notifications_total', state='failed'))}",
    )
    row(
        "expiry last succeeded",
        _age(now, figures.highest("stopcovid_expiry_last_success_timestamp_seconds")),
    )
    row("grant refusals", _counts(figures.by("stopcovid_grant_refusals_total", "reason"), "0"))
    expiry = figures.lowest("stopcovid_certificate_expiry_timestamp_seconds")
    row(
        "nearest certificate expiry",
        "-" if expiry is None else f"{(expiry - now) / 86400:.0f} days",
    )
    verified = figures.by("stopcovid_audit_chain_last_verification_timestamp_seconds", "result")
    if verified:
        result, stamp = max(verified.items(), key=lambda kv: kv[1])
        row("audit chain last verified", f"{_age(now, stamp)} ({result})")
    else:
        row("audit chain last verified", "not since these processes started")
    return Group(procs, key)


def _counts(by_label: dict[str, float], empty: str) -> str:
    """A figure per label value, `value count` in label order; `empty` when none."""
    return ", ".join(f"{k} {v:.0f}" for k, v in sorted(by_label.items())) or empty


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def endpoints_of(settings: Settings, given: list[str]) -> dict[str, str]:
    """`name=host:port` arguments, or every configured process."""
    if given:
        pairs = [g.split("=", 1) if "=" in g else [g, g] for g in given]
        return {name: where for name, where in pairs}
    return {name: f"{settings.metrics_host}:{settings.metrics_ports[name]}" for name in PROCESSES}


def run(settings: Settings, given: list[str], interval: float, watch: bool) -> int:
    endpoints = endpoints_of(settings, given)
    console = Console()
    if not watch:
        figures = gather(endpoints, interval)
        console.print(render(figures))
        return 0 if all(b.samples is not None for _, _, _, b in figures.processes) else 1
    from rich.live import Live  # noqa: PLC0415 (only the watch needs it)

    with Live(console=console, auto_refresh=False) as live:
        try:
            while True:
                live.update(render(gather(endpoints, interval)), refresh=True)
        except KeyboardInterrupt:
            return 0
