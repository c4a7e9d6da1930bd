"""What every benchmark shares: a private Postgres prepared the way `up` prepares
one, in a temporary directory, untouched by the caller's configuration, and the
process harness that runs it and the benchmark's servers and workers. The
Postgres is the embedded cluster, or (`ha`) the highly available one of `up --ha`
(services/ops/ha.py: etcd, Patroni, a primary and a synchronous standby)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from services.kernel.config import Settings
from services.kernel.keys import KeyStore
from services.ops import pg, setup
from services.ops.ha import HaPostgres
from services.ops.harness import Harness

# Settings a benchmark must not inherit: it runs against its own cluster and keys.
FOREIGN_ENV = (
    "STOPCOVID_DATABASE_URL",
    "STOPCOVID_ADMIN_DATABASE_URL",
    "STOPCOVID_DATABASE_NAME",
    "STOPCOVID_STATE_DIR",
    "STOPCOVID_KEK",
    "STOPCOVID_KEK_FILE",
    "STOPCOVID_KEYSTORE_DIR",
    "STOPCOVID_TLS_CA",
    "STOPCOVID_TLS_CERT",
    "STOPCOVID_TLS_KEY",
    "STOPCOVID_PORT_FILE",
    "STOPCOVID_CHECKIN_PORT",
    "PGHOST",
    "PGPORT",
    "PGSERVICE",
    "PGUSER",
    "PGPASSWORD",
    "PGDATABASE",
)


@contextlib.contextmanager
def clean_environment() -> Iterator[None]:
    saved = {k: os.environ.pop(k) for k in FOREIGN_ENV if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


class PrivateDatabase:
    """An embedded cluster in a temporary directory with the roles, schema and key
    store `up` would make, run by the process harness as `up` runs it (`processes`
    also starts the benchmark's servers and workers, and stops them before the
    cluster). `start()`, then use `settings` and `keystore`."""

    def __init__(self, prefix: str, *, ha: bool = False) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix=prefix))
        self.cluster = pg.EmbeddedPostgres(self.tmp / "pg")
        self.ha = HaPostgres(self.tmp / "ha") if ha else None
        self.settings = replace(
            Settings.from_env(), state_dir=self.tmp / "state", database_name="stopcovid"
        )
        self.processes = Harness(
            self.settings, env={"STOPCOVID_LOG_FORMAT": "json"}, log_dir=self.tmp
        )
        self._keystore: KeyStore | None = None

    @property
    def keystore(self) -> KeyStore:
        assert self._keystore is not None, "start() first"
        return self._keystore

    def start(self) -> None:
        began = time.monotonic()
        self.settings.state_dir.mkdir(mode=0o700, parents=True)
        passwords = setup.ensure_db_passwords(self.settings)
        if self.ha is not None:
            self.settings = self.processes.start_ha_postgres(self.ha)
            admin = self.ha.superuser_dsn()
        else:
            self.settings = self.processes.start_postgres(self.cluster)
            admin = self.cluster.superuser_dsn()
        asyncio.run(setup.prepare_database(self.settings, admin, passwords))
        self._keystore = setup.ensure_keys(self.settings)
        kind = "HA (Patroni, synchronous standby)" if self.ha is not None else "embedded"
        print(
            f"setup: Postgres {pg.server_version(pg.find_bindir())} {kind} in {self.tmp}, "
            f"{time.monotonic() - began:.1f}s",
            flush=True,
        )

    def superuser_dsn(self) -> str:
        if self.ha is not None:
            return self.ha.superuser_dsn(self.settings.database_name)
        return self.cluster.superuser_dsn(self.settings.database_name)

    def postmaster_pid(self) -> int | None:
        """The (primary's) postmaster."""
        if self.ha is not None:
            primary = self.ha.primary()
            return self.ha.postmaster_pid(self.ha.node(primary)) if primary else None
        return self.cluster.pid

    def postgres_log(self) -> Path:
        """The (primary's) server log."""
        if self.ha is not None:
            return self.ha.log_file(self.ha.node(self.ha.primary() or self.ha.nodes[0].name))
        return self.cluster.log_file

    def close(self, keep: bool = False) -> None:
        """Servers, workers, then Postgres; then the directory, unless `keep`."""
        self.processes.stop()
        if keep:
            print(f"kept {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
