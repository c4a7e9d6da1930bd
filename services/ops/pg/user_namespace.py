"""Running the server binaries as root: PostgreSQL refuses to, so as root `initdb`
and `postgres` run inside a fresh user namespace (`unshare --user --map-user=U
--map-group=G`) in which an ordinary uid is mapped onto the real root: inside they
see an unprivileged user, outside every file they create is still owned by root.
No system user is created and nothing is chowned. As any other user, nothing is
prefixed.
"""

from __future__ import annotations

import functools
import os
import pwd
import shutil
import subprocess
from typing import Final

import structlog

from services.ops.pg.binaries import DATABASE_URL_ENV
from services.ops.pg.errors import PostgresError

log = structlog.get_logger()

SUPERUSER: Final = "postgres"

_ROOT_HELP: Final = (
    "PostgreSQL refuses to run as root, so as root the embedded cluster runs inside an "
    "unprivileged user namespace (`unshare --user --map-user=UID --map-group=GID`, util-linux "
    ">= 2.38), but that is not possible here: {reason}. Either run as a normal (non-root) user, "
    f"or use an external PostgreSQL server by setting {DATABASE_URL_ENV} "
    "(or PGHOST/PGPORT/PGUSER/PGPASSWORD/PGDATABASE)."
)


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


def privilege_prefix() -> tuple[str, ...]:
    return _unshare_prefix() if os.geteuid() == 0 else ()
