"""The process harness: how `stopcovid up`, the benchmarks and the tests start,
watch, kill and stop the service and worker processes, the one way.

A child is `python -m <module>`: a server (`services.<name>`) or the worker pool
(`workers`), configured by its environment only (`child_env`), in a session of its
own, so a Ctrl-C at the terminal reaches only the supervisor, which then stops the
children in order. Its output goes to the supervisor's, or to `<log_dir>/<name>.log`.

- **Parent death.** On Linux each child asks the kernel (`prctl(PR_SET_PDEATHSIG)`)
  for SIGTERM when its supervisor dies, however it dies (SIGKILL included), and then
  stops as on any SIGTERM: no server or worker outlives its supervisor. The kernel
  sends the signal when the *thread* that forked the child ends, not the process,
  so every child is forked by one long-lived thread of the harness, never by a
  caller's short-lived one (`asyncio.to_thread`, a thread pool). The child asks in
  a first step of its own, which then execs the real program (same pid). macOS has
  no such signal: there a supervisor killed outright leaves its children running
  (each leads its own process group: `kill -TERM -- -PID` stops one); every
  ordinary end (Ctrl-C, SIGTERM, an exception, the end of a test) stops them as on
  Linux.
- **Readiness.** A server writes the port it bound to `STOPCOVID_PORT_FILE` (port 0
  works); it is ready when its gRPC health service answers SERVING over mutual TLS
  (as the development principal `dev-auditor`). A worker has no port: a caller that
  needs it running passes a predicate (its heartbeat row, say). A child that exits
  while awaited fails the wait at once, with its exit code.
- **Metrics.** Every child serves /metrics on a port of its own
  (services/kernel/metrics.py), which it writes to `STOPCOVID_METRICS_PORT_FILE`:
  the configured one when the harness has `fixed_metrics_ports` (`up`), else any
  free port (tests and benchmarks run several of one kind), again after a restart.
  `metrics_port(child)` reads it.
- **Failures on purpose.** `kill` is SIGKILL (a crash); `restart` starts the same
  process again, a server on the port it had, so its clients reconnect.
- **Ordered stop.** Servers first, together: SIGTERM, then their grace
  (`STOPCOVID_GRACE_SECONDS`, passed to them) to finish in-flight calls, then
  SIGKILL; then the workers (and any other program), likewise; then Postgres (the
  embedded cluster, or the HA one of services/ops/ha.py), when the harness started it.

The embedded Postgres itself (`services.ops.pg`) gets no parent-death signal: it
holds the data, and the next start attaches to a postmaster left running.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, TypedDict, Unpack

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.kernel.config import Settings
from services.ops import pg, setup
from services.ops.supervisor import Supervisor

if TYPE_CHECKING:
    from services.ops.ha import HaPostgres

log = structlog.get_logger()

READY_TIMEOUT = 60.0
STOP_MARGIN = 5.0
"""Seconds a child may take beyond its grace before it is killed."""
PROBE_PRINCIPAL = setup.dev_principal("ROLE_AUDITOR")
_POLL = 0.05


class ChildFailed(RuntimeError):
    """A child exited, or did not become ready, while the harness waited for it."""


def child_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment a supervisor gives a service or worker process: its own,
    plus where the database, the state, the key store and the file sender's output
    are, and the grace the supervisor allows it at shutdown."""
    env = {
        **os.environ,
        "STOPCOVID_STATE_DIR": str(settings.state_dir),
        "STOPCOVID_KEYSTORE_DIR": str(settings.keystore_dir),
        "STOPCOVID_DATABASE_NAME": settings.database_name,
        "STOPCOVID_GRACE_SECONDS": str(settings.grace_seconds),
    }
    if settings.database_url is not None:
        env["STOPCOVID_DATABASE_URL"] = settings.database_url
    if settings.notify_file_override is not None:
        env["STOPCOVID_NOTIFY_FILE"] = str(settings.notify_file_override)
    return {**env, **extra}


# -- forking -------------------------------------------------------------------

# The child's first program, on Linux: it asks the kernel for SIGTERM when its
# parent dies (PR_SET_PDEATHSIG is 1), gives up if the parent is already gone,
# then execs the real program, which keeps the setting and the pid. A step of its
# own, not a `preexec_fn`: that would make Python fork() instead of vfork(), and
# gRPC's fork handlers abort a child forked while other threads use gRPC (the
# tests' in-process servers). `-S`: no site packages, it only needs ctypes.
_DIE_WITH_PARENT = """\
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, ctypes.c_ulong(signal.SIGTERM))
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)
os.execv(sys.argv[2], sys.argv[2:])
"""


