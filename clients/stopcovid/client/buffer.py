"""A scanner device's durable local buffer of scans, in SQLite.

A venue door cannot wait for the network: the device records every scan here first and
streams it later (`stopcovid.client.device.DeviceClient`). The platform promises that nothing a
device recorded is lost and nothing is stored twice, and the device's half of that promise
lives in this file:

- the device's sequence counter is persisted in the same transaction as the scan it
  numbers, so a crash or power cut never hands out a number twice (a reused number would be
  refused by the server as SEQUENCE_REUSED, or worse, mistaken for a resend);
- a scan leaves the buffer only when the server acknowledged it (`ack`), so everything
  unacknowledged survives a restart and is resent with its original number;
- WAL with `synchronous=FULL` makes every commit durable before `add` returns.

Commits cost an fsync each, so the bulk operations (`add_many`, `ack`) put a whole batch
in one transaction. The simulator's load runs, which must not be limited by the disk of
the machine running them, use `ScanBuffer.volatile()`: the same code on an in-memory
database, which keeps nothing across a restart.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from stopcovid.client._closing import Closing

__all__ = ["BufferedScan", "ScanBuffer"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS counter (
    id             INTEGER PRIMARY KEY CHECK (id = 1),
    last_sequence  INTEGER NOT NULL,
    server_seen    INTEGER NOT NULL
);
INSERT OR IGNORE INTO counter (id, last_sequence, server_seen) VALUES (1, 0, 0);
CREATE TABLE IF NOT EXISTS scans (
    sequence       INTEGER PRIMARY KEY,
    token          TEXT NOT NULL,
    scan_time_us   INTEGER NOT NULL,
    direction      INTEGER NOT NULL
);
"""

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _to_micros(when: dt.datetime) -> int:
    if when.tzinfo is None:
        raise ValueError("scan_time must be timezone-aware")
    return (when - _EPOCH) // dt.timedelta(microseconds=1)


@dataclass(frozen=True, slots=True)
class BufferedScan:
    """One scan waiting for its acknowledgement."""

    sequence: int
    token: str
    scan_time_us: int
    """Microseconds since the Unix epoch, UTC: an integer, so it round-trips exactly."""
    direction: int
    """A `stopcovid.common.v1.ScanDirection` value."""

    @property
    def scan_time(self) -> dt.datetime:
        return _EPOCH + dt.timedelta(microseconds=self.scan_time_us)


