"""Times as the Retention API takes and gives them, the same way in every RPC: time
ranges (`stopcovid.common.v1.TimeRange`: half-open, either end optional), and
instants that may be unset."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from google.protobuf import timestamp_pb2
from stopcovid.common.v1 import common_pb2

from services.kernel import errors
from services.kernel.rpc import timestamp


def instant(value: dt.datetime | None) -> timestamp_pb2.Timestamp | None:
    """A Timestamp, or None (an unset field) for a time that has not happened."""
    return None if value is None else timestamp(value)


@dataclass(frozen=True)
class Span:
    """[start, end); None for an open end."""

    start: dt.datetime | None = None
    end: dt.datetime | None = None

    @classmethod
    def of(cls, value: common_pb2.TimeRange, field: str) -> Span:
        """A request's range; INVALID_ARGUMENT naming `field` when it ends before it starts."""
        start = value.start_time.ToDatetime(dt.UTC) if value.HasField("start_time") else None
        end = value.end_time.ToDatetime(dt.UTC) if value.HasField("end_time") else None
        if start is not None and end is not None and end < start:
            raise errors.InvalidArgument(
                f"{field}.end_time must not be before its start_time", field=field
            )
        return cls(start, end)

    def filters(self) -> dict[str, str | None]:
        """The range as a page token's filters hold it."""
        return {
            "start": self.start.isoformat() if self.start else None,
            "end": self.end.isoformat() if self.end else None,
        }

    def to_proto(self) -> common_pb2.TimeRange:
        found = common_pb2.TimeRange()
        if self.start is not None:
            found.start_time.CopyFrom(timestamp(self.start))
        if self.end is not None:
            found.end_time.CopyFrom(timestamp(self.end))
        return found
