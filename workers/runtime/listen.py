"""The one LISTEN task of a worker process: a dedicated connection (a pooled one
would be handed to others) listening on every channel of its `Wakeups`, setting
a channel's wake-up on each notification.

The connection is replaced as soon as it dies: asyncpg reports a lost one, and a
probe every `probe_s` seconds catches a half-open one (a backend or network that
stopped answering without closing). After every (re)connection all channels are
woken, for work that arrived while nobody listened; meanwhile the jobs' poll
covers the gap. A database that is down never holds up the process's start: the
task reports started after its first attempt, connected or not.

Log events: `worker_listening` (channels), `worker_listen_lost`,
`worker_listen_failed` (error type and SQLSTATE only).
"""

from __future__ import annotations

import asyncpg
import structlog
import trio
import trio_asyncio

from services.kernel import db
from services.kernel.config import Settings
from services.kernel.db import TRANSIENT_ERRORS, error_fields
from workers.runtime.loop import Backoff
from workers.runtime.wakeups import Wakeups

log = structlog.get_logger()

PROBE_SECONDS = 10.0
"""How often the listening connection is probed, and how long a probe may take."""

APPLICATION_NAME = "stopcovid_worker_listen"

_ERRORS: tuple[type[BaseException], ...] = (*TRANSIENT_ERRORS, trio.TooSlowError)


async def listen(
    settings: Settings,
    wakeups: Wakeups,
    *,
    probe_s: float = PROBE_SECONDS,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """LISTEN on `wakeups.channels` until cancelled (see the module docstring)."""
    backoff = Backoff(first=0.5)
    started = False
    args = db.connect_args(settings, db.SERVICE_ROLES["worker"]).kwargs()
    while True:
        conn: asyncpg.Connection | None = None
        try:
            conn = await trio_asyncio.aio_as_trio(asyncpg.connect)(
                **args, timeout=10, server_settings={"application_name": APPLICATION_NAME}
            )
            lost = trio.Event()
            conn.add_termination_listener(lambda _conn, event=lost: event.set())
            for channel in wakeups.channels:
                await trio_asyncio.aio_as_trio(conn.add_listener)(channel, wakeups[channel].notify)
            log.info("worker_listening", channels=list(wakeups.channels))
            wakeups.wake_all()
            backoff.reset()
            if not started:
                started = True
                task_status.started()
            while not conn.is_closed():
                with trio.move_on_after(probe_s):
                    await lost.wait()
                with trio.fail_after(probe_s):
                    await trio_asyncio.aio_as_trio(conn.execute)("SELECT 1")
            log.warning("worker_listen_lost")
        except _ERRORS as exc:
            log.warning("worker_listen_failed", **error_fields(exc))
        finally:
            if conn is not None:
                await _close_quietly(conn)
        if not started:
            started = True
            task_status.started()
        await trio.sleep(backoff.next())


async def _close_quietly(conn: asyncpg.Connection) -> None:
    """Close a connection even while cancelled; one that does not answer is dropped."""
    with trio.move_on_after(2) as scope:
        scope.shield = True
        try:
            await trio_asyncio.aio_as_trio(conn.close)(timeout=2)
            return
        except TRANSIENT_ERRORS:
            pass
    conn.terminate()
