"""What the RetentionService's parts share (each part is a mixin on RetentionBase,
composed in service.py): the pool, the settings, and the keys, opened on first use
so that a server without the key store still serves what needs no keys."""

from __future__ import annotations

import asyncpg
import structlog

from services.domain.people.tokens import PersonalTokens
from services.kernel import db, errors, keys, keystores
from services.kernel.config import Settings

log = structlog.get_logger()


class RetentionBase:
    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        self._pool = pool
        self._settings = settings
        self._keystore_cache: keys.KeyStore | None = None
        self._tokens_cache: PersonalTokens | None = None

    async def close(self) -> None:
        """At the server's stop: the key store, if one was opened."""
        if self._keystore_cache is not None:
            self._keystore_cache.close()

    @property
    def _keystore(self) -> keys.KeyStore:
        if self._keystore_cache is None:
            self._keystore_cache = keystores.open_for(self._settings, db.SERVICE_ROLES["retention"])
        return self._keystore_cache

    def _keystore_or_refuse(self) -> keys.KeyStore:
        """The key store, or FAILED_PRECONDITION for work that must destroy keys and
        cannot (the store or its KEK is missing: a deployment fault, logged)."""
        try:
            return self._keystore
        except (SystemExit, keys.KeyError_, OSError, ValueError) as exc:
            log.error("expiry_keystore_unavailable", error_type=type(exc).__name__)
            raise errors.FailedPrecondition(
                "this Retention server cannot destroy keys: its key store or KEK is not "
                "available; see the server log",
                metadata={"missing": "keystore"},
            ) from None

    @property
    def _tokens(self) -> PersonalTokens:
        """The personal-token keys, to find a person by the token they show."""
        if self._tokens_cache is None:
            current, token_keys = self._keystore.token_keys()
            self._tokens_cache = PersonalTokens(current, token_keys, self._settings.token_window_s)
        return self._tokens_cache
