"""What a CheckIn server keeps in memory to decide at the door without a query:
people at the highest risk level, erased people, devices and venues.

Each is kept fresh by Postgres LISTEN/NOTIFY (triggers in migration 0002 send the
changed row's id; we re-read those rows, many at a time) and by a periodic full
reload, which also covers notifications lost while the listening connection was
down. A change therefore reaches every CheckIn server within a second; the full
reload bounds the damage of anything missed to `cache_refresh_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import structlog

from services.domain.exposure import risk as risk_levels
from services.kernel import channels, db, metrics
from services.kernel.config import Settings

log = structlog.get_logger()

Q = db.load_queries(Path(__file__).with_name("queries.sql"))

CHANNELS = channels.CHECKIN_CACHES
_COALESCE_S = 0.02  # notifications arriving together are re-read with one query


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    device_id: uuid.UUID
    venue_id: uuid.UUID
    active: bool
    certificate_serial: str


@dataclass(frozen=True, slots=True)
class VenueInfo:
    venue_id: uuid.UUID
    active: bool
    display_name: str


class Caches:
    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        self._pool = pool
        self._settings = settings
        # person id (16 bytes) -> expiry (epoch seconds) of their HIGH level
        self.high_risk: dict[bytes, float] = {}
        self.erased: set[bytes] = set()
        self._devices: dict[uuid.UUID, DeviceInfo | None] = {}
        self._venues: dict[uuid.UUID, VenueInfo | None] = {}
        self._dirty: dict[str, set[str]] = {channel: set() for channel in CHANNELS}
        self._dirty_event = asyncio.Event()
        self._during_reload: dict[str, set[str]] | None = None
        self._listener: asyncpg.Connection | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.on_device_change: Callable[[uuid.UUID], None] = lambda _id: None
        # A device took a new epoch (a new writer, migration 0006), maybe on another
        # server: called with the device and its epoch now.
        self.on_stream_change: Callable[[uuid.UUID, int], None] = lambda _id, _epoch: None
        # Devices whose changes matter now (those with open streams): re-read at every
        # full reload, which catches a revocation whose NOTIFY was lost.
        self.watched_devices: Callable[[], list[uuid.UUID]] = list

    # -- lookups on the hot path (no awaits) -----------------------------------

    def is_high_risk(self, person_id: bytes, now: float) -> bool:
        expiry = self.high_risk.get(person_id)
        return expiry is not None and expiry > now

    async def device(self, device_id: uuid.UUID) -> DeviceInfo | None:
        if device_id in self._devices:
            return self._devices[device_id]
        row = await self._pool.fetchrow(Q["get_device"], device_id)
        if row is None:
            return None  # not remembered: the device may be registered a moment later
        found = self._devices[device_id] = _device(row)
        return found

    async def venue(self, venue_id: uuid.UUID) -> VenueInfo | None:
        if venue_id not in self._venues:
            row = await self._pool.fetchrow(Q["get_venue_state"], venue_id)
            self._venues[venue_id] = _venue(row) if row else None
        return self._venues[venue_id]

    def device_now(self, device_id: uuid.UUID) -> DeviceInfo | None:
        """The cached device, without a query: None when unknown, deleted or not loaded."""
        return self._devices.get(device_id)

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        sizes = {
            "high_risk": lambda: len(self.high_risk),
            "erased": lambda: len(self.erased),
            "devices": lambda: len(self._devices),
            "venues": lambda: len(self._venues),
        }
        for cache, size in sizes.items():
            metrics.scrape_function(metrics.CACHE_ENTRIES, size, cache=cache)
        await self._listen()
        await self.reload()
        self._tasks = [
            asyncio.create_task(self._apply_notifications(), name="cache-notify"),
            asyncio.create_task(self._refresh_periodically(), name="cache-refresh"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._listener is not None and not self._listener.is_closed():
            await self._listener.close()

    async def _listen(self) -> None:
        args = db.connect_args(self._settings, db.SERVICE_ROLES["checkin"])
        conn = await asyncpg.connect(
            **args.kwargs(), server_settings={"application_name": "stopcovid_checkin_listen"}
        )
        for channel in CHANNELS:
            await conn.add_listener(channel, self._notified)
        self._listener = conn

    def _notified(self, _conn: object, _pid: int, channel: str, payload: str) -> None:
        self._dirty[channel].add(payload)
        if self._during_reload is not None:
            self._during_reload[channel].add(payload)
        self._dirty_event.set()

    async def reload(self) -> None:
        """Reload everything: the risk and erasure sets whole, devices and venues lazily.

        A change notified while the reload reads may be applied (by its NOTIFY)
        before the reload's older reading replaces the sets; so whatever was
        notified meanwhile is applied once more afterwards, from a fresh read."""
        self._during_reload = {channel: set() for channel in CHANNELS}
        try:
            await self._reload()
            metrics.CACHE_RELOADED.set_to_current_time()
        finally:
            notified, self._during_reload = self._during_reload, None
            if any(notified.values()):
                for channel, ids in notified.items():
                    self._dirty[channel] |= ids
                self._dirty_event.set()

    async def _reload(self) -> None:
        async with self._pool.acquire() as conn:
            high = await conn.fetch(Q["high_risk_people"])
            erased = await conn.fetch(Q["erased_people"])
        self.high_risk = {r["person_id"].bytes: r["expire_time"].timestamp() for r in high}
        self.erased = {r["person_id"].bytes for r in erased}
        self._devices.clear()
        self._venues.clear()
        watched = self.watched_devices()
        if watched:
            rows = await self._pool.fetch(Q["get_devices"], watched)
            for row in rows:
                self._devices[row["device_id"]] = _device(row)
            for device_id in watched:
                self._devices.setdefault(device_id, None)
                self.on_device_change(device_id)

    async def _refresh_periodically(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            listener_lost = self._listener is None or self._listener.is_closed()
            due = time.monotonic() - last >= self._settings.cache_refresh_s
            if not (listener_lost or due):
                continue
            try:
                if listener_lost:
                    await self._listen()
                    log.info("cache_listener_reconnected")
                await self.reload()
                last = time.monotonic()
            except db.TRANSIENT_ERRORS as exc:
                log.warning("cache_reload_failed", error_type=type(exc).__name__)

    async def _apply_notifications(self) -> None:
        while True:
            await self._dirty_event.wait()
            await asyncio.sleep(_COALESCE_S)
            self._dirty_event.clear()
            dirty, self._dirty = self._dirty, {channel: set() for channel in CHANNELS}
            try:
                await self._apply(dirty)
            except db.TRANSIENT_ERRORS as exc:
                # The periodic reload will catch up; force it soon.
                log.warning("cache_apply_failed", error_type=type(exc).__name__)
                for channel, ids in dirty.items():
                    self._dirty[channel] |= ids
                self._dirty_event.set()
                await asyncio.sleep(1.0)

    async def _apply(self, dirty: dict[str, set[str]]) -> None:
        risk = _uuids(dirty[channels.RISK])
        erased = _uuids(dirty[channels.ERASED])
        devices = _uuids(dirty[channels.DEVICE])
        venues = _uuids(dirty[channels.VENUE])
        streams = _uuids(dirty[channels.STREAM])
        epochs: list[asyncpg.Record] = []
        async with self._pool.acquire() as conn:
            if streams:
                epochs = await conn.fetch(Q["device_epochs"], streams)
            if risk:
                rows = await conn.fetch(Q["risk_of_people"], risk)
                levels = {r["person_id"]: r for r in rows}
                for person in risk:
                    row = levels.get(person)
                    if row is not None and row["level"] == risk_levels.HIGH:
                        self.high_risk[person.bytes] = row["expire_time"].timestamp()
                    else:
                        self.high_risk.pop(person.bytes, None)
            if erased:
                rows = await conn.fetch(Q["erased_among"], erased)
                still = {r["person_id"] for r in rows}
                for person in erased:
                    if person in still:
                        self.erased.add(person.bytes)
                    else:
                        self.erased.discard(person.bytes)
            if devices:
                rows = await conn.fetch(Q["get_devices"], devices)
                found = {r["device_id"]: _device(r) for r in rows}
                for device_id in devices:
                    self._devices[device_id] = found.get(device_id)
            if venues:
                rows = await conn.fetch(Q["get_venue_states"], venues)
                found_venues = {r["venue_id"]: _venue(r) for r in rows}
                for venue_id in venues:
                    self._venues[venue_id] = found_venues.get(venue_id)
        for device_id in devices:
            self.on_device_change(device_id)
        for row in epochs:
            self.on_stream_change(row["device_id"], row["epoch"])


def _uuids(values: set[str]) -> list[uuid.UUID]:
    found = []
    for value in values:
        with contextlib.suppress(ValueError):
            found.append(uuid.UUID(value))
    return found


def _device(row: asyncpg.Record) -> DeviceInfo:
    return DeviceInfo(
        device_id=row["device_id"],
        venue_id=row["venue_id"],
        active=row["state"] == "active",
        certificate_serial=row["certificate_serial"],
    )


def _venue(row: asyncpg.Record) -> VenueInfo:
    return VenueInfo(
        venue_id=row["venue_id"], active=row["state"] == "active", display_name=row["display_name"]
    )
