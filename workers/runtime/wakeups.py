"""Wake-ups: one event per NOTIFY channel, so that an idle job wakes as soon as
work arrives instead of at its next poll.

The LISTEN task (workers/runtime/listen.py) sets a channel's event on each
notification; the asyncpg listener calls `notify` from the asyncio side, which
under trio-asyncio runs on the trio thread inside the trio run, so setting a trio
Event there is safe. A job's loop takes `current()` BEFORE it looks for work and
waits on that event only after finding none, so a notification that arrives in
between is not lost: it set the event the loop is about to wait on.
"""

from __future__ import annotations

from collections.abc import Iterable

import trio


class Wakeup:
    """The wake-up of one channel: a fresh event after every wake."""

    def __init__(self) -> None:
        self._event = trio.Event()
        self.notifications = 0
        """Notifications received on the channel (a count for operators and tests)."""

    def current(self) -> trio.Event:
        """The event the next `wake` sets: take it before looking for work."""
        return self._event

    def wake(self) -> None:
        event, self._event = self._event, trio.Event()
        event.set()

    def notify(self, _conn: object, _pid: int, _channel: str, _payload: object) -> None:
        """asyncpg listener callback (connection, pid, channel, payload)."""
        self.notifications += 1
        self.wake()


class Wakeups:
    """The wake-ups of the channels one process listens to, by channel name
    (services/kernel/channels.py)."""

    def __init__(self, channels: Iterable[str]) -> None:
        self._by_channel = {channel: Wakeup() for channel in channels}

    def __getitem__(self, channel: str) -> Wakeup:
        return self._by_channel[channel]

    @property
    def channels(self) -> tuple[str, ...]:
        return tuple(self._by_channel)

    def wake_all(self) -> None:
        """Wake every channel: after (re)connecting, for work that arrived while
        nobody listened."""
        for wakeup in self._by_channel.values():
            wakeup.wake()