class ScanBuffer(Closing):
    """The scans a device has recorded and the server has not yet acknowledged.

    Open it with `ScanBuffer(path)`; it creates the file on first use. One process should
    own a buffer file at a time (SQLite's locking keeps concurrent writers correct, but two
    devices sharing a counter would be two devices with one identity). Methods are
    thread-safe and short; they block on the disk for one commit at most.
    """

    def __init__(self, path: str | Path, *, _volatile: bool = False) -> None:
        self.path = None if _volatile else Path(path)
        self.durable = not _volatile
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE), so the counter
        # read-and-increment cannot interleave with another writer.
        self._db = sqlite3.connect(
            ":memory:" if _volatile else str(path), isolation_level=None, check_same_thread=False
        )
        self._lock = threading.Lock()
        if self.durable:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
        else:
            self._db.execute("PRAGMA synchronous=OFF")
        self._db.executescript(_SCHEMA)
        row = self._db.execute("SELECT last_sequence FROM counter").fetchone()
        self._last_sequence: int = row[0]
        self._count: int = self._db.execute("SELECT count(*) FROM scans").fetchone()[0]

    @classmethod
    def volatile(cls) -> ScanBuffer:
        """A buffer in memory only: NOT durable, everything is gone when the process ends.

        For load runs of the simulator, whose subject is the server, not this machine's
        disk. A real device must never use it.
        """
        return cls(":memory:", _volatile=True)

    # -- writing -------------------------------------------------------------------------

    def add(self, token: str, scan_time: dt.datetime, direction: int) -> int:
        """Record one scan durably and return the sequence number it was given."""
        return self.add_many([(token, scan_time, direction)])[0]

    def add_many(self, scans: Iterable[tuple[str, dt.datetime, int]]) -> list[int]:
        """Record several scans in one transaction (one fsync); return their numbers, in
        order. Either all are recorded or, on error, none and no number is used up."""
        rows = [(token, _to_micros(when), int(direction)) for token, when, direction in scans]
        if not rows:
            return []
        with self._lock:
            first = self._last_sequence + 1
            numbered = [(first + i, *row) for i, row in enumerate(rows)]
            last = first + len(rows) - 1
            with self._write():
                self._db.executemany(
                    "INSERT INTO scans (sequence, token, scan_time_us, direction)"
                    " VALUES (?, ?, ?, ?)",
                    numbered,
                )
                self._db.execute("UPDATE counter SET last_sequence = ?", (last,))
            self._last_sequence = last
            self._count += len(rows)
        return list(range(first, last + 1))

    def ack(self, sequences: Iterable[int]) -> int:
        """Forget acknowledged scans (whatever their outcome: every ack is final), in one
        transaction. Unknown numbers are ignored, so a repeated ack is harmless. Returns
        how many scans were removed."""
        params = [(int(s),) for s in sequences]
        if not params:
            return 0
        with self._lock:
            with self._write():
                before = self._db.total_changes
                self._db.executemany("DELETE FROM scans WHERE sequence = ?", params)
                removed = self._db.total_changes - before
            self._count -= removed
        return removed

    def raise_floor(self, last_stored_sequence: int) -> None:
        """Continue numbering above the server's `StreamSettings.last_stored_sequence`.

        A device that lost its counter (a wiped or replaced buffer) would otherwise reuse
        numbers the server already holds. If this buffer has never been connected, its
        scans were never sent, so any numbered at or below the floor are renumbered above
        it rather than refused as SEQUENCE_REUSED. Once connected, numbers are never
        changed: a sent scan must keep its number to be recognised as a resend. So
        whatever sends from this buffer must call this with each stream's settings before
        its first send (DeviceClient does).
        """
        with self._lock:
            with self._write():
                (server_seen,) = self._db.execute("SELECT server_seen FROM counter").fetchone()
                last = max(self._last_sequence, int(last_stored_sequence))
                if not server_seen:
                    low = self._db.execute(
                        "SELECT sequence FROM scans WHERE sequence <= ? ORDER BY sequence",
                        (int(last_stored_sequence),),
                    ).fetchall()
                    if low:
                        # Shift the whole low range past everything in use, keeping order.
                        offset = last - low[0][0] + 1
                        self._db.execute(
                            "UPDATE scans SET sequence = -(sequence + ?) WHERE sequence <= ?",
                            (offset, int(last_stored_sequence)),
                        )
                        self._db.execute("UPDATE scans SET sequence = -sequence WHERE sequence < 0")
                        last = max(last, low[-1][0] + offset)
                self._db.execute("UPDATE counter SET last_sequence = ?, server_seen = 1", (last,))
            self._last_sequence = last

    # -- reading -------------------------------------------------------------------------

    def pending(self, limit: int, after: int = 0) -> list[BufferedScan]:
        """Up to `limit` unacknowledged scans numbered above `after`, lowest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT sequence, token, scan_time_us, direction FROM scans"
                " WHERE sequence > ? ORDER BY sequence LIMIT ?",
                (int(after), int(limit)),
            ).fetchall()
        return [BufferedScan(*row) for row in rows]

    def sequences(self) -> Sequence[int]:
        """Every unacknowledged sequence number, lowest first (for checks and tests)."""
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT sequence FROM scans ORDER BY 1")]

    @property
    def last_sequence(self) -> int:
        """The highest number handed out so far (0 before the first scan)."""
        return self._last_sequence

    def __len__(self) -> int:
        """How many scans wait for an acknowledgement."""
        return self._count

    @contextlib.contextmanager
    def _write(self) -> Iterator[None]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT), rolled back on any
        exception, the commit's own included. The caller holds the lock."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    # -- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._db.close()
