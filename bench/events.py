"""What happened inside a measured window, to explain its slow seconds: Postgres's
checkpoints, autovacuum and analyze runs and slow statements (from its log), and
the CheckIn server's garbage-collection pauses and commit retries (from its
JSON log). Each event is placed at its second of the window, so it can be read
against the acknowledged-scans timeline.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

DIAGNOSTIC_SETTINGS = {
    "log_checkpoints": "on",
    "log_autovacuum_min_duration": "0",
    "log_min_duration_statement": "250",
}
"""Postgres settings the benchmark turns on in its private cluster."""

# "2026-12-01 19:03:12.345 UTC [1234] ..." (log_line_prefix '%m [%p] %q%u@%d ')
_PG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) UTC \[\d+\] (.*)$")
_KINDS = (
    ("checkpoint starting", "checkpoint start"),
    ("checkpoint complete", "checkpoint end"),
    ("automatic vacuum of table", "autovacuum"),
    ("automatic analyze of table", "autoanalyze"),
    ("duration: ", "slow statement"),
)


@dataclass(frozen=True)
class Event:
    second: float
    """Seconds since the start of the measured window."""
    kind: str
    detail: str


async def enable(superuser_dsn: str) -> None:
    conn = await asyncpg.connect(superuser_dsn)
    try:
        for name, value in DIAGNOSTIC_SETTINGS.items():
            await conn.execute(f"ALTER SYSTEM SET {name} = '{value}'")
        await conn.execute("SELECT pg_reload_conf()")
    finally:
        await conn.close()


def _detail(kind: str, text: str) -> str:
    if kind == "slow statement":
        found = re.search(r"duration: ([\d.]+) ms\s+(?:statement|execute [^:]*): (.{0,40})", text)
        return f"{float(found[1]):,.0f} ms {found[2].strip()}" if found else text[:60]
    if kind in ("autovacuum", "autoanalyze"):
        found = re.search(r'table "([^"]+)"', text)
        elapsed = re.search(r"elapsed: ([\d.]+) s", text)
        return (found[1] if found else "?") + (f", {elapsed[1]} s" if elapsed else "")
    if kind == "checkpoint end":
        found = re.search(r"wrote (\d+) buffers.*total=([\d.]+) s", text)
        return f"{found[1]} buffers, {found[2]} s" if found else ""
    return ""


def postgres(log: Path, start: float, end: float) -> list[Event]:
    """Events of the Postgres log between two wall-clock times (time.time())."""
    events: list[Event] = []
    if not log.exists():
        return events
    for line in log.read_text(errors="replace").splitlines():
        found = _PG_LINE.match(line)
        if not found:
            continue
        at = dt.datetime.strptime(found[1], "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=dt.UTC)
        moment = at.timestamp()
        if not start <= moment <= end:
            continue
        text = found[2]
        for needle, kind in _KINDS:
            if needle in text:
                events.append(Event(moment - start, kind, _detail(kind, text)))
                break
    return events


def server(log: Path, start: float, end: float) -> list[Event]:
    """The CheckIn server's pauses and commit trouble between two wall-clock times."""
    events: list[Event] = []
    if not log.exists():
        return events
    for line in log.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        name = record.get("event", "")
        if name not in ("gc_pause", "group_commit_retry", "group_commit_to_inbox"):
            continue
        stamp = record.get("timestamp")
        if not isinstance(stamp, str):
            continue
        moment = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
        if start <= moment <= end:
            detail = (
                f"gen {record.get('generation')}, {record.get('ms')} ms"
                if name == "gc_pause"
                else str(record.get("error_type", ""))
            )
            events.append(Event(moment - start, name.replace("_", " "), detail))
    return events


def render(events: list[Event], limit: int = 12) -> list[str]:
    """A line per kind (count, when), and the slowest few statements."""
    if not events:
        return ["events: none (no checkpoint, autovacuum, slow statement or pause)"]
    by_kind: dict[str, list[Event]] = {}
    for e in events:
        by_kind.setdefault(e.kind, []).append(e)
    lines = []
    for kind, found in sorted(by_kind.items()):
        at = ", ".join(
            f"{e.second:.0f}s" + (f" ({e.detail})" if e.detail else "") for e in found[:limit]
        )
        more = f", ... ({len(found)} in all)" if len(found) > limit else ""
        lines.append(f"events: {kind} x{len(found)}: {at}{more}")
    return lines
