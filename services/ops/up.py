"""`stopcovid up`: the whole system on one machine.

Starts the embedded Postgres (unless a database is configured), prepares roles,
schema and certificates, starts the four gRPC servers and the worker pool as
separate processes, waits until each answers its health check, prints how to
reach them, and on Ctrl-C or SIGTERM stops everything in order: servers (which
drain in-flight calls), workers, then Postgres. No process is left behind: the
children also get SIGTERM from the kernel if `up` itself dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import asyncpg
import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.kernel.config import SERVICES, Settings
from services.ops import pg, setup

log = structlog.get_logger()

READY_TIMEOUT = 60.0
PROBE_PRINCIPAL = "dev-auditor"

# Which development certificate fits each service's everyday calls, for the banner.
BANNER_PRINCIPAL = {
    "checkin": "dev-registrar",
    "venue": "dev-venue-operator",
    "exposure": "dev-health-official",
    "retention": "dev-auditor",
}


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]


def _spawn(name: str, module: str, env: dict[str, str]) -> Child:
    proc = subprocess.Popen(
        [sys.executable, "-m", module],
        env=env,
        # Own session: the terminal's Ctrl-C reaches only `up`, which stops the
        # children in order instead of all at once.
        start_new_session=True,
        preexec_fn=_die_with_parent,  # noqa: PLW1509 (only calls prctl)
    )
    return Child(name, proc)


def _wait_healthy(settings: Settings, port: int, child: Child, deadline: float) -> None:
    pki = settings.pki_dir
    creds = grpc.ssl_channel_credentials(
        (pki / "ca.pem").read_bytes(),
        (pki / f"{PROBE_PRINCIPAL}.key").read_bytes(),
        (pki / f"{PROBE_PRINCIPAL}.pem").read_bytes(),
    )
    with grpc.secure_channel(f"localhost:{port}", creds) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if child.proc.poll() is not None:
                raise RuntimeError(f"{child.name} exited with code {child.proc.returncode}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{child.name} did not become healthy on port {port}")
            time.sleep(0.2)


def _stop_children(children: list[Child], grace: float) -> None:
    # Servers first (they drain), then the workers.
    for child in sorted(children, key=lambda c: c.name == "workers"):
        if child.proc.poll() is None:
            child.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace + 5
    for child in children:
        try:
            child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("child_killed", child=child.name)
            child.proc.kill()
            child.proc.wait()


def _banner(settings: Settings, ports: dict[str, int], cwd: Path) -> str:
    grpcurl = Path(sys.executable).with_name("grpcurl")
    pki = settings.pki_dir

    def rel(p: Path) -> str:
        try:
            return str(p.relative_to(cwd))
        except ValueError:
            return str(p)

    lines = ["", "Stop COVID is up. Services (mutual TLS; dev certificates in " + rel(pki) + "):"]
    for name in SERVICES:
        full_name = setup.SERVICE_DESCRIPTORS[name].full_name
        lines.append(f"  {name:<10} localhost:{ports[name]}  {full_name}")
    lines += ["", "Try (copy and paste):"]

    def grpcurl_as(principal: str, *args: str) -> str:
        tls = ["-cacert", rel(pki / "ca.pem"), "-cert", rel(pki / f"{principal}.pem")]
        return "  " + shlex.join([rel(grpcurl), *tls, "-key", rel(pki / f"{principal}.key"), *args])

    for name in SERVICES:
        lines.append(grpcurl_as(BANNER_PRINCIPAL[name], f"localhost:{ports[name]}", "list"))
    create = (
        '{"venue": {"display_name": "Central Market", "setting": "VENUE_SETTING_INDOOR", '
        '"region_code": "KH-12", "capacity": 300}}'
    )
    venue_target = f"localhost:{ports['venue']}"
    for body, rpc in ((create, "CreateVenue"), ("{}", "ListVenues")):
        lines.append(
            grpcurl_as(
                BANNER_PRINCIPAL["venue"],
                "-d",
                body,
                venue_target,
                f"{setup.SERVICE_DESCRIPTORS['venue'].full_name}/{rpc}",
            )
        )
    simulator = Path(sys.executable).with_name("stopcovid-simulator")
    lines += [
        "",
        "Simulate scanner devices streaming check-ins (live progress):",
        "  "
        + shlex.join(
            [
                rel(simulator),
                "--pki-dir",
                rel(pki),
                "--checkin",
                f"localhost:{ports['checkin']}",
                "--venue",
                venue_target,
                "--devices",
                "8",
                "--rate",
                "2000",
                "--duration",
                "30",
            ]
        ),
        "",
        "Press Ctrl-C to stop everything.",
        "",
    ]
    return "\n".join(lines)


def up() -> int:
    settings = Settings.from_env()
    settings.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    cluster: pg.EmbeddedPostgres | None = None
    children: list[Child] = []
    started = time.monotonic()
    try:
        passwords = setup.ensure_db_passwords(settings)
        if settings.database_url is None:
            cluster = pg.EmbeddedPostgres(settings.pg_dir)
            cluster.start()
            admin_dsn = cluster.superuser_dsn()
            settings = replace(settings, database_url=f"postgresql://127.0.0.1:{cluster.port}/")
        else:
            admin_dsn = settings.admin_database_url or settings.database_url
        applied = asyncio.run(setup.prepare_database(settings, admin_dsn, passwords))
        log.info("database_ready", migrations_applied=applied)
        setup.ensure_pki(settings)
        setup.ensure_keys(settings)

        assert settings.database_url is not None
        env = {
            **os.environ,
            "STOPCOVID_DATABASE_URL": settings.database_url,
            "STOPCOVID_STATE_DIR": str(settings.state_dir),
        }
        for name in SERVICES:
            env[f"STOPCOVID_{name.upper()}_PORT"] = str(settings.ports[name])
            children.append(_spawn(name, f"services.{name}", env))
        children.append(_spawn("workers", "workers", env))

        deadline = time.monotonic() + READY_TIMEOUT
        for child in children[: len(SERVICES)]:
            _wait_healthy(settings, settings.ports[child.name], child, deadline)
        print(_banner(settings, settings.ports, Path.cwd()), flush=True)
        log.info("system_up", seconds=round(time.monotonic() - started, 1))

        while not stop.is_set():
            for child in children:
                if child.proc.poll() is not None:
                    log.error("child_exited", child=child.name, code=child.proc.returncode)
                    return 1
            stop.wait(0.5)
        return 0
    except (RuntimeError, pg.PostgresError, OSError, asyncpg.PostgresError) as exc:
        # Operator-facing setup failures (a taken port, a database that refuses the
        # admin role): say what failed, without a traceback.
        log.error("up_failed", error=str(exc), error_type=type(exc).__name__)
        return 1
    finally:
        log.info("system_stopping")
        _stop_children(children, settings.grace_seconds)
        if cluster is not None:
            with contextlib.suppress(pg.PostgresError):
                cluster.stop()
        log.info("system_stopped")