def _command(program: list[str]) -> list[str]:
    if not sys.platform.startswith("linux"):
        return program
    return [sys.executable, "-S", "-c", _DIE_WITH_PARENT, str(os.getpid()), *program]


_Start = Callable[[], subprocess.Popen[bytes]]
_requests: queue.SimpleQueue[tuple[_Start, Future[subprocess.Popen[bytes]]]] = queue.SimpleQueue()
_forker: threading.Thread | None = None
_forker_lock = threading.Lock()


def _fork_loop() -> None:
    while True:
        start, done = _requests.get()
        try:
            done.set_result(start())
        except BaseException as exc:  # handed to the caller, raised there
            done.set_exception(exc)


def popen(argv: list[str], env: dict[str, str], log_file: Path | None) -> subprocess.Popen[bytes]:
    """`Popen` on the harness's forking thread, which lives as long as the process:
    `argv` in a session of its own, asking for SIGTERM when this process dies (the
    HA Postgres's etcd and Patroni processes are started this way too)."""
    global _forker  # noqa: PLW0603 (one forking thread per process)
    with _forker_lock:
        if _forker is None:
            _forker = threading.Thread(target=_fork_loop, name="harness-fork", daemon=True)
            _forker.start()

    def start() -> subprocess.Popen[bytes]:
        out: IO[bytes] | None = log_file.open("ab") if log_file is not None else None
        try:
            return subprocess.Popen(
                _command(argv),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT if out is not None else None,
                start_new_session=True,
            )
        finally:
            if out is not None:
                out.close()  # the child has its own copy

    done: Future[subprocess.Popen[bytes]] = Future()
    _requests.put((start, done))
    return done.result()


# -- children ------------------------------------------------------------------


@dataclass
class Child:
    """One service or worker process and what it takes to start it again."""

    name: str
    module: str
    env: dict[str, str]
    proc: subprocess.Popen[bytes]
    args: tuple[str, ...] = ()
    service: str | None = None
    """The server's service name; None for a worker (or any other program)."""
    port_file: Path | None = None
    port: int | None = None
    """The port a server bound, once it is ready."""
    metrics_port_file: Path | None = None
    log_file: Path | None = None
    ready: Callable[[], bool] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout)

    def log(self) -> str:
        """What the child has written to its log file so far."""
        if self.log_file is None:
            return ""
        return self.log_file.read_bytes().decode(errors="replace")


class ServerOptions(TypedDict, total=False):
    """How `Harness.server` starts a server: `start_server`'s keyword arguments."""

    port: int | None
    name: str | None
    env: dict[str, str] | None


