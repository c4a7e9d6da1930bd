"""What one CheckIn stream may make the server hold: a device that stops reading
its acks is held back by gRPC's flow control at the stream's held-bytes bound,
loses nothing it was told is stored, and gets every ack once it reads again."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any, NamedTuple

import asyncpg
import grpc
from stopcovid.checkin.v1 import checkin_service_pb2 as pb
from stopcovid.checkin.v1 import checkin_service_pb2_grpc as pb_grpc

from services.kernel import db
from services.kernel.config import Settings
from tests.support.checkin_helpers import (
    batch,
    connections_to,
    denied_door,
    scan,
)
from tests.support.database import Query
from tests.support.metrics import changes as metric_changes
from tests.support.metrics import samples as metric_samples
from tests.support.servers import Pki, Servers, running_servers
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
        device, token = denied_door(servers, db_conn, "+85512009821")
        checkin = servers.servicers["checkin"]
        outgoing: queue.Queue[pb.StreamScansRequest | None] = queue.Queue()
        creds = servers.pki.credentials(device)
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


def _device_channel(servers: Servers, device: str) -> grpc.Channel:
    creds = servers.pki.credentials(device)
    return grpc.secure_channel(servers.target("checkin"), creds)


class _Call(NamedTuple):
    """A StreamScans call on a channel: what is put on `outgoing` is sent (None
    half-closes), `messages` are the server's; `call` has the status and trailers."""

    rpc: pb_grpc.CheckInServiceStub
    outgoing: queue.Queue[pb.StreamScansRequest | None]
    call: Any
    messages: Iterator[pb.StreamScansResponse]


def _stream_on(channel: grpc.Channel) -> _Call:
    rpc = pb_grpc.CheckInServiceStub(channel)
    outgoing: queue.Queue[pb.StreamScansRequest | None] = queue.Queue()
    call = rpc.StreamScans(iter(outgoing.get, None), timeout=60)
    return _Call(rpc, outgoing, call, iter(call))


def test_an_idle_stream_is_ended_with_ok_and_the_connection_stays(
    settings: Settings, pki: Pki, db_conn: Query
) -> None:
    """A stream that holds nothing and receives nothing for STOPCOVID_STREAM_IDLE_S is
    ended, not as an error: status OK and a trailer saying why. The device's connection
    is left open, and its next stream opens on it."""
    idle = replace(settings, stream_idle_s=0.5)
    endings = metric_samples("stopcovid_checkin_stream_endings_total")
    with running_servers(idle, pki) as servers:
        device, token = denied_door(servers, db_conn, "+85512009822")
        checkin = servers.servicers["checkin"]
        with _device_channel(servers, device) as channel:
            rpc, outgoing, call, messages = _stream_on(channel)
            settings_message = next(messages).settings
            assert settings_message.idle_timeout.ToTimedelta().total_seconds() == 0.5
            outgoing.put(batch("b1", scan(1, token)))
            assert next(messages).ack.batch_id == "b1"
            # Then the device sends nothing: the server ends the stream.
            assert list(messages) == []
            assert call.code() == grpc.StatusCode.OK
            assert ("stopcovid-stream-end", "idle") in call.trailing_metadata()
            outgoing.put(None)
            wait_for(lambda: not checkin._streams, what="the stream to be forgotten")
            before = connections_to(servers.ports["checkin"])
            # The next stream, on the same connection, goes on where the first ended.
            again = rpc.StreamScans(iter([batch("b2", scan(2, token))]), timeout=60)
            replies = list(again)
            # One connection throughout: the second stream opened on the first's.
            assert connections_to(servers.ports["checkin"]) == before
            assert len(before) == 1
        assert replies[0].settings.last_stored_sequence == 1
        assert [m.ack.batch_id for m in replies[1:]] == ["b2"]
    ended = metric_changes(endings, metric_samples("stopcovid_checkin_stream_endings_total"))
    assert ended == {(("reason", "IDLE"),): 1, (("reason", "OK"),): 1}


@contextlib.contextmanager
def _commits_blocked(settings: Settings) -> Iterator[None]:
    """Hold the store and the inbox locked against writes (another session's
    EXCLUSIVE lock), so that a batch's group commit waits until the block ends."""
    locked, release = threading.Event(), threading.Event()

    async def hold() -> None:
        conn = await asyncpg.connect(**db.connect_args(settings, db.MIGRATOR).kwargs())
        try:
            async with conn.transaction():
                await conn.execute("LOCK TABLE checkins, scan_inbox IN EXCLUSIVE MODE")
                locked.set()
                await asyncio.to_thread(release.wait)
        finally:
            await conn.close()

    holder = threading.Thread(target=asyncio.run, args=(hold(),))
    holder.start()
    try:
        assert locked.wait(30), "the lock was not taken"
        yield
    finally:
        release.set()
        holder.join(30)


def test_a_stream_waiting_for_its_commit_is_not_idle(
    settings: Settings, pki: Pki, db_conn: Query
) -> None:
    """A batch in flight longer than the idle limit (its commit waits on a lock) keeps
    its stream: idleness is a stream holding nothing, not a device sending nothing."""
    idle = replace(settings, stream_idle_s=0.3)
    with running_servers(idle, pki) as servers:
        device, token = denied_door(servers, db_conn, "+85512009823")
        checkin = servers.servicers["checkin"]
        with _device_channel(servers, device) as channel:
            _, outgoing, call, messages = _stream_on(channel)
            next(messages)
            with _commits_blocked(idle):
                outgoing.put(batch("b1", scan(1, token)))
                wait_for(lambda: bool(checkin._streams), what="the stream to open")
                (stream,) = checkin._streams[uuid.UUID(device)]
                wait_for(lambda: stream.in_flight == 1, what="the batch to be taken")
                # Several idle limits pass while the batch waits for its commit.
                wait_for(
                    lambda: time.monotonic() > stream.active_at + 5 * idle.stream_idle_s,
                    what="five idle limits to pass",
                )
                assert not stream.idle_ended and stream.reader is not None
                assert not stream.reader.done()
            assert next(messages).ack.batch_id == "b1"
            outgoing.put(None)
            assert list(messages) == []
            assert call.code() == grpc.StatusCode.OK
            assert ("stopcovid-stream-end", "idle") not in call.trailing_metadata()
