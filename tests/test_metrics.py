"""What the metrics count, through the real servers (in this process, so the test
reads the registry they update): the gRPC server set with the status each caller
got, refusals included; scans by outcome and reject reason, batches and commits;
stream endings and grant refusals; labels that never name a person, device,
venue or case; and the off switch."""

from __future__ import annotations

import re
import uuid

import grpc
import pytest
import stopcovid.client as clients
from stopcovid.checkin.v1 import checkin_service_pb2 as pb
from stopcovid.client.errors import StopCovidError
from stopcovid.venue.v1 import venue_service_pb2 as vpb

from services.kernel import metrics
from tests.support.checkin_helpers import (
    add_device,
    batch,
    config,
    create_venue,
    enroll,
    open_stream,
    scan,
)
from tests.support.database import Query
from tests.support.exposure_helpers import by_id, grant_access, report_case, revoke, start_trace
from tests.support.metrics import Labels, changes, samples
from tests.support.servers import Servers

VENUE = "stopcovid.venue.v1.VenueService"
CHECKIN = "stopcovid.checkin.v1.CheckInService"


def _labels(**kv: str) -> Labels:
    return tuple(sorted(kv.items()))


def test_the_grpc_server_set_counts_calls_by_the_status_their_callers_got(
    servers: Servers,
) -> None:
    started = samples("grpc_server_started_total")
    handled = samples("grpc_server_handled_total")
    timed = samples("grpc_server_handling_seconds_count")
    venue = create_venue(servers)
    with clients.VenueClient(config(servers, "venue", "dev-venue-operator")) as venues:
        venues.rpc.GetVenue(vpb.GetVenueRequest(venue_id=venue))
        with pytest.raises(StopCovidError) as missing:
            venues.rpc.GetVenue(vpb.GetVenueRequest(venue_id=str(uuid.uuid4())))
    # A registrar may not create venues: refused by the auth interceptor, still counted.
    with (
        clients.VenueClient(config(servers, "venue", "dev-registrar")) as refused,
        pytest.raises(StopCovidError) as denied,
    ):
        refused.rpc.CreateVenue(vpb.CreateVenueRequest(venue=vpb.Venue(display_name="X")))
    assert missing.value.code == grpc.StatusCode.NOT_FOUND
    assert denied.value.code == grpc.StatusCode.PERMISSION_DENIED

    unary = {"grpc_type": "unary", "grpc_service": VENUE}
    assert changes(started, samples("grpc_server_started_total")) == {
        _labels(**unary, grpc_method="CreateVenue"): 2,
        _labels(**unary, grpc_method="GetVenue"): 2,
    }
    assert changes(handled, samples("grpc_server_handled_total")) == {
        _labels(**unary, grpc_method="CreateVenue", grpc_code="OK"): 1,
        _labels(**unary, grpc_method="CreateVenue", grpc_code="PERMISSION_DENIED"): 1,
        _labels(**unary, grpc_method="GetVenue", grpc_code="OK"): 1,
        _labels(**unary, grpc_method="GetVenue", grpc_code="NOT_FOUND"): 1,
    }
    assert sum(changes(timed, samples("grpc_server_handling_seconds_count")).values()) == 4


