"""Input checks shared by the services; each failure names the offending field."""

from __future__ import annotations

import datetime as dt
import uuid

from google.protobuf import duration_pb2

from services.kernel import errors


def text(value: str, field: str, *, min_len: int = 1, max_len: int) -> str:
    """A string with surrounding blanks removed, of bounded length, without control characters."""
    cleaned = value.strip()
    if not min_len <= len(cleaned) <= max_len:
        if min_len and not cleaned:
            raise errors.InvalidArgument(f"{field} is required", field=field)
        raise errors.InvalidArgument(
            f"{field} must be {min_len} to {max_len} characters", field=field
        )
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in cleaned):
        raise errors.InvalidArgument(f"{field} must not contain control characters", field=field)
    return cleaned


def uuid_id(value: str, field: str) -> uuid.UUID:
    if not value:
        raise errors.InvalidArgument(f"{field} is required", field=field)
    try:
        return uuid.UUID(value)
    except ValueError:
        raise errors.InvalidArgument(f"{field} must be a UUID", field=field) from None


def optional_uuid(value: str, field: str) -> uuid.UUID | None:
    return uuid_id(value, field) if value else None


def duration(
    value: duration_pb2.Duration, field: str, *, low: dt.timedelta, high: dt.timedelta
) -> dt.timedelta:
    if value.nanos < 0 or value.seconds < 0:
        raise errors.InvalidArgument(f"{field} must not be negative", field=field)
    span = value.ToTimedelta()
    if not low <= span <= high:
        raise errors.InvalidArgument(f"{field} must be between {low} and {high}", field=field)
    return span
