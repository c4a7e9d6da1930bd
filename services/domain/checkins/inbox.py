"""The inbox row: one acknowledged scan as the CheckIn servers write it to
`scan_inbox`, and as the ingest workers move it into `checkins` (which has the
same columns plus `store_time`). The columns are defined here once, in table
order; tests/test_contracts.py checks them against both tables.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid


@dataclasses.dataclass(frozen=True)
class ScanEvent:
    """A scan as it happened: where, when, by which device, which way. The first
    columns of the inbox row, and what the trace reads of each stored scan besides
    its person columns (services/domain/exposure/tracing.py, Scan)."""

    day: dt.date
    """The scan's UTC day: its partition in the store and its day key."""
    venue_id: uuid.UUID
    device_id: uuid.UUID | None
    """None for a self check-in (no device)."""
    sequence: int | None
    """The device's sequence number; None for a self check-in."""
    scan_time: dt.datetime
    direction: str
    """DIRECTIONS: 'entry' or 'exit'."""


@dataclasses.dataclass(frozen=True)
class InboxRow(ScanEvent):
    """The inbox row, its fields the columns in table order."""

    outcome: str
    """OUTCOMES: 'admitted' or 'denied'."""
    decision_id: uuid.UUID | None
    """The appealable decision of a denial; None when admitted."""
    day_key_id: str
    person_ref: bytes
    """The person's pseudonym for the day (HMAC under the day key)."""
    person_enc: bytes
    """The person id sealed under the day key (services.kernel.keys.seal_row)."""
    receive_time: dt.datetime


COLUMNS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(InboxRow))

DIRECTIONS = ("entry", "exit")
OUTCOMES = ("admitted", "denied")
