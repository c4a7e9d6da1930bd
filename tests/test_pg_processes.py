"""What the operating system says about a pid (services/ops/pg/processes.py), on real
processes: alive, a zombie, reaped; running postgres or something else."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.ops.pg import processes
from services.ops.pg.processes import looks_like_postgres, pid_alive
from tests.support.waits import wait_for

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc, which only Linux has"
)


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "300"])
    yield proc
    proc.kill()
    proc.wait()


def _state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    return stat.rpartition(b")")[2].split()[0].decode()


def test_a_running_process_is_alive(sleeper: subprocess.Popen[bytes]) -> None:
    assert pid_alive(os.getpid())
    assert pid_alive(sleeper.pid)


def test_a_zombie_and_a_reaped_process_are_not() -> None:
    proc = subprocess.Popen(["true"])
    wait_for(lambda: _state(proc.pid) == "Z", timeout=30, what="the child to exit unreaped")
    assert not pid_alive(proc.pid)
    proc.wait()
    assert not pid_alive(proc.pid)


def test_postgres_is_told_by_its_command_line(sleeper: subprocess.Popen[bytes]) -> None:
    named = subprocess.Popen(["bash", "-c", "exec -a postgres sleep 300"])
    try:
        wait_for(
            lambda: Path(f"/proc/{named.pid}/cmdline").read_bytes().startswith(b"postgres\0"),
            timeout=30,
            what="the exec under the name postgres",
        )
        assert looks_like_postgres(named.pid)
        assert not looks_like_postgres(sleeper.pid)
    finally:
        named.kill()
        named.wait()
    assert not looks_like_postgres(named.pid)  # gone: /proc has no such pid


def test_a_free_port_is_below_the_ephemeral_range_bindable_and_never_given_twice() -> None:
    """Outgoing connections take ports from the ephemeral range, so a port chosen
    there can be taken before its server binds it (a Patroni start failed so)."""
    start = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [processes.free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    assert all(10_000 <= port < start for port in ports)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", ports[-1]))  # free when handed out
