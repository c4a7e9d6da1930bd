"""The Exposure API and the exposure records, converted in one place each way:
one function per message out (`case`, `access_request`, `grant`, `trace`,
`contact`, `notification`; risk statuses are risk.status_to_proto, shared with
the Retention service), and the request fields that need more than a check of
their own (calendar dates, time ranges, a minimum risk level, enum filters).

The words the database stores for an enum's values are the values' names
without the enum's prefix, in lower case (TRACE_STATE_SUCCEEDED is 'succeeded'):
`EnumMap` reads them from the proto, and the schema's CHECKs name the same words
(tests/test_exposure_queries.py). Calendar dates are Cambodia's.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from google.protobuf.timestamp_pb2 import Timestamp
from stopcovid.common.v1 import common_pb2
from stopcovid.exposure.v1 import exposure_service_pb2 as pb

from services.domain.exposure import grants, risk
from services.domain.exposure.records import (
    AccessRequest,
    Case,
    Grant,
    Notification,
    Trace,
    TraceContact,
)
from services.kernel import errors
from services.kernel.rpc import duration, timestamp

if TYPE_CHECKING:  # the generic wrapper exists in the stubs only
    from google.protobuf.internal.enum_type_wrapper import _EnumTypeWrapper

V = TypeVar("V", bound=int)


class EnumMap(Mapping[str, V], Generic[V]):
    """A proto enum as the database's words: word -> value, and back with `name`.
    UNSPECIFIED (0) has no word."""

    def __init__(self, enum: _EnumTypeWrapper[V]) -> None:
        self.enum = enum.DESCRIPTOR.name
        prefix = enum.DESCRIPTOR.values[0].name.removesuffix("UNSPECIFIED")
        self._numbers = {
            name.removeprefix(prefix).lower(): number for name, number in enum.items() if number
        }
        self._words: dict[int, str] = {number: word for word, number in self._numbers.items()}

    def __getitem__(self, word: str) -> V:
        return self._numbers[word]

    def __iter__(self) -> Iterator[str]:
        return iter(self._numbers)

    def __len__(self) -> int:
        return len(self._numbers)

    def name(self, number: int) -> str:
        """The word of a value; KeyError for UNSPECIFIED or an unknown number."""
        return self._words[number]

    def filter(self, number: int, field: str) -> str | None:
        """The word of an optional filter: None when unset (0), INVALID_ARGUMENT
        naming `field` when the enum has no such value."""
        if number == 0:
            return None
        if number not in self._words:
            raise errors.InvalidArgument(f"{field} is not a known {self.enum}", field=field)
        return self._words[number]


REQUEST_STATES = EnumMap(pb.AccessRequestState)
GRANT_STATES = EnumMap(pb.AccessGrantState)
"""The words of grants.state."""
TRACE_STATES = EnumMap(pb.TraceState)
SKIP_REASONS = EnumMap(pb.TraceSkipReason)
"""traces.skipped_rows keys (tracing.SKIP_REASONS)."""
TRACE_STEPS = EnumMap(pb.TraceStep)
"""traces.failure_step (tracing.STEPS)."""
NOTIFICATION_STATES = EnumMap(pb.NotificationState)
ENUMS: dict[str, EnumMap[Any]] = {
    m.enum: m
    for m in (
        REQUEST_STATES,
        GRANT_STATES,
        TRACE_STATES,
        SKIP_REASONS,
        TRACE_STEPS,
        NOTIFICATION_STATES,
    )
}
"""Each map by its enum's name."""

# -- messages out --------------------------------------------------------------------


def time_range(start: dt.datetime, end: dt.datetime) -> common_pb2.TimeRange:
    return common_pb2.TimeRange(start_time=timestamp(start), end_time=timestamp(end))


def _at(value: dt.datetime | None) -> Timestamp | None:
    """An optional instant: unset in the message while the column is NULL."""
    return None if value is None else timestamp(value)


def case(found: Case) -> pb.Case:
    onset = found.symptom_onset_date
    return pb.Case(
        case_id=str(found.case_id),
        external_reference=found.external_reference,
        test_date=found.test_date.isoformat(),
        symptom_onset_date=onset.isoformat() if onset else "",
        infectious_window=time_range(found.window_start, found.window_end),
        report_time=timestamp(found.report_time),
        reporter=found.reporter,
    )


def grant(found: Grant) -> pb.AccessGrant:
    """The grant with its state now."""
    return pb.AccessGrant(
        grant_id=str(found.grant_id),
        case_id=str(found.case_id),
        window=time_range(found.window_start, found.window_end),
        state=GRANT_STATES[grants.state(found)],
        create_time=timestamp(found.create_time),
        expire_time=timestamp(found.expire_time),
        revoke_time=_at(found.revoke_time),
        revoker=found.revoker or "",
        revoke_reason=found.revoke_reason,
    )


def access_request(found: AccessRequest) -> pb.AccessRequest:
    """The request and, once approved, its grant."""
    return pb.AccessRequest(
        access_request_id=str(found.access_request_id),
        case_id=str(found.case_id),
        outbreak_reference=found.outbreak_reference,
        justification=found.justification,
        window=time_range(found.window_start, found.window_end),
        state=REQUEST_STATES[found.state],
        requester=found.requester,
        create_time=timestamp(found.create_time),
        decider=found.decider or "",
        decide_time=_at(found.decide_time),
        decision_comment=found.decision_comment,
        grant=None if found.grant is None else grant(found.grant),
    )


