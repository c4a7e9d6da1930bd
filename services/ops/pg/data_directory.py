"""A cluster's data directory: made once by `initdb` (with the superuser's password
file beside it), and checked to be one the server binaries at hand can run.

`initdb` runs into a scratch directory that is renamed into place, so an
interrupted `initdb` never leaves a half-initialised PGDATA behind.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import time
from pathlib import Path

import structlog

from services.kernel.atomic_files import write_private
from services.ops.pg.binaries import BINDIR_ENV, major
from services.ops.pg.config import child_env
from services.ops.pg.errors import PostgresError
from services.ops.pg.user_namespace import SUPERUSER, privilege_prefix

log = structlog.get_logger()


def initdb(bindir: Path, version: str, *, datadir: Path, password_file: Path) -> None:
    """Initialise `datadir` (absent or empty) with a SCRAM superuser whose password is
    `password_file`'s, made first if missing."""
    began = time.monotonic()
    if datadir.exists():
        if any(datadir.iterdir()):
            raise PostgresError(
                f"{datadir} exists but is not a PostgreSQL data directory (no PG_VERSION); "
                f"remove it or choose another state directory"
            )
        datadir.rmdir()
    if not password_file.exists():
        write_private(password_file, (secrets.token_urlsafe(32) + "\n").encode(), exclusive=True)
    scratch = datadir.with_name(datadir.name + ".initdb")
    if scratch.exists():
        shutil.rmtree(scratch)
    command = [
        *privilege_prefix(),
        str(bindir / "initdb"),
        f"--pgdata={scratch}",
        f"--username={SUPERUSER}",
        f"--pwfile={password_file}",
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
            env=child_env(),
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise PostgresError(f"initdb failed to run: {exc}") from exc
    if result.returncode != 0:
        output = "\n".join((result.stdout + result.stderr).strip().splitlines()[-20:])
        raise PostgresError(f"initdb failed (exit status {result.returncode}):\n{output}")
    scratch.rename(datadir)
    log.info("pg_initdb_done", seconds=round(time.monotonic() - began, 3))


def check_version(bindir: Path, version: str, datadir: Path) -> None:
    """Refuse, saying what to do, a data directory of another major version."""
    data_major = (datadir / "PG_VERSION").read_text().strip()
    if data_major != major(version):
        raise PostgresError(
            f"{datadir} was initialised by PostgreSQL {data_major} but {bindir} holds "
            f"PostgreSQL {version}; set {BINDIR_ENV} to a PostgreSQL {data_major} bindir, "
            f"or remove {datadir.parent} to start afresh"
        )
