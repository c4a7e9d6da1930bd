"""The `stopcovid` command line, run for real in its own process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from services.kernel.config import Settings


def stopcovid(*args: str, state: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`stopcovid ARGS` with `state` as its state directory and nothing else from
    this environment but `env`: no database unless given."""
    return subprocess.run(
        [sys.executable, "-m", "services.ops.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
        env={"STOPCOVID_STATE_DIR": str(state), "PATH": "/usr/bin:/bin", **env},
    )


def stopcovid_on(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """`stopcovid ARGS` against the test's database and state directory."""
    return stopcovid(
        *args,
        state=settings.state_dir,
        STOPCOVID_DATABASE_URL=str(settings.database_url),
        STOPCOVID_DATABASE_NAME=settings.database_name,
    )
