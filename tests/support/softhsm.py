"""A SoftHSM2 token of the test session's own, for the PKCS#11 key store.

SoftHSM2 comes from the system's packages (`./dev` installs it where it runs as
root). Where it is missing the HSM tests skip with the reason, except under CI,
which runs as root and must run them: there a missing SoftHSM fails the test.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from services.kernel.config import Settings

MODULE_PATHS = (
    Path("/usr/lib/softhsm/libsofthsm2.so"),
    Path("/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so"),
    Path("/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so"),
    Path("/usr/local/lib/softhsm/libsofthsm2.so"),
    Path("/opt/homebrew/lib/softhsm/libsofthsm2.so"),
)


@dataclass(frozen=True)
class SoftHsm:
    module: Path
    token: str
    pin: str

    def settings(self, settings: Settings) -> Settings:
        """`settings` with the PKCS#11 key store on this token (the PIN is in the
        environment, where the key store reads it)."""
        return replace(
            settings, keystore_backend="pkcs11", pkcs11_module=self.module, pkcs11_token=self.token
        )


def unavailable(reason: str) -> None:
    message = (
        f"PKCS#11 key-store tests need SoftHSM2: {reason}. `./dev test` installs the "
        "softhsm2 package when it runs as root; otherwise install it (apt-get install softhsm2)."
    )
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the HSM tests. {message}")
    pytest.skip(message)


def start(directory: Path) -> SoftHsm:
    """A new token in `directory`; SOFTHSM2_CONF points at it for this process,
    which must be set before the PKCS#11 module is first loaded."""
    module = next((p for p in MODULE_PATHS if p.is_file()), None)
    util = shutil.which("softhsm2-util")
    if module is None or util is None:
        unavailable("its PKCS#11 module or softhsm2-util is not installed")
    assert module is not None and util is not None
    tokens = directory / "tokens"
    tokens.mkdir(mode=0o700)
    conf = directory / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    os.environ["SOFTHSM2_CONF"] = str(conf)
    label, pin = f"stopcovid-test-{secrets.token_hex(3)}", secrets.token_hex(8)
    subprocess.run(
        [util, "--init-token", "--free", "--label", label, "--pin", pin, "--so-pin", pin + "so"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    os.environ["STOPCOVID_PKCS11_PIN"] = pin
    return SoftHsm(module, label, pin)
