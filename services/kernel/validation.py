"""Input checks shared by the services; each failure names the offending field.

`check_message` is the edge: the interceptor runs it on every request message of
every server before the handler, refusing NUL and control characters in any string
and out-of-range Timestamps and Durations. The checks below it are the handlers'
own, per field (lengths, UUIDs, a field's own bounds, field masks)."""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Collection, Iterable
from typing import Any

from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

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


# -- the edge: every request message, before any handler sees it -------------------

# A NUL cannot be stored in Postgres text and ends C strings; the other C0 and C1
# controls have no place in any field of this API. Tab, newline and carriage return
# may appear in free text (an address, a grievance); single-line fields refuse them
# in their own checks (text() above).
_BAD_CHARACTER = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")

# The instants and spans any field of the API may hold. Python's datetime ends in
# year 9999 and Postgres' interval at about 178 million years, so a value near
# either end would overflow in arithmetic (a grant's end, a window's start) deep in
# a handler; well inside both, these bounds leave room for any such arithmetic.
EARLIEST_SECONDS = 0  # 1970-01-01T00:00:00Z
LATEST_SECONDS = 7258118400  # 2200-01-01T00:00:00Z
MAX_DURATION_SECONDS = 100 * 36525 * 864  # 100 Julian years
_NANOS = 1_000_000_000

_TIMESTAMP = timestamp_pb2.Timestamp.DESCRIPTOR.full_name
_DURATION = duration_pb2.Duration.DESCRIPTOR.full_name

PER_ITEM_MESSAGES = frozenset({"stopcovid.checkin.v1.Scan"})
"""Messages a handler judges one by one, answering each in its reply (a scan in a
batch is rejected alone, with its reason in the ack, and the rest of the batch is
stored): refusing the whole call here would break that promise. Their handlers
check every field they read (a token's strict decoding, a scan time's bounds)."""

_MAX_FIELD_PATH = 200


def _refuse(path: str, message: str, reason: str) -> errors.InvalidArgument:
    field = path[:_MAX_FIELD_PATH]
    return errors.InvalidArgument(f"{field} {message}", reason=reason, field=field)


def _check_string(value: str, path: str) -> None:
    if _BAD_CHARACTER.search(value):
        raise _refuse(path, "must not contain NUL or control characters", "INVALID_CHARACTERS")


def _check_time(message: Message, path: str) -> None:
    seconds: int = getattr(message, "seconds")  # noqa: B009 (descriptor-typed)
    nanos: int = getattr(message, "nanos")  # noqa: B009
    if message.DESCRIPTOR.full_name == _TIMESTAMP:
        if not EARLIEST_SECONDS <= seconds < LATEST_SECONDS or not 0 <= nanos < _NANOS:
            raise _refuse(path, "must be a time from 1970 to 2199", "TIME_OUT_OF_RANGE")
    elif (
        abs(seconds) > MAX_DURATION_SECONDS
        or abs(nanos) >= _NANOS
        or (seconds > 0 and nanos < 0)
        or (seconds < 0 and nanos > 0)
    ):
        raise _refuse(path, "must be a duration of at most 100 years", "TIME_OUT_OF_RANGE")


def _check_value(field: FieldDescriptor, value: Any, path: str) -> None:
    if field.type == FieldDescriptor.TYPE_STRING:
        _check_string(value, path)
    elif field.type in (FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_GROUP):
        check_message(value, path)


def check_message(message: Message, path: str = "") -> None:
    """Refuse `message` (INVALID_ARGUMENT, naming the field by its path) if any
    string in it, at any depth, holds a NUL or a control character, or any
    Timestamp or Duration is out of range. Runs on every request the servers
    receive (the interceptor), so that no handler converts or stores such a value."""
    name = message.DESCRIPTOR.full_name
    if name in (_TIMESTAMP, _DURATION):
        _check_time(message, path or name)
        return
    for field, value in message.ListFields():
        where = f"{path}.{field.name}" if path else field.name
        kind = field.message_type
        if kind is not None and kind.full_name in PER_ITEM_MESSAGES:
            continue
        if kind is not None and kind.GetOptions().map_entry:
            key_field = kind.fields_by_name["key"]
            value_field = kind.fields_by_name["value"]
            for key in value:
                _check_value(key_field, key, f"{where}[key]")
                _check_value(value_field, value[key], f"{where}[{key!r}]"[:_MAX_FIELD_PATH])
        elif field.is_repeated:
            for index, item in enumerate(value):
                _check_value(field, item, f"{where}[{index}]")
        else:
            _check_value(field, value, where)


def mask_paths(paths: Iterable[str], allowed: Collection[str], field: str) -> list[str]:
    """The distinct paths of a field mask, in their first order (a path repeated
    is one path, in the change and in its audit entry); refused when it names a
    path outside `allowed` (the message names the first few, and how many more)."""
    distinct = list(dict.fromkeys(paths))
    unknown = sorted(path for path in distinct if path not in allowed)
    if unknown:
        shown = ", ".join(repr(path[:64]) for path in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise errors.InvalidArgument(
            f"{field} names fields that cannot be updated: {shown}{more}", field=field
        )
    return distinct
