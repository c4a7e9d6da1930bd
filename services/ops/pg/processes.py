"""What the operating system says about a cluster's processes and ports: whether a
pid is a live postgres, its children, free loopback ports, and the lines of
`postmaster.pid` the server writes as it starts, becomes ready and stops.

Linux reads `/proc`; elsewhere the checks that need it answer conservatively.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from services.ops.pg.config import LOOPBACK


def pid_alive(pid: int) -> bool:
    """True if the process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass

    def running(stat: bytes) -> bool:
        state = stat.rpartition(b")")[2].split()
        return not state or state[0] not in (b"Z", b"X")

    return _judged_by_proc(pid, "stat", running)


def looks_like_postgres(pid: int) -> bool:
    return _judged_by_proc(pid, "cmdline", lambda c: b"postgres" in c or b"postmaster" in c)


def _judged_by_proc(pid: int, name: str, judge: Callable[[bytes], bool]) -> bool:
    """`judge` of /proc/<pid>/<name>. False when /proc shows no such process; True
    (the conservative answer) on a system without /proc or when the file cannot be
    read."""
    try:
        content = Path(f"/proc/{pid}/{name}").read_bytes()
    except FileNotFoundError:
        return not Path(f"/proc/self/{name}").exists()
    except OSError:
        return True
    return judge(content)


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc only; empty elsewhere)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if len(fields) > 1 and fields[1] == str(pid):
                found.append(int(entry.name))
    return found


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Postgres sets SO_REUSEADDR too, so TIME_WAIT leftovers do not block it.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


_EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST = 10_000  # below it: well-known and registered services (5432, 9450, ...)
_handed_out: set[int] = set()


def _ephemeral_start() -> int:
    """The first port the kernel gives outgoing connections (32768 by default)."""
    try:
        return int(_EPHEMERAL.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A loopback port nothing listens on now, for a server started soon after.

    Chosen below the kernel's ephemeral range: a port the kernel picks for a bind
    to port 0 comes from that range, and any outgoing connection (a client of
    etcd, of Postgres) may take it before the server binds it, which failed a
    Patroni start with "address in use". Outside the range only another listener
    can take it; never the same port twice in one process."""
    top = _ephemeral_start()
    if top - _LOWEST >= 1_000:
        rng = random.SystemRandom()
        for _ in range(200):
            port = rng.randrange(_LOWEST, top)
            if port not in _handed_out and _bindable(port):
                _handed_out.add(port)
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        chosen: int = sock.getsockname()[1]
    _handed_out.add(chosen)
    return chosen


def tcp_ready(port: int) -> bool:
    """Whether something accepts connections on the loopback port."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=1):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class PidFile:
    """The interesting lines of ``postmaster.pid``."""

    pid: int
    port: int | None
    status: str | None  # "starting", "ready", "stopping", "standby" (PostgreSQL >= 10)

    @classmethod
    def read(cls, path: Path) -> PidFile | None:
        try:
            lines = path.read_text().splitlines()
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            pid = int(lines[0])
        except (IndexError, ValueError):
            return None  # being written, or garbage
        port = int(lines[3]) if len(lines) > 3 and lines[3].strip().isdigit() else None
        status = lines[7].strip() if len(lines) > 7 and lines[7].strip() else None
        return cls(pid=abs(pid), port=port, status=status)