class Harness(Supervisor):
    """Service and worker processes of one supervisor; see the module docstring.

    `settings` says where the database and the state are (children get them through
    `child_env`), and the grace; `env` adds variables for every child; `log_dir`
    gives each child a log file (else they write to the supervisor's output)."""

    def __init__(
        self,
        settings: Settings,
        *,
        env: dict[str, str] | None = None,
        log_dir: Path | None = None,
        fixed_metrics_ports: bool = False,
    ) -> None:
        self.settings = settings
        self.extra_env = dict(env or {})
        self.log_dir = log_dir
        self.fixed_metrics_ports = fixed_metrics_ports
        self._spawned = itertools.count()
        self.children: list[Child] = []
        self.database: pg.EmbeddedPostgres | HaPostgres | None = None
        self._run_dir: Path | None = None  # the servers' port files, once needed

    # -- Postgres ---------------------------------------------------------------

    def start_postgres(self, cluster: pg.EmbeddedPostgres) -> Settings:
        """Start `cluster`, stop it last; children from now on use it. Returns the
        settings that name it."""
        self.database = cluster
        cluster.start()
        self.settings = replace(
            self.settings, database_url=f"postgresql://{cluster.host}:{cluster.port}/"
        )
        return self.settings

    def start_ha_postgres(self, cluster: HaPostgres) -> Settings:
        """Start the highly available `cluster` (services/ops/ha.py), stop it last;
        children from now on reach its primary, whichever node that is."""
        self.database = cluster
        cluster.start()
        self.settings = replace(self.settings, database_url=cluster.dsn())
        return self.settings

    # -- starting ---------------------------------------------------------------

    def start_server(
        self,
        service: str,
        *,
        port: int | None = None,
        name: str | None = None,
        env: dict[str, str] | None = None,
    ) -> Child:
        """Spawn the `service` server on `port` (default: the configured one; 0: any),
        with `env` added to its environment, without waiting for it (`wait_ready`
        does)."""
        name = name or service
        port_file = self._run_files() / f"{name}.port"
        port_file.unlink(missing_ok=True)
        chosen = self.settings.ports[service] if port is None else port
        child = self._spawn(
            name,
            f"services.{service}",
            {
                f"STOPCOVID_{service.upper()}_PORT": str(chosen),
                "STOPCOVID_PORT_FILE": str(port_file),
                **(env or {}),
            },
        )
        child.service, child.port_file = service, port_file
        return child

    def _run_files(self) -> Path:
        """Where the children's port files go."""
        if self._run_dir is None:
            # Beside the logs, or in the state directory: a supervisor killed
            # outright cannot remove it, and it must not pile up in /tmp.
            where = self.log_dir or self.settings.state_dir
            where.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._run_dir = Path(tempfile.mkdtemp(prefix=".ports-", dir=where))
        return self._run_dir

    def metrics_port(self, child: Child, timeout: float = READY_TIMEOUT) -> int:
        """The port `child` serves /metrics on, once it has bound it."""
        if child.metrics_port_file is None:
            raise ChildFailed(f"{child.name} serves no metrics")
        deadline = time.monotonic() + timeout
        while not child.metrics_port_file.exists():
            self._check_waiting(child, deadline, "did not report its metrics port")
            time.sleep(_POLL)
        return int(child.metrics_port_file.read_text())

    def metrics_endpoints(self) -> dict[str, str]:
        """`host:port` of every running child's /metrics, by child name."""
        host = self.settings.metrics_host
        return {
            c.name: f"{host}:{self.metrics_port(c)}"
            for c in self.children
            if c.metrics_port_file is not None and c.alive()
        }

    def server(
        self, service: str, *, timeout: float = READY_TIMEOUT, **spawn: Unpack[ServerOptions]
    ) -> Child:
        """The `service` server started as `start_server` does, once its health
        service answers SERVING."""
        child = self.start_server(service, **spawn)
        self.wait_ready(child, time.monotonic() + timeout)
        return child

    def worker(
        self,
        *,
        name: str = "workers",
        env: dict[str, str] | None = None,
        ready: Callable[[], bool] | None = None,
        timeout: float = READY_TIMEOUT,
    ) -> Child:
        """A worker pool process, with `env` added to its environment; with `ready`,
        once that holds."""
        return self.process(name, "workers", env=env, ready=ready, timeout=timeout)

    def process(
        self,
        name: str,
        module: str,
        *args: str,
        env: dict[str, str] | None = None,
        ready: Callable[[], bool] | None = None,
        timeout: float = READY_TIMEOUT,
    ) -> Child:
        """Any other program of the system, `python -m module args...` (a supervisor
        under test: `services.ops.cli up`), stopped with the workers; with `ready`,
        once that holds."""
        child = self._spawn(name, module, env or {}, args)
        child.ready = ready
        self.wait_ready(child, time.monotonic() + timeout)
        return child

    def wait_ready(self, child: Child, deadline: float) -> None:
        """Wait until `child` is ready (see the module docstring); ChildFailed when it
        exits first or `deadline` (a `time.monotonic()` value) passes."""
        if child.port_file is not None:
            while not child.port_file.exists():
                self._check_waiting(child, deadline, "did not report its port")
                time.sleep(_POLL)
            child.port = int(child.port_file.read_text())
            self._wait_serving(child, child.port, deadline)
        elif child.ready is not None:
            while not child.ready():
                self._check_waiting(child, deadline, "did not become ready")
                time.sleep(_POLL)

    def _check_waiting(self, child: Child, deadline: float, failure: str) -> None:
        if not child.alive():
            raise ChildFailed(f"{child.name} exited with code {child.returncode}")
        if time.monotonic() > deadline:
            raise ChildFailed(f"{child.name} {failure}")

    def _wait_serving(self, child: Child, port: int, deadline: float) -> None:
        pki = self.settings.pki_dir
        creds = grpc.ssl_channel_credentials(
            (pki / "ca.pem").read_bytes(),
            (pki / f"{PROBE_PRINCIPAL}.key").read_bytes(),
            (pki / f"{PROBE_PRINCIPAL}.pem").read_bytes(),
        )
        with grpc.secure_channel(f"localhost:{port}", creds) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                self._check_waiting(child, deadline, f"did not become healthy on port {port}")
                try:
                    # wait_for_ready: the call itself waits (up to its timeout) for
                    # the channel to connect; the pause below is after a refusal.
                    reply = stub.Check(
                        health_pb2.HealthCheckRequest(), timeout=1.0, wait_for_ready=True
                    )
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(_POLL)

    def _spawn(
        self, name: str, module: str, env: dict[str, str], args: tuple[str, ...] = ()
    ) -> Child:
        kind = module.removeprefix("services.")
        metrics_file: Path | None = None
        off = {**os.environ, **self.extra_env, **env}.get("STOPCOVID_METRICS", "").lower() == "off"
        if kind in self.settings.metrics_ports and not off:
            # One file per child: several workers may share a name.
            metrics_file = self._run_files() / f"{name}-{next(self._spawned)}.metrics-port"
            metrics_file.unlink(missing_ok=True)
            port = self.settings.metrics_ports[kind] if self.fixed_metrics_ports else 0
            env = {
                f"STOPCOVID_{kind.upper()}_METRICS_PORT": str(port),
                "STOPCOVID_METRICS_PORT_FILE": str(metrics_file),
                **env,
            }
        full_env = child_env(self.settings, **self.extra_env, **env)
        log_file = self.log_dir / f"{name}.log" if self.log_dir is not None else None
        proc = popen([sys.executable, "-m", module, *args], full_env, log_file)
        child = Child(name, module, full_env, proc, args=args, log_file=log_file)
        child.metrics_port_file = metrics_file
        self.children.append(child)
        log.debug("child_started", child=name, pid=proc.pid)
        return child

    # -- failures on purpose ----------------------------------------------------

    def kill(self, child: Child) -> None:
        """SIGKILL `child` (a crash) and reap it."""
        with contextlib.suppress(ProcessLookupError):
            child.proc.kill()
        child.proc.wait()

    def restart(
        self,
        child: Child,
        *,
        ready: Callable[[], bool] | None = None,
        timeout: float = READY_TIMEOUT,
    ) -> Child:
        """Start `child`'s process again (a server on the port it had, and awaited as
        before; a worker awaited with `ready`, if given), killing the old one first
        if it still runs; the new one takes its place in `children`."""
        if child.alive():
            self.kill(child)
        env = dict(child.env)
        if child.service is not None and child.port is not None:
            env[f"STOPCOVID_{child.service.upper()}_PORT"] = str(child.port)
        if child.port_file is not None:
            child.port_file.unlink(missing_ok=True)
        if child.metrics_port_file is not None:
            child.metrics_port_file.unlink(missing_ok=True)
        proc = popen([sys.executable, "-m", child.module, *child.args], env, child.log_file)
        again = replace(child, proc=proc, env=env, ready=ready)
        self.children[self.children.index(child)] = again
        self.wait_ready(again, time.monotonic() + timeout)
        return again

    # -- watching and stopping --------------------------------------------------

    def exited(self) -> Child | None:
        """A child that has exited (the first found), if any."""
        return next((c for c in self.children if not c.alive()), None)

    def stop_child(self, child: Child) -> None:
        """Stop one child gracefully (SIGTERM, its grace, then SIGKILL)."""
        self._terminate([child])
        self.children.remove(child)

    def stop(self, *, graceful: bool = True) -> None:
        """Servers, then workers, then Postgres (when started here); see the module
        docstring. Not `graceful`: the children are killed instead (a test's
        leftovers). Safe to call again."""
        servers = [c for c in self.children if c.service is not None]
        workers = [c for c in self.children if c.service is None]
        for group in (servers, workers):
            if graceful:
                self._terminate(group)
            else:
                for child in group:
                    self.kill(child)
        self.children.clear()
        if self.database is not None:
            with contextlib.suppress(pg.PostgresError):
                self.database.stop()
        if self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)
            self._run_dir = None

    def _terminate(self, children: list[Child]) -> None:
        for child in children:
            if child.alive():
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.grace_seconds + STOP_MARGIN
        for child in children:
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("child_killed", child=child.name)
                self.kill(child)
