"""The README's run command, for real: `stopcovid up` in its own process (run by the
process harness, as a supervisor under test), driven with the real grpcurl over
mutual TLS, then stopped with SIGTERM, or killed."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from services.kernel.config import PROCESSES, Settings
from services.ops import pg
from services.ops.harness import Child, ChildFailed, Harness
from tests.support.fleet import free_port
from tests.support.waits import wait_for

GRPCURL = Path(sys.executable).with_name("grpcurl")
SERVICES = {
    "checkin": "stopcovid.checkin.v1.CheckInService",
    "venue": "stopcovid.venue.v1.VenueService",
    "exposure": "stopcovid.exposure.v1.ExposureService",
    "retention": "stopcovid.retention.v1.RetentionService",
}


@dataclass
class System:
    state: Path
    ports: dict[str, int]
    up: Child
    banner: str

    def grpcurl(self, principal: str | None, *args: str) -> subprocess.CompletedProcess[str]:
        pki = self.state / "pki"
        tls = ["-cacert", str(pki / "ca.pem")]
        if principal:
            tls += ["-cert", str(pki / f"{principal}.pem"), "-key", str(pki / f"{principal}.key")]
        return subprocess.run(
            [str(GRPCURL), *tls, *args], capture_output=True, text=True, timeout=30, check=False
        )


def supervisor(tmp_path: Path) -> Harness:
    """The test's harness, which runs `stopcovid up` with its own state directory
    (`tmp_path/state`); up's output and log go to `tmp_path/up.log`."""
    settings = replace(Settings.from_env(), state_dir=tmp_path / "state", grace_seconds=2.0)
    return Harness(settings, env={"STOPCOVID_LOG_FORMAT": "json"}, log_dir=tmp_path)


def start_up(processes: Harness, ports: dict[str, int], *, wait: bool = True) -> Child:
    """`stopcovid up` on `ports`; with `wait`, once it has printed its banner."""
    log_file = processes.log_dir / "up.log" if processes.log_dir else None
    assert log_file is not None
    return processes.process(
        "up",
        "services.ops.cli",
        "up",
        env={
            **{f"STOPCOVID_{n.upper()}_PORT": str(p) for n, p in ports.items()},
            # Free metrics ports too: the defaults may be taken on a shared machine.
            **{f"STOPCOVID_{n.upper()}_METRICS_PORT": str(free_port()) for n in PROCESSES},
        },
        ready=(lambda: "Press Ctrl-C" in log_file.read_text()) if wait else None,
        timeout=120,
    )


@pytest.fixture
def system(tmp_path: Path) -> Iterator[System]:
    ports = {name: free_port() for name in SERVICES}
    with supervisor(tmp_path) as processes:
        try:
            up = start_up(processes, ports)
        except ChildFailed as failed:
            pytest.fail(f"up did not come up ({failed}):\n" + (tmp_path / "up.log").read_text())
        yield System(processes.settings.state_dir, ports, up, up.log())


