"""What issue 12 found a hostile client could do, each against the real servers:
NUL and control characters in filters and page tokens, times and spans out of any
range, forged or replayed page tokens, and unbounded errors and audit entries.
Each must end in a precise refusal, never INTERNAL, with nothing logged as an error."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import uuid
from collections.abc import Iterator, MutableMapping
from typing import Any

import grpc
import pytest
import structlog
from google.protobuf import duration_pb2, field_mask_pb2, timestamp_pb2
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from stopcovid.checkin.v1 import checkin_service_pb2 as cpb
from stopcovid.common.v1 import common_pb2
from stopcovid.exposure.v1 import exposure_service_pb2 as epb
from stopcovid.retention.v1 import retention_service_pb2 as rpb
from stopcovid.venue.v1 import venue_service_pb2 as vpb

from services.kernel import audit, errors
from tests.support.checkin_helpers import (
    add_device,
    batch,
    create_venue,
    enroll,
    erasures_applied,
    open_stream,
    scan,
)
from tests.support.database import Query
from tests.support.raw_calls import Caller, caller
from tests.support.servers import Servers

HUGE = 2**62
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def method(module: Any, service: str, name: str) -> MethodDescriptor:
    found: MethodDescriptor = module.DESCRIPTOR.services_by_name[service].methods_by_name[name]
    return found


LIST_VENUES = method(vpb, "VenueService", "ListVenues")
LIST_DEVICES = method(vpb, "VenueService", "ListDevices")
CREATE_VENUE = method(vpb, "VenueService", "CreateVenue")
UPDATE_VENUE = method(vpb, "VenueService", "UpdateVenue")
LIST_AUDIT = method(rpb, "RetentionService", "ListAuditEvents")
LIST_GRIEVANCES = method(rpb, "RetentionService", "ListGrievances")
TRANSPARENCY = method(rpb, "RetentionService", "GetTransparencyReport")
DELETION_REPORTS = method(rpb, "RetentionService", "ListDeletionReports")
APPROVE = method(epb, "ExposureService", "ApproveAccessRequest")


@pytest.fixture
def calls(servers: Servers) -> Iterator[Caller]:
    with caller(servers) as made:
        yield made


@pytest.fixture
def error_logs() -> Iterator[list[MutableMapping[str, Any]]]:
    """Every event the servers log at error level meanwhile (they run in-process)."""
    with structlog.testing.capture_logs() as events:
        yield events
    # read by the test through the list; capture ends with the test


def errors_in(events: list[MutableMapping[str, Any]]) -> list[str]:
    return [e["event"] for e in events if e.get("log_level") in ("error", "critical")]


def venue(**fields: Any) -> vpb.Venue:
    made = vpb.Venue(display_name="Central Market", setting=vpb.VENUE_SETTING_INDOOR)
    made.region_code = "KH-12"
    for name, value in fields.items():
        if isinstance(value, Message):
            getattr(made, name).CopyFrom(value)
        else:
            setattr(made, name, value)
    return made


# (service, principal, RPC, request, the field the refusal must name)
Case = tuple[str, str, MethodDescriptor, Message, str]

NUL_FILTERS: list[Case] = [
    (
        "venue",
        "dev-venue-operator",
        LIST_VENUES,
        vpb.ListVenuesRequest(region_code="KH\x0012"),
        "region_code",
    ),
    (
        "retention",
        "dev-auditor",
        LIST_AUDIT,
        rpb.ListAuditEventsRequest(principal="a\x00b"),
        "principal",
    ),
    (
        "retention",
        "dev-auditor",
        LIST_AUDIT,
        rpb.ListAuditEventsRequest(action="venue.\x00"),
        "action",
    ),
    (
        "retention",
        "dev-grievance-officer",
        LIST_GRIEVANCES,
        rpb.ListGrievancesRequest(assignee="x\x00"),
        "assignee",
    ),
    (
        "venue",
        "dev-venue-operator",
        LIST_VENUES,
        vpb.ListVenuesRequest(region_code="KH\x1b[2J"),
        "region_code",
    ),
    (
        "venue",
        "dev-venue-operator",
        LIST_VENUES,
        vpb.ListVenuesRequest(page_token="ab\x00cd"),
        "page_token",
    ),
]


@pytest.mark.parametrize("case", NUL_FILTERS)
def test_a_nul_or_control_character_in_a_filter_is_refused_naming_it(
    calls: Caller, error_logs: list[MutableMapping[str, Any]], case: Case
) -> None:
    service, principal, rpc, request_, field = case
    got = calls.call(service, principal, rpc, request_)
    assert (got.code, got.reason, got.fields) == (INVALID, "INVALID_CHARACTERS", (field,))
    assert errors_in(error_logs) == []


def _range(seconds: int) -> common_pb2.TimeRange:
    return common_pb2.TimeRange(
        start_time=timestamp_pb2.Timestamp(seconds=0),
        end_time=timestamp_pb2.Timestamp(seconds=seconds),
    )


OUT_OF_RANGE: list[Case] = [
    (
        "retention",
        "dev-auditor",
        LIST_AUDIT,
        rpb.ListAuditEventsRequest(time_range=_range(HUGE)),
        "time_range.end_time",
    ),
    (
        "retention",
        "dev-auditor",
        TRANSPARENCY,
        rpb.GetTransparencyReportRequest(period=_range(HUGE)),
        "period.end_time",
    ),
    (
        "retention",
        "dev-auditor",
        DELETION_REPORTS,
        rpb.ListDeletionReportsRequest(create_time_range=_range(-HUGE)),
        "create_time_range.end_time",
    ),
    (
        "venue",
        "dev-venue-operator",
        CREATE_VENUE,
        vpb.CreateVenueRequest(venue=venue(default_stay=duration_pb2.Duration(seconds=HUGE))),
        "venue.default_stay",
    ),
    (
        "venue",
        "dev-venue-operator",
        CREATE_VENUE,
        vpb.CreateVenueRequest(
            venue=venue(default_stay=duration_pb2.Duration(seconds=1, nanos=-1))
        ),
        "venue.default_stay",
    ),
    (
        "exposure",
        "dev-approver",
        APPROVE,
        epb.ApproveAccessRequestRequest(
            access_request_id="00000000-0000-4000-8000-000000000000",
            grant_duration=duration_pb2.Duration(seconds=HUGE),
        ),
        "grant_duration",
    ),
]


@pytest.mark.parametrize("case", OUT_OF_RANGE)
def test_a_time_or_span_out_of_any_range_is_refused_before_it_is_converted(
    calls: Caller, error_logs: list[MutableMapping[str, Any]], case: Case
) -> None:
    service, principal, rpc, request_, field = case
    got = calls.call(service, principal, rpc, request_)
    assert (got.code, got.reason, got.fields) == (INVALID, "TIME_OUT_OF_RANGE", (field,))
    assert errors_in(error_logs) == []


def _first_page_token(calls: Caller, count: int = 3) -> str:
    for n in range(count):
        made = calls.call(
            "venue",
            "dev-venue-operator",
            CREATE_VENUE,
            vpb.CreateVenueRequest(venue=venue(display_name=f"Market {n}")),
        )
        assert made.code is grpc.StatusCode.OK
    first = calls.call(
        "venue", "dev-venue-operator", LIST_VENUES, vpb.ListVenuesRequest(page_size=1)
    )
    assert first.code is grpc.StatusCode.OK
    token = vpb.ListVenuesResponse.FromString(first.replies[0]).next_page_token
    assert token
    return token


def test_a_page_token_is_opaque_and_opens_only_for_its_query_and_caller(
    calls: Caller, error_logs: list[MutableMapping[str, Any]]
) -> None:
    token = _first_page_token(calls)
    same = calls.call(
        "venue",
        "dev-venue-operator",
        LIST_VENUES,
        vpb.ListVenuesRequest(page_size=1, page_token=token),
    )
    assert same.code is grpc.StatusCode.OK  # the token works where it was made
    padded = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    # Nothing readable: no field name, no JSON, no timestamp (the old tokens were
    # JSON with an ISO time); the bytes are a random nonce and ciphertext.
    assert b"create_time" not in padded and not padded.startswith(b"{")
    assert not re.search(rb"\d{4}-\d\d-\d\d[T ]\d\d:", padded)
    flipped = bytearray(padded)
    flipped[-1] ^= 1
    altered = base64.urlsafe_b64encode(bytes(flipped)).decode().rstrip("=")
    # The old format: readable JSON with a fingerprint anyone could recompute.
    fingerprint = hashlib.sha256(
        json.dumps({"region": None, "state": None}, sort_keys=True).encode()
    ).hexdigest()[:16]
    forged = base64.urlsafe_b64encode(
        json.dumps({"k": ["0001-01-01T00:00:00+00:00", "x"], "f": fingerprint}).encode()
    ).decode()
    refused = [
        (
            "venue",
            "dev-venue-operator",
            LIST_VENUES,
            vpb.ListVenuesRequest(page_size=1, page_token=altered),
        ),
        (
            "venue",
            "dev-venue-operator",
            LIST_VENUES,
            vpb.ListVenuesRequest(page_size=1, page_token=forged),
        ),
        # Other filters, another caller, another RPC:
        (
            "venue",
            "dev-venue-operator",
            LIST_VENUES,
            vpb.ListVenuesRequest(page_size=1, page_token=token, region_code="KH-1"),
        ),
        (
            "venue",
            "dev-health-official",
            LIST_VENUES,
            vpb.ListVenuesRequest(page_size=1, page_token=token),
        ),
        (
            "venue",
            "dev-venue-operator",
            LIST_DEVICES,
            vpb.ListDevicesRequest(page_size=1, page_token=token),
        ),
        (
            "venue",
            "dev-venue-operator",
            LIST_VENUES,
            vpb.ListVenuesRequest(page_size=1, page_token="é" * 10),
        ),
    ]
    for service, principal, rpc, request_ in refused:
        got = calls.call(service, principal, rpc, request_)
        assert (got.code, got.reason) == (INVALID, "INVALID_PAGE_TOKEN"), request_
    assert errors_in(error_logs) == []


def test_an_update_naming_20000_unknown_fields_gets_a_short_error(
    calls: Caller, error_logs: list[MutableMapping[str, Any]]
) -> None:
    made = calls.call(
        "venue", "dev-venue-operator", CREATE_VENUE, vpb.CreateVenueRequest(venue=venue())
    )
    created = vpb.CreateVenueResponse.FromString(made.replies[0]).venue
    mask = field_mask_pb2.FieldMask(paths=[f"no_such_field_{n}" for n in range(20_000)])
    got = calls.call(
        "venue",
        "dev-venue-operator",
        UPDATE_VENUE,
        vpb.UpdateVenueRequest(venue=created, update_mask=mask),
    )
    assert (got.code, got.fields) == (INVALID, ("update_mask",))
    assert "and 19995 more" in got.message
    assert got.size < 4 * errors.MAX_MESSAGE_CHARS
    assert errors_in(error_logs) == []


def test_a_mask_path_repeated_is_one_path_and_the_audit_log_stays_readable(
    calls: Caller, error_logs: list[MutableMapping[str, Any]]
) -> None:
    made = calls.call(
        "venue", "dev-venue-operator", CREATE_VENUE, vpb.CreateVenueRequest(venue=venue())
    )
    created = vpb.CreateVenueResponse.FromString(made.replies[0]).venue
    created.address = "Street 2"
    mask = field_mask_pb2.FieldMask(paths=["address"] * 292_000)
    got = calls.call(
        "venue",
        "dev-venue-operator",
        UPDATE_VENUE,
        vpb.UpdateVenueRequest(venue=created, update_mask=mask),
    )
    assert got.code is grpc.StatusCode.OK
    page = calls.call(
        "retention",
        "dev-auditor",
        LIST_AUDIT,
        rpb.ListAuditEventsRequest(action="venue.update", page_size=1000),
    )
    assert page.code is grpc.StatusCode.OK
    events = rpb.ListAuditEventsResponse.FromString(page.replies[0]).audit_events
    assert len(events) == 1
    assert json.loads(events[0].details["fields"]) == ["address"]
    assert errors_in(error_logs) == []


def test_audit_details_are_bounded_and_say_so() -> None:
    kept = audit.bounded_details(
        {"fields": ["x"] * 10_000, "note": "y" * 100_000, "nested": {str(n): n for n in range(99)}}
    )
    assert len(json.dumps(kept)) < 16_000
    assert kept["truncated"] is True
    assert audit.bounded_details({"fields": ["a", "b"]}) == {"fields": ["a", "b"]}


def test_the_token_cache_holds_one_entry_per_card_and_none_for_the_erased(
    servers: Servers, db_conn: Query
) -> None:
    """One device sent 200,000 spellings of one card and grew the CheckIn server by
    87 MB: the cache was keyed by the raw text and filled before the erased-person
    check. Spellings other than the canonical one are refused (MALFORMED_TOKEN), so
    they never reach the cache; an erased person's genuine token is refused and not
    cached either."""
    device = add_device(servers, db_conn, create_venue(servers))
    card = enroll(servers, "+85512001201").personal_token.token
    gone = enroll(servers, "+85512001202")
    db_conn("INSERT INTO erased_people (person_id) VALUES ($1)", uuid.UUID(gone.person_id))
    erasures_applied(servers, db_conn, device)
    cache = servers.servicers["checkin"].decider.verified
    before = len(cache)
    form, kid, body = card.split(".")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    spellings = [
        f"{form}.{kid}.{variant}"
        for variant in (
            body + "=",
            body + "==",
            body[:-1] + alphabet[alphabet.index(body[-1]) | 1],
            body[:5] + "\t" + body[5:],
            body[:5] + "+" + body[6:],
        )
    ]
    stream = open_stream(servers, device)
    scans = [scan(1, card), *(scan(2 + n, s) for n, s in enumerate(spellings))]
    scans.append(scan(len(scans) + 1, gone.personal_token.token))
    stream.send(batch("spellings", *scans))
    results = stream.ack().results
    assert stream.end() is None
    reasons = [cpb.ScanRejectReason.Name(r.reject_reason) for r in results]
    assert results[0].outcome == cpb.SCAN_OUTCOME_ADMITTED
    assert reasons[1:-1] == ["SCAN_REJECT_REASON_MALFORMED_TOKEN"] * len(spellings)
    assert reasons[-1] == "SCAN_REJECT_REASON_PERSON_NOT_ENROLLED"
    assert len(cache) == before + 1
