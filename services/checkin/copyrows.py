"""Scans as Postgres binary COPY rows, encoded once, as they are decided.

The group commit sends every stored scan through COPY. Handing asyncpg Python
tuples makes it encode twelve columns a row through its per-type codecs (two
timestamps through datetime arithmetic): a fifth of the CheckIn server's CPU at
full load (measured with py-spy). The columns' bytes are mostly the same for
every scan of a batch (the venue, the device, the day's key id, the receive
time), so a row is a few precomputed pieces and two packed integers; the batch
becomes one bytes object that COPY ... (FORMAT binary) takes as it is.

The layout is the inbox row's (services/domain/checkins/inbox.py, COLUMNS), which
the store shares; tests/test_copyrows.py writes encoded rows through real COPY
into both tables and reads them back.
"""

from __future__ import annotations

import datetime as dt
import struct
import uuid
from collections.abc import AsyncIterator, Callable

from services.domain.checkins.inbox import COLUMNS

HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
TRAILER = struct.pack("!h", -1)

_PG_EPOCH_US = 946_684_800_000_000
"""2000-01-01 00:00 UTC, Postgres's epoch, in microseconds since the Unix epoch."""
_PG_EPOCH_DAYS = 10_957
"""2000-01-01 in days since 1970-01-01."""

_NULL = struct.pack("!i", -1)
_COUNT = struct.pack("!h", len(COLUMNS))
_TIMES = struct.Struct("!iqiq")  # sequence (int8), scan_time (timestamptz)
_TIME = struct.Struct("!iq")
_LENGTHS = {n: struct.pack("!i", n) for n in (0, 16, 44)}
"""Length prefixes of the bytea columns: a pseudonym is 16 bytes, a sealed person id
44 (nonce, id, tag); any other length is packed when met."""


PERSON_REF_BYTES = 16
PERSON_ENC_BYTES = 44
"""The sizes of a pseudonym (HMAC-SHA256 cut to 16 bytes) and a sealed person id
(a 12-byte nonce, the 16-byte id, a 16-byte tag): `RowEncoder.packer` rows."""


def _length(n: int) -> bytes:
    return _LENGTHS.get(n) or struct.pack("!i", n)


def _text(value: str) -> bytes:
    raw = value.encode()
    return struct.pack("!i", len(raw)) + raw


def _uuid(value: uuid.UUID | None) -> bytes:
    return _NULL if value is None else struct.pack("!i", 16) + value.bytes


class RowEncoder:
    """Encodes the rows of one batch: one venue, one device (or none), one receive
    time. `row()` returns a row's bytes; join a batch's rows and put HEADER before
    and TRAILER after a group of batches to make a COPY stream."""

    __slots__ = ("_days", "_device", "_receive", "_shape", "_venue")

    def __init__(self, venue_id: uuid.UUID, device_id: uuid.UUID | None, receive_us: int) -> None:
        self._venue = _uuid(venue_id)
        self._device = device_id is not None
        self._days: dict[dt.date, tuple[bytes, bytes]] = {}
        self._receive = _TIME.pack(8, receive_us - _PG_EPOCH_US)
        self._shape: dict[tuple[str, str], bytes] = {
            (direction, outcome): _text(direction) + _text(outcome)
            for direction in ("entry", "exit")
            for outcome in ("admitted", "denied")
        }
        self._venue += _uuid(device_id)

    def _day(self, day: dt.date, key_id: str) -> tuple[bytes, bytes]:
        pieces = self._days.get(day)
        if pieces is None:
            days = day.toordinal() - dt.date(1970, 1, 1).toordinal() - _PG_EPOCH_DAYS
            pieces = _COUNT + struct.pack("!ii", 4, days) + self._venue, _text(key_id)
            self._days[day] = pieces
        return pieces

    def packer(
        self, day: dt.date, key_id: str, direction: str, outcome: str
    ) -> Callable[[int, int, bytes, bytes], bytes]:
        """`row` for the common shape, as one struct per row: a device's scan (with a
        sequence) of `day`, `direction` and `outcome`, without a decision id, whose
        pseudonym and sealed person id have the usual sizes. The packer takes
        (sequence, scan_us, person_ref, person_enc) and gives the same bytes as `row`;
        a person_ref or person_enc of another size raises ValueError (a struct would
        pad or cut it silently)."""
        if not self._device:
            raise ValueError("a packer is for a device's rows (with a sequence)")
        head, key = self._day(day, key_id)
        before = head + _length(8)
        middle = self._shape[direction, outcome] + _NULL + key + _length(PERSON_REF_BYTES)
        after = self._receive
        pack = struct.Struct(
            f"!{len(before)}s q i q {len(middle)}s {PERSON_REF_BYTES}s i "
            f"{PERSON_ENC_BYTES}s {len(after)}s"
        ).pack
        eight, enc_bytes, epoch = 8, PERSON_ENC_BYTES, _PG_EPOCH_US

        def packed(sequence: int, scan_us: int, person_ref: bytes, person_enc: bytes) -> bytes:
            if len(person_ref) != PERSON_REF_BYTES or len(person_enc) != enc_bytes:
                raise ValueError("a pseudonym or sealed person id of an unexpected size")
            return pack(
                before,
                sequence,
                eight,
                scan_us - epoch,
                middle,
                person_ref,
                enc_bytes,
                person_enc,
                after,
            )

        return packed

    def row(  # noqa: PLR0917 - called per scan: positional is the cheap call
        self,
        day: dt.date,
        key_id: str,
        sequence: int | None,
        scan_us: int,
        direction: str,
        outcome: str,
        decision_id: uuid.UUID | None,
        person_ref: bytes,
        person_enc: bytes,
    ) -> bytes:
        head, key = self._day(day, key_id)
        if self._device and sequence is not None:
            times = _TIMES.pack(8, sequence, 8, scan_us - _PG_EPOCH_US)
        else:
            times = _NULL + _TIME.pack(8, scan_us - _PG_EPOCH_US)
        decision = _NULL if decision_id is None else _uuid(decision_id)
        return b"".join(
            (
                head,
                times,
                self._shape[direction, outcome],
                decision,
                key,
                _length(len(person_ref)),
                person_ref,
                _length(len(person_enc)),
                person_enc,
                self._receive,
            )
        )


async def stream(chunks: list[bytes]) -> AsyncIterator[bytes]:
    """A whole COPY stream of encoded rows (or batches of them), as asyncpg's
    copy_to_table takes it without a thread (a file-like source is read in one)."""
    yield b"".join((HEADER, *chunks, TRAILER))
