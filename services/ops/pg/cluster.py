"""One embedded cluster's lifecycle: `EmbeddedPostgres` owns a *state directory*
and keeps everything it creates inside it::

    <state_dir>/data/               PGDATA (initdb'd on first start)
    <state_dir>/superuser.password  random superuser password, mode 0600
    <state_dir>/port                the TCP port used last time (reused when still free)
    <state_dir>/postgres.log        server log (stdout and stderr of the postmaster)
    <state_dir>/run/                unix socket directory
    <state_dir>/lock                serialises start/stop between processes

Starting initialises the directory if needed, attaches to a postmaster already
running there (started by this or another process), and recovers from a crash (a
stale `postmaster.pid`); stopping is smart, fast or immediate; `kill` is a crash,
for the tests.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Final, Self
from urllib.parse import quote

import structlog

from services.ops.pg.binaries import find_bindir, has_status_line, server_version
from services.ops.pg.config import (
    DEFAULT_SETTINGS,
    KILL_TIMEOUT,
    LOOPBACK,
    POLL,
    PORT_ATTEMPTS,
    START_TIMEOUT,
    STOP_SIGNALS,
    STOP_TIMEOUT,
    StopMode,
    child_env,
    server_args,
)
from services.ops.pg.data_directory import check_version, initdb
from services.ops.pg.errors import PortInUse, PostgresError
from services.ops.pg.processes import (
    PidFile,
    children,
    free_port,
    looks_like_postgres,
    pid_alive,
    port_free,
    tcp_ready,
)
from services.ops.pg.user_namespace import SUPERUSER, privilege_prefix
from services.ops.supervisor import Supervisor

log = structlog.get_logger()


class EmbeddedPostgres(Supervisor):
    """A private PostgreSQL cluster living entirely in ``state_dir``.

    ``port=None`` picks a free loopback port on first start and reuses it on later starts while it
    is free.  ``start()`` initialises the cluster if needed, attaches to it if it is already
    running (idempotent), and recovers from a crash (stale ``postmaster.pid``).  The postmaster
    runs in its own session so a Ctrl-C aimed at the caller's terminal does not reach it: call
    :meth:`stop` (or use the object as a context manager).
    """

    host: Final = LOOPBACK
    user: Final = SUPERUSER

    def __init__(
        self,
        state_dir: Path | str,
        port: int | None = None,
        *,
        bindir: Path | None = None,
        settings: Mapping[str, str] | None = None,
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        self.state_dir = Path(state_dir).absolute()
        # What lives in state_dir: the data directory, the superuser's password,
        # the port last used, the server's log and its Unix socket.
        self.datadir = self.state_dir / "data"
        self.password_file = self.state_dir / "superuser.password"
        self.port_file = self.state_dir / "port"
        self.log_file = self.state_dir / "postgres.log"
        self.socket_dir = self.state_dir / "run"
        self.requested_port = port
        self.settings: dict[str, str] = {**DEFAULT_SETTINGS, **(settings or {})}
        self.start_timeout = start_timeout
        self._bindir = bindir
        self._port: int | None = None
        self._password: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"EmbeddedPostgres(state_dir={str(self.state_dir)!r}, port={self._port!r})"

    # ---- layout

    @property
    def bindir(self) -> Path:
        if self._bindir is None:
            self._bindir = find_bindir()
        return self._bindir

    # ---- connection details

    @property
    def port(self) -> int:
        """TCP port of the running (or last started) cluster."""
        if self._port is None:
            raise PostgresError("the embedded cluster has not been started")
        return self._port

    @property
    def password(self) -> str:
        """The superuser's password (kept in ``superuser.password``, mode 0600)."""
        if self._password is None:
            try:
                self._password = self.password_file.read_text().strip()
            except FileNotFoundError:
                raise PostgresError(
                    f"{self.password_file} is missing; the cluster has not been initialised"
                ) from None
        return self._password

    def superuser_dsn(self, dbname: str = "postgres") -> str:
        """``postgresql://postgres:PASSWORD@127.0.0.1:PORT/dbname`` (contains the password)."""
        port = self.port  # raises first if never started
        return (
            f"postgresql://{SUPERUSER}:{quote(self.password, safe='')}@{self.host}:{port}"
            f"/{quote(dbname, safe='')}"
        )

    @property
    def pid(self) -> int | None:
        """Pid of the running postmaster, or None."""
        return self._running_pid()

    def is_initialised(self) -> bool:
        return (self.datadir / "PG_VERSION").is_file()

    def is_running(self) -> bool:
        return self._running_pid() is not None

    # ---- lifecycle

    def start(self) -> Self:
        """Initialise if needed, start (or attach to) the cluster and wait until it is ready."""
        began = time.monotonic()
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._locked():
            running = self._running_pid()
            info = self._pidfile()
            if running is not None and info is not None and info.status == "stopping":
                log.info("pg_waiting_for_shutdown", pid=running)
                if not self._wait_gone(running, STOP_TIMEOUT):
                    raise PostgresError(f"postgres (pid {running}) is stuck shutting down")
                running = None
            if running is not None:
                self._attach(running)
                return self
            self._reap()
            self._remove_stale_pidfile()
            bindir = self.bindir
            version = server_version(bindir)
            if not self.is_initialised():
                initdb(bindir, version, datadir=self.datadir, password_file=self.password_file)
            check_version(bindir, version, self.datadir)
            self._password = None
            _ = self.password  # fail early if the password file is gone
            self.socket_dir.mkdir(mode=0o700, exist_ok=True)
            tried: set[int] = set()
            for attempt in range(1, PORT_ATTEMPTS + 1):
                port = self._choose_port(tried)
                tried.add(port)
                try:
                    self._spawn(bindir, version, port)
                except PortInUse:
                    if self.requested_port is not None or attempt == PORT_ATTEMPTS:
                        raise
                    log.warning("pg_port_taken", port=port)
                    continue
                break
        log.info(
            "pg_started",
            port=self.port,
            pid=self._proc.pid if self._proc else None,
            bindir=str(bindir),
            version=version,
            state_dir=str(self.state_dir),
            seconds=round(time.monotonic() - began, 3),
        )
        return self

    def stop(self, mode: StopMode = "fast", timeout: float = STOP_TIMEOUT) -> None:
        """Shut the cluster down (``smart``, ``fast`` or ``immediate``) and wait for it to exit."""
        sig = STOP_SIGNALS[mode]
        began = time.monotonic()
        if not self.state_dir.is_dir():
            return
        with self._locked():
            pid = self._running_pid()
            if pid is None:
                self._reap()
                log.debug("pg_not_running", state_dir=str(self.state_dir))
                return
            log.info("pg_stopping", pid=pid, mode=mode)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            if not self._wait_gone(pid, timeout):
                raise PostgresError(
                    f"postgres (pid {pid}) did not stop within {timeout:g}s ({mode} shutdown); "
                    f"see {self.log_file}"
                )
        log.info("pg_stopped", pid=pid, mode=mode, seconds=round(time.monotonic() - began, 3))

    def kill(self) -> None:
        """SIGKILL the postmaster and its children, like a crash; for crash-recovery tests."""
        if not self.state_dir.is_dir():
            raise PostgresError("the embedded cluster is not running")
        with self._locked():
            pid = self._running_pid()
            if pid is None:
                raise PostgresError("the embedded cluster is not running")
            backends = children(pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            for child in backends:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(child, signal.SIGKILL)
            gone = self._wait_gone(pid, KILL_TIMEOUT)
            deadline = time.monotonic() + KILL_TIMEOUT
            while any(pid_alive(child) for child in backends) and time.monotonic() < deadline:
                time.sleep(POLL)
            if not gone:
                raise PostgresError(f"postgres (pid {pid}) survived SIGKILL")
        log.info("pg_killed", pid=pid, children=len(backends))

    # ---- internals

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.state_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _pidfile(self) -> PidFile | None:
        return PidFile.read(self.datadir / "postmaster.pid")

    def _running_pid(self) -> int | None:
        if self._proc is not None and self._proc.poll() is not None:
            self._proc = None
        info = self._pidfile()
        if info is None:
            return None
        if self._proc is not None and info.pid == self._proc.pid:
            return info.pid
        if pid_alive(info.pid) and looks_like_postgres(info.pid):
            return info.pid
        return None

    def _reap(self) -> None:
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=0)
            self._proc = None

    def _remove_stale_pidfile(self) -> None:
        """Drop a postmaster.pid whose process is dead, a zombie or not postgres at all.

        Postgres itself only checks that the pid exists; after a crash the pid may be a zombie
        nobody reaps or an unrelated process, and it would then refuse to start.
        """
        info = self._pidfile()
        if info is not None:
            log.info("pg_stale_pidfile", pid=info.pid)
            (self.datadir / "postmaster.pid").unlink(missing_ok=True)

    def _attach(self, pid: int) -> None:
        """Adopt a postmaster started earlier (by us or another process), once it is ready."""
        has_status = has_status_line(server_version(self.bindir))
        deadline = time.monotonic() + self.start_timeout
        while True:
            info = self._pidfile()
            if info is None or info.pid != pid or not pid_alive(pid):
                raise PostgresError(
                    f"postgres (pid {pid}) went away while attaching to it; see {self.log_file}"
                )
            if info.port is not None and (info.status in ("ready", "standby") or not has_status):
                port = info.port
                break
            if time.monotonic() > deadline:
                raise PostgresError(
                    f"postgres (pid {pid}) did not become ready within {self.start_timeout:g}s"
                )
            time.sleep(POLL)
        if self.requested_port is not None and port != self.requested_port:
            raise PostgresError(
                f"the cluster in {self.state_dir} is already running on port {port}, "
                f"not on the requested port {self.requested_port}"
            )
        self._port = port
        self._password = None
        self.port_file.write_text(f"{port}\n")
        log.info("pg_attached", pid=pid, port=port, state_dir=str(self.state_dir))

    def _choose_port(self, tried: set[int]) -> int:
        if self.requested_port is not None:
            return self.requested_port
        with contextlib.suppress(FileNotFoundError, ValueError):
            remembered = int(self.port_file.read_text().strip())
            if remembered not in tried and 0 < remembered < 65536 and port_free(remembered):
                return remembered
        port = free_port()
        while port in tried:
            port = free_port()
        return port

    def _spawn(self, bindir: Path, version: str, port: int) -> None:
        has_status = has_status_line(version)
        command = [
            *privilege_prefix(),
            str(bindir / "postgres"),
            "-D",
            str(self.datadir),
            *server_args(self.settings, port, self.socket_dir),
        ]
        log_start = self.log_file.stat().st_size if self.log_file.exists() else 0
        with open(self.log_file, "ab") as log_handle:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_handle,
                stderr=subprocess.STDOUT,
                env=child_env(),
                # Own session: a Ctrl-C at the caller's terminal must not reach the postmaster.
                start_new_session=True,
            )
        self._proc = proc
        deadline = time.monotonic() + self.start_timeout
        while True:
            returncode = proc.poll()
            if returncode is not None:
                self._proc = None
                tail = self._log_tail(log_start)
                if "could not bind" in tail or "could not create any TCP/IP sockets" in tail:
                    raise PortInUse(f"port {port} is already in use:\n{tail}")
                raise PostgresError(
                    f"postgres exited during startup (exit status {returncode}); "
                    f"last lines of {self.log_file}:\n{tail}"
                )
            info = self._pidfile()
            if info is not None and info.pid == proc.pid:
                # PostgreSQL >= 10 writes "ready" into postmaster.pid once it accepts
                # connections (listening starts earlier); older servers only have the socket.
                ready = info.status == "ready" if has_status else tcp_ready(port)
                if ready:
                    break
            if time.monotonic() > deadline:
                self._abort_startup(proc)
                raise PostgresError(
                    f"postgres did not become ready within {self.start_timeout:g}s; "
                    f"last lines of {self.log_file}:\n{self._log_tail(log_start)}"
                )
            time.sleep(POLL)
        self._port = port
        self.port_file.write_text(f"{port}\n")

    def _abort_startup(self, proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self._proc = None

    def _wait_gone(self, pid: int, timeout: float) -> bool:
        proc = self._proc
        if proc is not None and proc.pid == pid:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                return False
            self._proc = None
            return True
        deadline = time.monotonic() + timeout
        while pid_alive(pid):
            if time.monotonic() > deadline:
                return False
            time.sleep(POLL)
        return True

    def _log_tail(self, start: int, lines: int = 30) -> str:
        try:
            with open(self.log_file, "rb") as handle:
                size = handle.seek(0, os.SEEK_END)
                handle.seek(max(start, size - 16384))
                text = handle.read().decode(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.strip().splitlines()[-lines:]) or "(log is empty)"
