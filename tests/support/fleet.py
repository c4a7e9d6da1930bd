"""CheckIn server and worker processes for one test, started as `up` starts them
(configured by environment variables only), killed at the end whatever happens."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from services.kernel.config import Settings
from tests.support.database import Query
from tests.support.servers import process_env
from tests.support.waits import wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Fleet:
    """CheckIn server and worker processes for one test; all killed at the end."""

    def __init__(self, settings: Settings, tmp: Path, **env: str) -> None:
        self.settings = settings
        self.tmp = tmp
        self.env = env
        self.procs: list[subprocess.Popen[bytes]] = []

    def _spawn(self, module: str, log_name: str, **env: str) -> subprocess.Popen[bytes]:
        with (self.tmp / log_name).open("ab") as log:  # the child keeps its own copy
            proc = subprocess.Popen(
                [sys.executable, "-m", module],
                env=process_env(self.settings, **self.env, **env),
                stdout=log,
                stderr=log,
            )
        self.procs.append(proc)
        return proc

    def server(self, port: int, **env: str) -> subprocess.Popen[bytes]:
        """A CheckIn server on `port`, once it listens (it writes its port file)."""
        port_file = self.tmp / f"port-{port}"
        port_file.unlink(missing_ok=True)
        proc = self._spawn(
            "services.checkin",
            f"checkin-{port}.log",
            STOPCOVID_CHECKIN_PORT=str(port),
            STOPCOVID_PORT_FILE=str(port_file),
            **env,
        )
        wait_for(port_file.exists, what=f"checkin server on {port}")
        return proc

    def worker(self, query: Query | None = None, **env: str) -> subprocess.Popen[bytes]:
        """A worker process; with `query`, wait until it has registered (is up)."""
        before = query("SELECT count(*) FROM worker_heartbeats")[0][0] if query else 0
        proc = self._spawn("workers", "workers.log", **env)
        if query is not None:
            wait_for(
                lambda: query("SELECT count(*) FROM worker_heartbeats")[0][0] > before,
                what="the worker to start",
            )
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


@contextlib.contextmanager
def fleet(settings: Settings, tmp: Path, **env: str) -> Iterator[Fleet]:
    running = Fleet(settings, tmp, **env)
    try:
        yield running
    finally:
        running.close()
