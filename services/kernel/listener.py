"""A process's ear on Postgres NOTIFY: one connection that LISTENs on some
channels, is made again when it is lost, and a full reload of whatever the
notifications keep fresh, at start, after every reconnection (notifications sent
meanwhile are lost) and every `cache_refresh_s`.

A notification is only a hint that something changed; the reload is what makes
the copy right whatever was missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable

import asyncpg
import structlog

from services.kernel import db
from services.kernel.config import Settings

log = structlog.get_logger()

_CHECK_S = 1.0  # how soon a lost connection is noticed


class Listener:
    def __init__(
        self,
        settings: Settings,
        role: str,
        *,
        channels: Iterable[str],
        notified: Callable[[str, str], None],
        reload: Callable[[], Awaitable[None]],
        name: str,
    ) -> None:
        """`notified(channel, payload)` runs on the event loop for each
        notification; `reload()` brings the whole copy up to date."""
        self._settings = settings
        self._role = role
        self._channels = tuple(channels)
        self._notified = notified
        self._reload = reload
        self._name = name
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Listen first, then load: a change between the two is in the load."""
        await self._connect()
        await self._reload()
        self._task = asyncio.create_task(self._keep_up(), name=f"{self._name}-reload")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._conn is not None and not self._conn.is_closed():
            await self._conn.close()

    async def _connect(self) -> None:
        args = db.connect_args(self._settings, self._role)
        conn = await asyncpg.connect(
            **args.kwargs(), server_settings={"application_name": f"{self._role}_{self._name}"}
        )
        for channel in self._channels:
            await conn.add_listener(channel, self._on_notification)
        self._conn = conn

    def _on_notification(self, _conn: object, _pid: int, channel: str, payload: str) -> None:
        self._notified(channel, payload)

    async def _keep_up(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(_CHECK_S)
            lost = self._conn is None or self._conn.is_closed()
            if not lost and time.monotonic() - last < self._settings.cache_refresh_s:
                continue
            try:
                if lost:
                    await self._connect()
                    log.info("listener_reconnected", listener=self._name)
                await self._reload()
                last = time.monotonic()
            except db.TRANSIENT_ERRORS as exc:
                # Any of them: during a failover no node takes writes for a while
                # (asyncpg: TargetServerAttributeNotMatched), and this task must live
                # on to reconnect to the new primary.
                log.warning("listener_reload_failed", listener=self._name, **db.error_fields(exc))
