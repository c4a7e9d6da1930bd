"""Which key store a process opens, by STOPCOVID_KEYSTORE: `file` (the default: the
key-store directory and a KEK from the environment or a file, services/kernel/keys.py)
or `pkcs11` (Postgres and an HSM, services/kernel/hsm.py). Every process opens its
store here, as its own database role, which only the PKCS#11 store uses."""

from __future__ import annotations

from services.kernel import hsm, keys
from services.kernel.config import Settings


def open_for(settings: Settings, role: str) -> keys.KeyStore:
    if settings.keystore_backend == "pkcs11":
        return hsm.open_keystore(settings, role)
    return keys.open_keystore(settings.keystore_dir, settings.secrets_dir)
