"""`stopcovid up`: the whole system on one machine.

Starts the embedded Postgres (unless a database is configured), prepares roles,
schema, certificates and keys, starts the four gRPC servers and the worker pool as
separate processes, waits until each server answers its health check, prints how
to reach them and where each process serves its metrics, and on Ctrl-C or
SIGTERM stops everything in order: servers (which drain in-flight calls),
workers, then Postgres. The processes are the harness's
(`services/ops/harness.py`): no server or worker is left behind, even when `up`
itself is killed (on Linux).

`up --ha` is the many-hosts topology on loopback: a three-member etcd and two
Patroni-managed Postgres nodes (a primary and a synchronous standby, in
`state_dir/ha`; services/ops/ha.py), two CheckIn servers (the second on the
CheckIn port + 10), the other three servers and two worker processes, every one
connecting with the multi-host DSN that follows the primary.
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
from services.ops.ha import HaPostgres
from services.ops.harness import READY_TIMEOUT, ChildFailed, Harness

log = structlog.get_logger()

# Which development certificate fits each service's everyday calls, for the banner.
BANNER_PRINCIPAL = {
    "checkin": "dev-registrar",
    "venue": "dev-venue-operator",
    "exposure": "dev-health-official",
    "retention": "dev-auditor",
}


SECOND_CHECKIN_OFFSET = 10
"""`up --ha`'s second CheckIn server (and second worker's metrics) listen this far
above the first."""


def _ha_banner(cluster: HaPostgres, checkin_ports: list[int], cwd: Path) -> str:
    def rel(p: Path) -> str:
        try:
            return str(p.relative_to(cwd))
        except ValueError:
            return str(p)

    patronictl = rel(Path(sys.executable).with_name("patronictl"))
    config = rel(cluster.state_dir / cluster.nodes[0].name / "patroni.yml")
    primary = cluster.primary()
    lines = ["", "Highly available Postgres (Patroni, synchronous_mode on):"]
    for node in cluster.nodes:
        role = "primary" if node.name == primary else "synchronous standby"
        lines.append(f"  {node.name}  {cluster.host}:{node.port}  {role}")
    etcd = ",".join(f"{cluster.host}:{m.client_port}" for m in cluster.etcd)
    lines += [
        f"  etcd    {etcd}",
        f"  every process connects with {cluster.dsn()}",
        "  the cluster, and a switchover to see the servers follow it:",
        "  " + shlex.join([patronictl, "-c", config, "list"]),
        "  " + shlex.join([patronictl, "-c", config, "switchover", "--force"]),
        "",
        "CheckIn servers (devices balance round robin over the comma-separated list):",
        "  " + ",".join(f"localhost:{port}" for port in checkin_ports),
    ]
    return "\n".join(lines)


def _banner(
    settings: Settings,
    ports: dict[str, int],
    cwd: Path,
    metrics: dict[str, str] | None = None,
    checkin_target: str | None = None,
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
                checkin_target or f"localhost:{ports['checkin']}",
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


def up(*, ha: bool = False) -> int:
    settings = Settings.from_env()
    settings.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    processes = Harness(settings, fixed_metrics_ports=True)
    started = time.monotonic()
    try:
        passwords = setup.ensure_db_passwords(settings)
        ha_cluster: HaPostgres | None = None
        if ha:
            if settings.database_url is not None:
                log.error("up_failed", error="--ha runs its own Postgres; unset the database URL")
                return 1
            ha_cluster = HaPostgres(settings.state_dir / "ha")
            settings = processes.start_ha_postgres(ha_cluster)
            admin_dsn = ha_cluster.superuser_dsn()
        elif settings.database_url is None:
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
        if ha_cluster is not None:
            first = settings.ports["checkin"]
            second = first + SECOND_CHECKIN_OFFSET if first else 0
            # The second of each serves its metrics beside the first's, as its port.
            metrics = settings.metrics_ports
            servers.append(
                processes.start_server(
                    "checkin",
                    port=second,
                    name="checkin-2",
                    env={
                        "STOPCOVID_CHECKIN_METRICS_PORT": str(
                            metrics["checkin"] + SECOND_CHECKIN_OFFSET
                        )
                    },
                )
            )
            processes.worker(
                name="workers-2",
                env={
                    "STOPCOVID_WORKERS_METRICS_PORT": str(
                        metrics["workers"] + SECOND_CHECKIN_OFFSET
                    )
                },
            )
        deadline = time.monotonic() + READY_TIMEOUT
        for server in servers:
            processes.wait_ready(server, deadline)
        ports = {server.name: server.port or 0 for server in servers}
        checkin_target = None
        if ha_cluster is not None:
            checkins = [ports["checkin"], ports["checkin-2"]]
            checkin_target = ",".join(f"localhost:{port}" for port in checkins)
            print(_ha_banner(ha_cluster, checkins, Path.cwd()), flush=True)
        endpoints = processes.metrics_endpoints()
        print(_banner(settings, ports, Path.cwd(), endpoints, checkin_target), flush=True)
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
