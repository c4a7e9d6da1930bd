"""How an embedded cluster's server runs: its settings (durability on, always), the
environment its binaries get, where it listens, and how long each step may take.

The server listens on 127.0.0.1 only, on a unix socket in the state directory
when the path fits, and authenticates with SCRAM-SHA-256. Durability settings
(`fsync`, `full_page_writes`, `synchronous_commit`) stay on: crash tests rely on
them.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Final, Literal

import structlog

log = structlog.get_logger()

StopMode = Literal["smart", "fast", "immediate"]

LOOPBACK: Final = "127.0.0.1"

#: Server settings applied on every start (``-c name=value``); callers may override or extend them.
DEFAULT_SETTINGS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "max_connections": "200",
        "shared_buffers": "256MB",
        # Durability stays on, explicitly, so a stray postgresql.conf edit cannot turn it off.
        "fsync": "on",
        "full_page_writes": "on",
        "synchronous_commit": "on",
        # Fewer checkpoints: the store's indexes take random inserts (pseudonyms,
        # venues), and each checkpoint makes the next write to every such page log
        # the whole page. Measured with `./dev bench checkin`; costs crash-recovery
        # time and disk for WAL, not durability.
        "max_wal_size": "8GB",
        "checkpoint_timeout": "15min",
        "TimeZone": "UTC",
        "log_timezone": "UTC",
        "log_line_prefix": "%m [%p] %q%u@%d ",
    }
)

START_TIMEOUT: Final = 60.0
STOP_TIMEOUT: Final = 60.0
KILL_TIMEOUT: Final = 10.0
POLL: Final = 0.02
PORT_ATTEMPTS: Final = 3
# sockaddr_un.sun_path is 108 bytes on Linux, including the terminating NUL.
_MAX_SOCKET_PATH: Final = 107
STOP_SIGNALS: Final[Mapping[str, signal.Signals]] = MappingProxyType(
    {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}
)


def child_env() -> dict[str, str]:
    """Environment for initdb/postgres: no libpq variables (PGDATA, PGPORT...), C locale."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


def server_args(settings: Mapping[str, str], port: int, socket_dir: Path) -> list[str]:
    """The postmaster's `-c name=value` arguments: `settings`, then where it listens."""
    chosen = dict(settings)
    chosen["listen_addresses"] = LOOPBACK
    chosen["port"] = str(port)
    chosen["logging_collector"] = "off"
    socket_path = socket_dir / f".s.PGSQL.{port}"
    if len(os.fsencode(socket_path)) <= _MAX_SOCKET_PATH - 1:
        chosen["unix_socket_directories"] = f'"{socket_dir}"'
        chosen["unix_socket_permissions"] = "0700"
    else:
        log.warning("pg_unix_socket_disabled", reason="path too long", path=str(socket_path))
        chosen["unix_socket_directories"] = ""
    args: list[str] = []
    for name, value in chosen.items():
        args += ["-c", f"{name}={value}"]
    return args
