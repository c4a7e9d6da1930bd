"""Private PostgreSQL clusters for development (`up`), the benchmarks and the test suite.

`EmbeddedPostgres(state_dir)` is a cluster living entirely in one directory, on a
loopback port, with durability on; `find_bindir()` says which server binaries it
runs. Whether an external server is configured instead is for
`services.kernel.config.Settings` to say.

The modules, by what they are:

- `cluster`: one cluster's lifecycle (`EmbeddedPostgres`: start, attach, stop, kill).
- `data_directory`: `initdb` and the data directory's version check.
- `binaries`: finding `postgres` and `initdb`, and their version.
- `user_namespace`: running them as root, in an unprivileged user namespace.
- `config`: the server's settings, its environment, where it listens, timeouts.
- `processes`: live pids, children, free ports, `postmaster.pid`.
- `errors`: the exceptions.
"""

from __future__ import annotations

from services.ops.pg.binaries import find_bindir, server_version
from services.ops.pg.cluster import EmbeddedPostgres
from services.ops.pg.config import DEFAULT_SETTINGS, StopMode
from services.ops.pg.errors import PostgresError, PostgresNotFoundError

__all__ = [
    "DEFAULT_SETTINGS",
    "EmbeddedPostgres",
    "PostgresError",
    "PostgresNotFoundError",
    "StopMode",
    "find_bindir",
    "server_version",
]
