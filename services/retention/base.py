"""State shared by the RetentionService's parts (policies and expiry; grievances,
data-subject requests, audit and transparency), each written as a mixin on this base."""

from __future__ import annotations

import asyncpg

from services.kernel import keys
from services.kernel.config import Settings


class RetentionBase:
    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        self._pool = pool
        self._settings = settings
        self._keystore_cache: keys.KeyStore | None = None

    @property
    def _keystore(self) -> keys.KeyStore:
        """Opened on first use, so a server without the key store still serves what
        needs no keys."""
        if self._keystore_cache is None:
            self._keystore_cache = keys.open_keystore(
                self._settings.keystore_dir, self._settings.secrets_dir
            )
        return self._keystore_cache
