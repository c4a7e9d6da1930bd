"""What every benchmark shares: a private Postgres prepared the way `up` prepares
one, in a temporary directory, untouched by the caller's configuration, and the
process harness that runs it and the benchmark's servers and workers."""

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

    def __init__(self, prefix: str) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix=prefix))
        self.cluster = pg.EmbeddedPostgres(self.tmp / "pg")
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
        self.settings = self.processes.start_postgres(self.cluster)
        asyncio.run(setup.prepare_database(self.settings, self.cluster.superuser_dsn(), passwords))
        self._keystore = setup.ensure_keys(self.settings)
        print(
            f"setup: Postgres {pg.server_version(self.cluster.bindir)} in {self.tmp}, "
            f"{time.monotonic() - began:.1f}s",
            flush=True,
        )

    def superuser_dsn(self) -> str:
        return self.cluster.superuser_dsn(self.settings.database_name)

    def close(self, keep: bool = False) -> None:
        """Servers, workers, then Postgres; then the directory, unless `keep`."""
        self.processes.stop()
        if keep:
            print(f"kept {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