def test_a_stream_counts_its_messages_and_its_scans_by_outcome_and_reason(
    servers: Servers, db_conn: Query
) -> None:
    venue = create_venue(servers)
    device = add_device(servers, db_conn, venue)
    token = enroll(servers, "+85512001601").personal_token.token
    watched = (
        "grpc_server_msg_received_total",
        "grpc_server_msg_sent_total",
        "grpc_server_handled_total",
        "stopcovid_checkin_scans_total",
        "stopcovid_checkin_batch_scans_count",
        "stopcovid_checkin_batch_scans_sum",
        "stopcovid_checkin_group_commit_rows_sum",
        "stopcovid_checkin_ack_seconds_count",
        "stopcovid_checkin_stream_endings_total",
    )
    before = {name: samples(name) for name in watched}
    stream = open_stream(servers, device)
    stream.send(batch("b1", scan(1, token), scan(2, token), scan(3, "not-a-token")))
    first = stream.ack()
    stream.send(batch("b2", scan(1, token, at=None), scan(4, token)))
    second = stream.ack()
    assert stream.end() is None
    moved = {name: changes(before[name], samples(name)) for name in watched}

    outcomes = [r.outcome for r in (*first.results, *second.results)]
    assert outcomes.count(pb.SCAN_OUTCOME_ADMITTED) == 3
    bidi = {"grpc_type": "bidi_stream", "grpc_service": CHECKIN, "grpc_method": "StreamScans"}
    assert moved["grpc_server_msg_received_total"] == {_labels(**bidi): 2}
    # The settings message, then two acks.
    assert moved["grpc_server_msg_sent_total"] == {_labels(**bidi): 3}
    assert moved["grpc_server_handled_total"] == {_labels(**bidi, grpc_code="OK"): 1}
    reasons = {
        (dict(k)["outcome"], dict(k)["reason"]): v
        for k, v in moved["stopcovid_checkin_scans_total"].items()
    }
    # Scan 1 again, with another time: the same number with other content.
    assert reasons == {
        ("admitted", ""): 3,
        ("rejected", "MALFORMED_TOKEN"): 1,
        ("rejected", "SEQUENCE_REUSED"): 1,
    }
    assert moved["stopcovid_checkin_batch_scans_count"] == {(): 2}
    assert moved["stopcovid_checkin_batch_scans_sum"] == {(): 5}
    assert moved["stopcovid_checkin_group_commit_rows_sum"] == {(): 3}
    assert moved["stopcovid_checkin_ack_seconds_count"] == {(): 2}
    assert moved["stopcovid_checkin_stream_endings_total"] == {_labels(reason="OK"): 1}


def test_grant_refusals_are_counted_by_reason(servers: Servers) -> None:
    person = enroll(servers, "+85512001604")
    case = report_case(servers, by_id(person.person_id))
    grant = grant_access(servers, case.case_id)
    revoke(servers, grant.grant_id)
    before = samples("stopcovid_grant_refusals_total")
    with pytest.raises(StopCovidError) as refused:
        start_trace(servers, case.case_id, grant.grant_id)
    with pytest.raises(StopCovidError) as unknown:
        start_trace(servers, case.case_id, str(uuid.uuid4()))
    assert (refused.value.reason, unknown.value.reason) == ("GRANT_REVOKED", "NO_ACTIVE_GRANT")
    moved = changes(before, samples("stopcovid_grant_refusals_total"))
    assert moved == {_labels(reason="GRANT_REVOKED"): 1, _labels(reason="NO_ACTIVE_GRANT"): 1}


_ID = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|\+?\d{8,}|S1\.", re.I
)


def test_no_label_names_a_person_device_venue_or_case(servers: Servers, db_conn: Query) -> None:
    """After calls that carry every kind of id, no label value anywhere looks like one."""
    venue = create_venue(servers)
    device = add_device(servers, db_conn, venue)
    token = enroll(servers, "+85512001602").personal_token.token
    stream = open_stream(servers, device)
    stream.send(batch("b1", scan(1, token), scan(2, "S1.t1.forged")))
    stream.ack()
    assert stream.end() is None
    from prometheus_client import REGISTRY

    values = {
        value
        for family in REGISTRY.collect()
        for sample in family.samples
        for value in sample.labels.values()
    }
    assert values  # there are labels to look at
    assert {v for v in values if _ID.search(v)} == set()


def test_with_metrics_off_the_hot_path_counts_nothing(servers: Servers, db_conn: Query) -> None:
    venue = create_venue(servers)
    device = add_device(servers, db_conn, venue)
    token = enroll(servers, "+85512001603").personal_token.token
    before = samples("stopcovid_checkin_scans_total")
    commits = samples("stopcovid_checkin_group_commit_rows_count")
    metrics.configure(False)
    try:
        stream = open_stream(servers, device)
        stream.send(batch("b1", scan(1, token)))
        assert stream.ack().results[0].outcome == pb.SCAN_OUTCOME_ADMITTED
        assert stream.end() is None
    finally:
        metrics.configure(True)
    assert changes(before, samples("stopcovid_checkin_scans_total")) == {}
    assert changes(commits, samples("stopcovid_checkin_group_commit_rows_count")) == {}