def trace(found: Trace) -> pb.Trace:
    """The trace with its results: people by level (highest first), rows skipped by
    reason, and where it failed."""
    failure = None
    if found.state == "failed":
        step = TRACE_STEPS.get(found.failure_step or "", pb.TRACE_STEP_UNSPECIFIED)
        failure = pb.TraceFailure(step=step, error_type=found.failure_error)
    return pb.Trace(
        trace_id=str(found.trace_id),
        case_id=str(found.case_id),
        grant_id=str(found.grant_id),
        state=TRACE_STATES[found.state],
        window=time_range(found.window_start, found.window_end),
        starter=found.starter,
        create_time=timestamp(found.create_time),
        start_time=_at(found.start_time),
        end_time=_at(found.end_time),
        visits_found=found.visits_found,
        visits_searched=found.visits_searched,
        contacts_found=found.contacts_found,
        level_counts=[
            pb.TraceLevelCount(risk_level=risk.LEVELS[level], people=people)
            for level in risk.RAISED
            if (people := found.level_counts.get(level))
        ],
        error_message=found.error_message,
        skipped_rows=[
            pb.TraceSkippedRows(reason=number, rows=rows)
            for reason, number in SKIP_REASONS.items()
            if (rows := found.skipped_rows.get(reason))
        ],
        erased_contacts=found.erased_contacts,
        case_contacts=found.case_contacts,
        failure=failure,
    )


def contact(found: TraceContact, person_id: str = "") -> pb.TraceContact:
    """A contact; its person id only when the caller may see it (else empty)."""
    return pb.TraceContact(
        contact_ref=found.contact_ref,
        venue_id=str(found.venue_id),
        case_visit=time_range(found.case_visit_start, found.case_visit_end),
        contact_stay=time_range(found.contact_stay_start, found.contact_stay_end),
        overlap=duration(found.overlap),
        stay_end_estimated=found.stay_end_estimated,
        risk_level=common_pb2.RiskLevel.ValueType(found.level_rank),
        rule=found.rule,
        person_id=person_id,
    )


def notification(found: Notification) -> pb.Notification:
    """A message without its recipient; its next attempt while it is queued."""
    queued = found.state == "queued"
    return pb.Notification(
        notification_id=str(found.notification_id),
        trace_id=str(found.trace_id),
        contact_ref=found.contact_ref,
        risk_level=risk.LEVELS[found.risk_level],
        template=found.template,
        state=NOTIFICATION_STATES[found.state],
        attempt_count=found.attempt_count,
        last_error=found.last_error,
        create_time=timestamp(found.create_time),
        next_attempt_time=_at(found.next_attempt_time if queued else None),
        send_time=_at(found.send_time),
    )


# -- request fields in ---------------------------------------------------------------

_DATE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")
MAX_DATE_AGE = dt.timedelta(days=90)
"""Dates further back than the longest retention name data the platform no longer has."""


def calendar_date(value: str, field: str, today: dt.date, *, required: bool) -> dt.date | None:
    """A "YYYY-MM-DD" date in Cambodia, not after `today` nor older than 90 days;
    None when empty and not `required`."""
    if not value:
        if required:
            raise errors.InvalidArgument(f"{field} is required", field=field)
        return None
    if not _DATE.match(value):
        raise errors.InvalidArgument(f"{field} must be a date YYYY-MM-DD", field=field)
    try:
        day = dt.date.fromisoformat(value)
    except ValueError:
        raise errors.InvalidArgument(f"{field} is not a calendar date", field=field) from None
    if day > today:
        raise errors.InvalidArgument(f"{field} must not be in the future", field=field)
    if day < today - MAX_DATE_AGE:
        raise errors.InvalidArgument(
            f"{field} must be within the last {MAX_DATE_AGE.days} days", field=field
        )
    return day


def bounds(
    value: common_pb2.TimeRange, field: str
) -> tuple[dt.datetime | None, dt.datetime | None]:
    """A TimeRange's (start, end): either may be unset (an unset range is both);
    when both are set, start must not be after end."""
    start = end = None
    try:
        if value.HasField("start_time"):
            start = value.start_time.ToDatetime(dt.UTC)
        if value.HasField("end_time"):
            end = value.end_time.ToDatetime(dt.UTC)
    except (ValueError, OverflowError):
        raise errors.InvalidArgument(f"{field} holds an invalid timestamp", field=field) from None
    if start is not None and end is not None and end < start:
        raise errors.InvalidArgument(f"{field}.end_time is before its start_time", field=field)
    return start, end


def min_risk_rank(requested: int) -> int:
    """The lowest RiskLevel number a listing or export of contacts includes:
    `requested`, or LOW when unset."""
    if requested and requested not in risk.LEVELS.values():
        raise errors.InvalidArgument(
            "min_risk_level is not a known RiskLevel", field="min_risk_level"
        )
    return max(requested, common_pb2.RISK_LEVEL_LOW)


def not_found(resource: str) -> errors.NotFound:
    return errors.NotFound(f"no {resource} with this id", metadata={"resource": resource})