def _processes_of(state: Path) -> list[int]:
    """Pids of live processes started for this system (they carry its state dir)."""
    marker = f"STOPCOVID_STATE_DIR={state}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker in (proc / "environ").read_bytes().split(b"\0"):
                status = (proc / "status").read_text()
                if "State:\tZ" not in status:  # zombies are dead, just not yet reaped
                    found.append(int(proc.name))
        except OSError:
            continue
    return found


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_up_serves_four_services_to_grpcurl_and_stops_cleanly(system: System) -> None:
    # A fresh machine gets a development PKI, and says so; the servers' directory
    # holds no CA key but the devices CA's (the Venue server's).
    assert '"event": "development_pki_created"' in system.up.log()
    keys = sorted(p.name for p in (system.state / "pki").glob("*.key") if "-ca" in p.name)
    assert keys == ["devices-ca.key"]
    assert (system.state / "pki-root" / "root.key").exists()

    # Reflection lists each service on its own port.
    for name, full in SERVICES.items():
        listed = system.grpcurl("dev-auditor", f"localhost:{system.ports[name]}", "list")
        assert listed.returncode == 0, listed.stderr
        assert full in listed.stdout.split()
        assert "grpc.health.v1.Health" in listed.stdout.split()

    described = system.grpcurl(
        "dev-venue-operator",
        f"localhost:{system.ports['venue']}",
        "describe",
        "stopcovid.venue.v1.VenueService.CreateVenue",
    )
    assert described.returncode == 0, described.stderr
    assert "CreateVenueRequest" in described.stdout

    health = system.grpcurl(
        "dev-device", f"localhost:{system.ports['checkin']}", "grpc.health.v1.Health/Check"
    )
    assert json.loads(health.stdout) == {"status": "SERVING"}

    venue_target = f"localhost:{system.ports['venue']}"
    made = system.grpcurl(
        "dev-venue-operator",
        "-d",
        '{"venue": {"display_name": "Night Market", "setting": "VENUE_SETTING_OUTDOOR",'
        ' "region_code": "KH-12"}}',
        venue_target,
        "stopcovid.venue.v1.VenueService/CreateVenue",
    )
    assert made.returncode == 0, made.stderr
    venue = json.loads(made.stdout)["venue"]
    assert venue["state"] == "VENUE_STATE_ACTIVE"
    got = system.grpcurl(
        "dev-health-official",
        "-d",
        json.dumps({"venue_id": venue["venue_id"]}),
        venue_target,
        "stopcovid.venue.v1.VenueService/GetVenue",
    )
    assert json.loads(got.stdout)["venue"]["display_name"] == "Night Market"

    # Wrong role and bad input: precise statuses with their ErrorInfo reasons.
    denied = system.grpcurl(
        "dev-device", "-d", "{}", venue_target, "stopcovid.venue.v1.VenueService/ListVenues"
    )
    assert denied.returncode != 0
    assert "PermissionDenied" in denied.stderr
    assert "ROLE_NOT_ALLOWED" in denied.stderr
    invalid = system.grpcurl(
        "dev-venue-operator",
        "-d",
        '{"venue_id": "nope"}',
        venue_target,
        "stopcovid.venue.v1.VenueService/GetVenue",
    )
    assert "InvalidArgument" in invalid.stderr
    assert "venue_id" in invalid.stderr
    # No client certificate: refused in the TLS handshake.
    anonymous = system.grpcurl(None, venue_target, "list")
    assert anonymous.returncode != 0

    # The certificate commands find up's embedded database by themselves.
    listed = subprocess.run(
        [sys.executable, "-m", "services.ops.cli", "certs", "list"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"STOPCOVID_STATE_DIR": str(system.state), "PATH": "/usr/bin:/bin"},
    )
    assert listed.returncode == 0, listed.stderr
    assert "revocations unknown" not in listed.stderr
    assert "dev-auditor" in listed.stdout and "auditor" in listed.stdout

    # The banner lists every process's metrics endpoint, and each one answers.
    endpoints = re.findall(r"^  (\S+) +http://(\S+)/metrics$", system.banner, re.M)
    assert {name for name, _ in endpoints} == set(PROCESSES)
    for _, where in endpoints:
        with urllib.request.urlopen(f"http://{where}/metrics", timeout=10) as reply:
            assert b"process_start_time_seconds" in reply.read()

    # The banner's commands are ready to paste: every one names a real file.
    for path in re.findall(r"-(?:cacert|cert|key) (\S+)", system.banner):
        assert Path(path).exists() or (Path.cwd() / path).exists(), path

    children = _processes_of(system.state)
    assert len(children) >= 5  # four servers and the workers (plus Postgres when embedded)
    system.up.proc.send_signal(signal.SIGTERM)
    assert system.up.wait(timeout=60) == 0
    assert _processes_of(system.state) == []
    assert not any(_listening(p) for p in system.ports.values())
    pg_port = (
        int((system.state / "pg" / "port").read_text())
        if (system.state / "pg" / "port").exists()
        else None
    )
    if pg_port is not None:
        assert not _listening(pg_port)
        assert not (system.state / "pg" / "data" / "postmaster.pid").exists()


def test_up_fails_loudly_and_leaves_nothing_when_a_port_is_taken(tmp_path: Path) -> None:
    ports = {name: free_port() for name in SERVICES}
    state = tmp_path / "state"
    with socket.socket() as squatter, supervisor(tmp_path) as processes:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
        squatter.bind(("127.0.0.1", ports["exposure"]))
        squatter.listen()
        up = start_up(processes, ports, wait=False)
        assert up.wait(timeout=120) == 1
    log = up.log()
    assert "Press Ctrl-C" not in log
    assert '"event": "up_failed"' in log
    assert "exposure exited" in log
    assert _processes_of(state) == []
    assert not any(_listening(p) for n, p in ports.items() if n != "exposure")


def _is_postgres(pid: int) -> bool:
    try:
        return b"postgres" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def test_a_killed_up_leaves_no_server_or_worker_behind(tmp_path: Path) -> None:
    """SIGKILL leaves `up` no chance to stop anything: its servers and workers stop
    by themselves (their parent-death signal). The embedded Postgres is left for
    the next `up` to attach to, as after any crash; it is stopped here."""
    ports = {name: free_port() for name in SERVICES}
    state = tmp_path / "state"
    with supervisor(tmp_path) as processes:
        up = start_up(processes, ports)
        children = [p for p in _processes_of(state) if p != up.pid and not _is_postgres(p)]
        assert len(children) == 5  # four servers and the workers
        processes.kill(up)
        wait_for(
            lambda: not set(children) & set(_processes_of(state)),
            what="up's servers and workers to stop by themselves",
        )
    assert not any(_listening(p) for p in ports.values())
    pg.EmbeddedPostgres(state / "pg").stop()
    assert _processes_of(state) == []
