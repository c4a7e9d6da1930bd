"""`stopcovid up`: the whole system on one machine.

Starts the embedded Postgres (unless a database is configured), prepares roles,
schema, certificates and keys, starts the four gRPC servers and the worker pool as
separate processes, waits until each server answers its health check, prints how
to reach them and where each process serves its metrics, and on Ctrl-C or
SIGTERM stops everything in order: servers (which drain in-flight calls),
workers, then Postgres. The processes are the harness's
(`services/ops/harness.py`): no server or worker is left behind, even when `up`
itself is killed (on Linux).
"""

from __future__ import annotations

import asyncio
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

import asyncpg
import structlog

from services.kernel.config import SERVICES, Settings
from services.ops import pg, setup
from services.ops.harness import READY_TIMEOUT, ChildFailed, Harness

log = structlog.get_logger()

# Which development certificate fits each service's everyday calls, for the banner.
BANNER_PRINCIPAL = {
    "checkin": "dev-registrar",
    "venue": "dev-venue-operator",
    "exposure": "dev-health-official",
    "retention": "dev-auditor",
}


def _banner(
    settings: Settings, ports: dict[str, int], cwd: Path, metrics: dict[str, str] | None = None
) -> str:
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
    if metrics:
        lines += ["", "Metrics (Prometheus text format; `stopcovid status` shows the key figures):"]
        lines += [f"  {name:<10} http://{where}/metrics" for name, where in metrics.items()]
    else:
        lines += ["", "Metrics are off (STOPCOVID_METRICS=off)."]
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

    processes = Harness(settings, fixed_metrics_ports=True)
    started = time.monotonic()
    try:
        passwords = setup.ensure_db_passwords(settings)
        if settings.database_url is None:
            cluster = pg.EmbeddedPostgres(settings.pg_dir)
            settings = processes.start_postgres(cluster)
            admin_dsn = cluster.superuser_dsn()
        else:
            admin_dsn = settings.admin_database_url or settings.database_url
        applied = asyncio.run(setup.prepare_database(settings, admin_dsn, passwords))
        log.info("database_ready", migrations_applied=applied)
        setup.ensure_pki(settings)
        setup.ensure_keys(settings)

        # All at once, then each awaited: they start in parallel.
        servers = [processes.start_server(name) for name in SERVICES]
        processes.worker()
        deadline = time.monotonic() + READY_TIMEOUT
        for server in servers:
            processes.wait_ready(server, deadline)
        ports = {server.name: server.port or 0 for server in servers}
        endpoints = processes.metrics_endpoints()
        print(_banner(settings, ports, Path.cwd(), endpoints), flush=True)
        log.info("system_up", seconds=round(time.monotonic() - started, 1))

        while not stop.is_set():
            gone = processes.exited()
            if gone is not None:
                log.error("child_exited", child=gone.name, code=gone.returncode)
                return 1
            stop.wait(0.5)
        return 0
    except (ChildFailed, pg.PostgresError, OSError, asyncpg.PostgresError) as exc:
        # Operator-facing setup failures (a taken port, a database that refuses the
        # admin role): say what failed, without a traceback.
        log.error("up_failed", error=str(exc), error_type=type(exc).__name__)
        return 1
    finally:
        log.info("system_stopping")
        processes.stop()
        log.info("system_stopped")
