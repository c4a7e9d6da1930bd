"""What one CheckIn stream may make the server hold: a device that stops reading
its acks is held back by gRPC's flow control at the stream's held-bytes bound,
loses nothing it was told is stored, and gets every ack once it reads again."""

from __future__ import annotations

import queue
import uuid
from dataclasses import replace

import grpc
from stopcovid.checkin.v1 import checkin_service_pb2 as pb
from stopcovid.checkin.v1 import checkin_service_pb2_grpc as pb_grpc

from services.kernel.config import Settings
from tests.support.checkin_helpers import add_device, batch, create_venue, enroll_high_risk, scan
from tests.support.database import Query
from tests.support.metrics import changes as metric_changes
from tests.support.metrics import samples as metric_samples
from tests.support.servers import Pki, running_servers
from tests.support.waits import wait_for

SCANS = 500  # a DENIED result carries a decision id: 500 of them make a ~22 KB ack


def test_a_device_that_stops_reading_is_held_back_and_loses_nothing(
    settings: Settings, pki: Pki, db_conn: Query
) -> None:
    bound = 1024
    held = replace(settings, stream_held_bytes=bound, stream_write_timeout_s=120.0)
    holds = metric_samples("stopcovid_checkin_stream_holds_total")
    decided = metric_samples("stopcovid_checkin_batch_scans_count")
    with running_servers(held, pki) as servers:
        venue = create_venue(servers)
        device = add_device(servers, db_conn, venue)
        person = enroll_high_risk(servers, db_conn, "+85512009821")
        checkin = servers.servicers["checkin"]
        token = person.personal_token.token
        outgoing: queue.Queue[pb.StreamScansRequest | None] = queue.Queue()
        ca, cert, key = servers.pki.files(device)
        creds = grpc.ssl_channel_credentials(ca.read_bytes(), key.read_bytes(), cert.read_bytes())
        # A device's receive window without BDP growth: what it does not read stays
        # on the server's side (a stopped phone's socket buffers would fill first).
        options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 16384)]
        with grpc.secure_channel(servers.target("checkin"), creds, options) as channel:
            rpc = pb_grpc.CheckInServiceStub(channel)
            call = rpc.StreamScans(iter(outgoing.get, None), timeout=120)
            window = next(call).settings.max_in_flight_batches
            sizes = []
            for n in range(window):
                request = batch(f"b{n}", *(scan(n * SCANS + i + 1, token) for i in range(SCANS)))
                sizes.append(request.ByteSize())
                outgoing.put(request)
            # The device reads nothing: its window of acks fills, the server's write
            # waits, and the server stops reading the device's batches.
            (stream,) = checkin._streams[uuid.UUID(device)]
            wait_for(
                lambda: stream.unsent_bytes > 0 and not stream.room.is_set(),
                what="the stream to stop reading at its bound",
            )
            taken = metric_changes(decided, metric_samples("stopcovid_checkin_batch_scans_count"))
            assert 0 < sum(taken.values()) < window
            # What it holds: under its bound, plus the one batch (or its ack) that
            # took it past; the scrape-time gauge says the same.
            assert checkin.most_held_bytes() == stream.held_bytes <= bound + max(sizes)
            # Reading again, the device hears about every batch, each scan once.
            acks = []
            for message in call:
                if message.WhichOneof("kind") == "ack":
                    acks.append(message.ack)
                    if len(acks) == window:
                        outgoing.put(None)
        assert [a.batch_id for a in acks] == [f"b{n}" for n in range(window)]
        for ack in acks:
            assert len(ack.results) == SCANS
            assert {r.outcome for r in ack.results} == {pb.SCAN_OUTCOME_DENIED}
    stored = db_conn(
        "SELECT count(*) AS n, count(DISTINCT sequence) AS d FROM ("
        " SELECT sequence FROM checkins WHERE device_id = $1"
        " UNION ALL SELECT sequence FROM scan_inbox WHERE device_id = $1) AS s",
        uuid.UUID(device),
    )[0]
    assert (stored["n"], stored["d"]) == (window * SCANS, window * SCANS)
    assert metric_changes(holds, metric_samples("stopcovid_checkin_stream_holds_total"))
