"""CheckIn server and worker processes for tests: the process harness
(services/ops/harness.py), as `up` uses it, with the test's settings and JSON logs
in the test's directory; killed at the end whatever happens."""

from __future__ import annotations

import contextlib
import signal
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from subprocess import Popen, TimeoutExpired

from services.kernel.config import Settings
from services.ops.harness import Child, Harness
from tests.support.database import Query


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Fleet:
    """CheckIn servers on ports of the test's choosing and worker processes."""

    def __init__(self, settings: Settings, tmp: Path, **env: str) -> None:
        self.harness = Harness(settings, env={"STOPCOVID_LOG_FORMAT": "json", **env}, log_dir=tmp)

    def server(self, port: int, **env: str) -> Child:
        """A CheckIn server on `port`, once its health service answers."""
        return self.harness.server("checkin", port=port, name=f"checkin-{port}", env=env)

    def worker(self, query: Query | None = None, **env: str) -> Child:
        """A worker process; with `query`, once it has registered (its heartbeat)."""
        return self.harness.worker(env=env, ready=_registered(query))

    def kill(self, child: Child) -> None:
        """SIGKILL, like a crash."""
        self.harness.kill(child)

    def restart(self, child: Child, query: Query | None = None) -> Child:
        """The same process again: a server on its port, once it answers; a worker,
        with `query`, once it has registered."""
        return self.harness.restart(child, ready=_registered(query))

    def close(self) -> None:
        # What a test leaves running is killed: its stop proves nothing more.
        self.harness.stop(graceful=False)


def _registered(query: Query | None) -> Callable[[], bool] | None:
    """Whether one more worker has registered than now (a killed one leaves its row)."""
    if query is None:
        return None
    before = query("SELECT count(*) FROM worker_heartbeats")[0][0]
    return lambda: bool(query("SELECT count(*) FROM worker_heartbeats")[0][0] > before)


@contextlib.contextmanager
def fleet(settings: Settings, tmp: Path, **env: str) -> Iterator[Fleet]:
    running = Fleet(settings, tmp, **env)
    try:
        yield running
    finally:
        running.close()


@contextlib.contextmanager
def worker_process(settings: Settings, log_file: Path, **env: str) -> Iterator[Popen[bytes]]:
    """`python -m workers` as `up` starts it, logging JSON to `log_file` (a `.log`
    file), for a test that signals it itself; killed at the end if still running."""
    assert log_file.suffix == ".log", log_file
    processes = Harness(
        settings, env={"STOPCOVID_LOG_FORMAT": "json", **env}, log_dir=log_file.parent
    )
    try:
        yield processes.worker(name=log_file.stem).proc
    finally:
        processes.stop(graceful=False)


def stop_gracefully(proc: Popen[bytes], timeout: float = 30) -> int:
    """SIGTERM, then SIGKILL if it has not exited within `timeout`; its exit code."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except TimeoutExpired:
        proc.kill()
        return proc.wait()
