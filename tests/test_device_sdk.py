"""The device SDK: the durable scan buffer, and DeviceClient against real servers.

The buffer tests need no server. The stream tests run the CheckIn and Venue servers in a
thread of their own (like tests/conftest.py's `servers`, but holding on to the CheckIn
server so a test can stop it mid-stream and start a new one on the same port).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import re
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from cryptography import x509
from stopcovid.checkin.v1 import checkin_service_pb2 as cpb
from stopcovid.client import AsyncCheckInClient, AsyncVenueClient, ClientConfig, PermissionDenied
from stopcovid.client._channel import balanced_target
from stopcovid.client.buffer import ScanBuffer
from stopcovid.client.device import BatchAck, DeviceClient, ReconnectPolicy
from stopcovid.common.v1 import common_pb2
from stopcovid.venue.v1 import venue_service_pb2 as vpb

from services.kernel.config import Settings
from services.kernel.pki import write_issued
from services.kernel.server import RunningServer, TlsMaterial, start_server
from tests.support.checkin_helpers import connections_to, enroll_as_async, enroll_request
from tests.support.database import Query
from tests.support.servers import Pki, ServerThread
from tests.support.waits import wait_for

ENTRY = common_pb2.SCAN_DIRECTION_ENTRY
EXIT = common_pb2.SCAN_DIRECTION_EXIT


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# -- the buffer ----------------------------------------------------------------------------


def test_buffer_numbers_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "scans.db"
    when = dt.datetime(2021, 4, 20, 8, 30, 15, 123456, tzinfo=dt.UTC)
    with ScanBuffer(path) as buffer:
        assert buffer.durable
        assert buffer.add("tok-a", when, ENTRY) == 1
        assert buffer.add_many([("tok-b", when, EXIT), ("tok-c", when, ENTRY)]) == [2, 3]
        assert buffer.ack([2]) == 1
    with ScanBuffer(path) as buffer:
        assert len(buffer) == 2
        assert buffer.last_sequence == 3
        pending = buffer.pending(10)
        assert [(p.sequence, p.token, p.direction) for p in pending] == [
            (1, "tok-a", ENTRY),
            (3, "tok-c", ENTRY),
        ]
        assert pending[0].scan_time == when  # exact to the microsecond
        assert buffer.add("tok-d", when, EXIT) == 4


def test_buffer_ack_deletes_and_is_idempotent(tmp_path: Path) -> None:
    with ScanBuffer(tmp_path / "scans.db") as buffer:
        buffer.add_many([(f"t{i}", _now(), ENTRY) for i in range(10)])
        assert buffer.ack(range(1, 6)) == 5
        assert buffer.ack([1, 2, 999]) == 0  # a repeated or unknown ack is harmless
        assert len(buffer) == 5
        assert buffer.sequences() == [6, 7, 8, 9, 10]
        # Acking everything never frees a number for reuse.
        buffer.ack(range(1, 11))
        assert len(buffer) == 0
        assert buffer.add("next", _now(), ENTRY) == 11


def test_buffer_pending_pages_by_sequence(tmp_path: Path) -> None:
    with ScanBuffer(tmp_path / "scans.db") as buffer:
        buffer.add_many([(f"t{i}", _now(), ENTRY) for i in range(25)])
        buffer.ack([3, 4])
        first = buffer.pending(10)
        assert [p.sequence for p in first] == [1, 2, *range(5, 13)]
        second = buffer.pending(10, after=first[-1].sequence)
        assert [p.sequence for p in second] == list(range(13, 23))
        assert [p.sequence for p in buffer.pending(10, after=22)] == [23, 24, 25]
        assert buffer.pending(10, after=25) == []


def test_buffer_refuses_naive_time_and_uses_no_number(tmp_path: Path) -> None:
    with ScanBuffer(tmp_path / "scans.db") as buffer:
        with pytest.raises(ValueError, match="timezone"):
            buffer.add_many([("ok", _now(), ENTRY), ("bad", dt.datetime(2021, 1, 1), ENTRY)])
        assert buffer.last_sequence == 0
        assert buffer.add("ok", _now(), ENTRY) == 1


def test_buffer_counter_survives_a_crash(tmp_path: Path) -> None:
    """A process killed right after `add` returned (no close, no cleanup) has still
    recorded the scan and its number: the device never hands the number out again."""
    path = tmp_path / "scans.db"
    script = (
        "import datetime as dt, os\n"
        "from stopcovid.client.buffer import ScanBuffer\n"
        f"b = ScanBuffer({str(path)!r})\n"
        "b.add_many([('t', dt.datetime.now(dt.UTC), 1)] * 100)\n"
        "print(b.add('last', dt.datetime.now(dt.UTC), 1), flush=True)\n"
        "os._exit(0)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, text=True, timeout=60
    )
    assert out.stdout.strip() == "101"
    with ScanBuffer(path) as buffer:
        assert len(buffer) == 101
        assert buffer.add("after", _now(), ENTRY) == 102


def test_buffer_commits_reach_the_disk_before_add_returns(tmp_path: Path) -> None:
    """A recorded scan must survive a power cut, not only a crash of the process: the
    crash test above passes even with fsync off, since the OS keeps what the process
    wrote. So the settings that make a commit durable are asserted, on the buffer's
    own connection (synchronous is per connection) and on every open: WAL, and
    synchronous=FULL, which syncs the WAL at each commit (NORMAL loses the last
    commits on power loss; OFF can lose anything)."""
    for _ in range(2):
        with ScanBuffer(tmp_path / "scans.db") as buffer:
            assert buffer.durable
            buffer.add("t", _now(), ENTRY)
            connection = buffer._db
            assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert connection.execute("PRAGMA synchronous").fetchone()[0] >= 2  # FULL or EXTRA


def test_buffer_floor_of_a_connected_device(tmp_path: Path) -> None:
    with ScanBuffer(tmp_path / "scans.db") as buffer:
        buffer.raise_floor(0)  # first contact with the server
        buffer.add_many([("a", _now(), ENTRY), ("b", _now(), ENTRY)])
        buffer.raise_floor(1)  # below the counter: nothing changes
        assert buffer.add("c", _now(), ENTRY) == 3
        buffer.raise_floor(500)
        # Scans already numbered keep their numbers (they may have been sent).
        assert buffer.sequences() == [1, 2, 3]
        assert buffer.add("d", _now(), ENTRY) == 501
    with ScanBuffer(tmp_path / "scans.db") as buffer:
        assert buffer.add("e", _now(), ENTRY) == 502


def test_buffer_floor_renumbers_scans_never_sent(tmp_path: Path) -> None:
    """A device whose buffer was wiped records scans offline from 1 again; on first
    contact the server's last stored number moves them above it instead of letting
    them be refused as SEQUENCE_REUSED."""
    with ScanBuffer(tmp_path / "scans.db") as buffer:
        buffer.add_many([(f"t{i}", _now(), ENTRY) for i in range(5)])
        buffer.raise_floor(3)
        assert sorted(p.token for p in buffer.pending(10)) == [f"t{i}" for i in range(5)]
        assert all(s > 3 for s in buffer.sequences())
        assert len(set(buffer.sequences())) == 5
        assert buffer.add("new", _now(), ENTRY) == buffer.last_sequence
        assert buffer.last_sequence > max(buffer.sequences()[:-1])


def test_volatile_buffer_is_the_same_buffer_without_a_file() -> None:
    with ScanBuffer.volatile() as buffer:
        assert not buffer.durable
        assert buffer.add_many([("a", _now(), ENTRY)] * 3) == [1, 2, 3]
        buffer.ack([2])
        assert buffer.sequences() == [1, 3]


# -- against real servers ------------------------------------------------------------------


@dataclass
class Stack:
    """CheckIn and Venue servers on loopback, with the CheckIn one restartable."""

    runner: ServerThread
    settings: Settings
    tls: TlsMaterial
    pki: Pki
    ports: dict[str, int]

    def target(self, service: str) -> str:
        return f"localhost:{self.ports[service]}"

    def stop_checkin(self, *, kill: bool, name: str = "checkin") -> None:
        """Stop the CheckIn server: gracefully (it acks what is durable, then ends the
        streams with UNAVAILABLE), or killed: every call cut at once, acks in flight lost,
        while scans already handed to its group commit may still be committed."""
        server: RunningServer = self.runner.running.pop(name)
        if not kill:
            self.runner.call(server.stop(0.5))
            return

        async def kill_now() -> None:
            await server.server.stop(None)
            close = getattr(server.servicer, "close", None)
            if close is not None:
                await close()
            if server.revocations is not None:
                await server.revocations.close()
            await server.pool.close()

        self.runner.call(kill_now())

    def start_checkin(self, name: str = "checkin") -> None:
        """The CheckIn server `name` (another than the first: on a port of its own,
        kept in `ports`) on the port it had."""
        from services.checkin.server import SPEC

        server: RunningServer = self.runner.call(
            start_server(SPEC, self.settings, self.tls, port=self.ports.get(name, 0))
        )
        self.ports[name] = server.port
        self.runner.running[name] = server


@contextlib.contextmanager
def _stack(settings: Settings, pki: Pki) -> Iterator[Stack]:
    from services.checkin.server import SPEC as checkin
    from services.venue.server import SPEC as venue

    tls = TlsMaterial.from_settings(settings)
    runner = ServerThread()
    try:
        ports = {spec.name: runner.start(spec, settings, tls) for spec in (checkin, venue)}
        yield Stack(runner, settings, tls, pki, ports)
    finally:
        runner.close()


@pytest.fixture
def stack(settings: Settings, pki: Pki) -> Iterator[Stack]:
    # Group commits every 50 ms: a device streaming without pause always has
    # batches waiting for their commit, so a server killed at any moment loses
    # acks (the restart tests assert that they were resent).
    with _stack(replace(settings, commit_interval_ms=50.0), pki) as made:
        yield made


@pytest.fixture
def quiet_stack(settings: Settings, pki: Pki) -> Iterator[Stack]:
    """Servers that end a stream idle for half a second."""
    with _stack(replace(settings, stream_idle_s=0.5), pki) as made:
        yield made


def _device(stack: Stack, db_conn: Query, tmp_path: Path) -> tuple[str, ClientConfig]:
    """A venue (through VenueService) and a device at it with its own certificate (written
    straight into `devices`, so these tests do not depend on RegisterDevice)."""

    async def venue() -> str:
        config = ClientConfig.from_pki_dir(
            stack.target("venue"), stack.pki.dir, "dev-venue-operator"
        )
        async with AsyncVenueClient(config) as client:
            made = await client.rpc.CreateVenue(
                vpb.CreateVenueRequest(
                    venue=vpb.Venue(
                        display_name="Synthetic Market",
                        setting=vpb.VENUE_SETTING_INDOOR,
                        region_code="KH-12",
                    )
                )
            )
            return made.venue.venue_id

    venue_id = asyncio.run(venue())
    device_id = uuid.uuid4()
    issued = stack.pki.issue(str(device_id), "ROLE_DEVICE")
    cert = x509.load_pem_x509_certificate(issued.certificate_pem)
    db_conn(
        "INSERT INTO devices (device_id, venue_id, display_name, certificate_serial,"
        " certificate_expire_time, created_by) VALUES ($1, $2, $3, $4, $5, $6)",
        device_id,
        uuid.UUID(venue_id),
        "door 1",
        f"{cert.serial_number:x}",
        cert.not_valid_after_utc,
        "test",
    )
    name = f"device-{device_id}"
    write_issued(tmp_path, name, issued)
    config = ClientConfig.from_files(
        stack.target("checkin"),
        stack.pki.dir / "ca.pem",
        tmp_path / f"{name}.pem",
        tmp_path / f"{name}.key",
    )
    return str(device_id), config


def _tokens(stack: Stack, count: int) -> list[str]:
    """Synthetic people enrolled through EnrollPerson (+855 99 numbers)."""

    async def enroll() -> list[str]:
        config = ClientConfig.from_pki_dir(stack.target("checkin"), stack.pki.dir, "dev-registrar")
        async with AsyncCheckInClient(config) as client:
            answers = await asyncio.gather(
                *(
                    enroll_as_async(
                        client,
                        stack.settings,
                        enroll_request(f"+85599{i:06d}", consent_text_version="test-1"),
                    )
                    for i in range(count)
                )
            )
            return [a.personal_token.token for a in answers]

    return asyncio.run(enroll())


def _stored(db_conn: Query, device_id: str) -> list[int]:
    """Distinct sequences of the device in the inbox and the store."""
    rows = db_conn(
        "SELECT DISTINCT sequence FROM ("
        " SELECT sequence FROM scan_inbox WHERE device_id = $1"
        " UNION ALL SELECT sequence FROM checkins WHERE device_id = $1) s ORDER BY 1",
        uuid.UUID(device_id),
    )
    return [r[0] for r in rows]


FAST = ReconnectPolicy(initial=0.05, maximum=0.5)


def test_device_streams_2000_scans_all_admitted(
    stack: Stack, db_conn: Query, tmp_path: Path
) -> None:
    device_id, config = _device(stack, db_conn, tmp_path)
    tokens = _tokens(stack, 20)
    acks: list[BatchAck] = []

    async def run() -> DeviceClient:
        with ScanBuffer(tmp_path / "scans.db") as buffer:
            async with DeviceClient(config, buffer, on_ack=acks.append, reconnect=FAST) as dev:
                now = _now()
                dev.scan_many((tokens[i % 20], now, ENTRY) for i in range(2000))
                async with asyncio.timeout(60):
                    await dev.drain()
            assert len(buffer) == 0
            return dev

    dev = asyncio.run(run())
    assert dev.settings is not None
    assert dev.settings.device_id == device_id
    assert dev.stats.acked == 2000
    assert dev.stats.outcomes == {"ADMITTED": 2000}
    assert dev.stats.reconnects == 0
    assert sorted(r.sequence for a in acks for r in a.results) == list(range(1, 2001))
    assert all(len(a.results) <= dev.settings.max_scans_per_batch for a in acks)
    assert _stored(db_conn, device_id) == list(range(1, 2001))


@pytest.mark.parametrize("kill", [True, False], ids=["killed", "graceful"])
def test_device_survives_a_server_restart_mid_stream(
    stack: Stack, db_conn: Query, tmp_path: Path, kill: bool
) -> None:
    """The CheckIn server stops while scans are streaming; a new one starts on the same
    port. The device reconnects, resends what had no ack (same numbers), and every scan
    is acknowledged and stored once."""
    device_id, config = _device(stack, db_conn, tmp_path)
    tokens = _tokens(stack, 10)
    total = 8000

    async def run() -> DeviceClient:
        with ScanBuffer(tmp_path / "scans.db") as buffer:
            enough = asyncio.Event()
            dev = DeviceClient(
                config,
                buffer,
                reconnect=FAST,
                max_scans_per_batch=100,
                on_ack=lambda _: enough.set() if dev.stats.acked >= 1500 else None,
            )

            async def feed() -> None:
                for start in range(0, total, 100):
                    now = _now()
                    dev.scan_many((tokens[(start + i) % 10], now, EXIT) for i in range(100))
                    await asyncio.sleep(0.005)

            async with dev:
                feeder = asyncio.create_task(feed())
                async with asyncio.timeout(60):
                    await enough.wait()
                    await asyncio.to_thread(stack.stop_checkin, kill=kill)
                    await asyncio.sleep(0.3)
                    await asyncio.to_thread(stack.start_checkin)
                    await feeder
                    await dev.drain()
            assert len(buffer) == 0
            return dev

    dev = asyncio.run(run())
    assert dev.stats.connects >= 2
    assert dev.stats.reconnects >= 1
    if kill:
        assert dev.stats.resent > 0  # acks were lost with the server
    assert dev.stats.acked == total
    assert set(dev.stats.outcomes) <= {"ADMITTED", "DUPLICATE"}
    assert _stored(db_conn, device_id) == list(range(1, total + 1))


def test_a_list_of_servers_is_one_round_robin_channel() -> None:
    assert balanced_target("localhost:50051") == ("localhost:50051", [])
    target, options = balanced_target("localhost:50051, 127.0.0.1:50061")
    assert target == "ipv4:127.0.0.1:50051,127.0.0.1:50061"
    assert dict(options)["grpc.default_authority"] == "localhost:50051"
    assert "round_robin" in str(dict(options)["grpc.service_config"])
    with pytest.raises(ValueError, match="host:port"):
        balanced_target("localhost:50051,localhost")


def test_a_device_given_two_servers_goes_on_through_one_when_the_other_dies(
    stack: Stack, db_conn: Query, tmp_path: Path
) -> None:
    """Two CheckIn servers, one target naming both: the device streams; each server in
    turn is killed (so the one holding the stream is, whichever it is) and started
    again; the device carries on through the other, with the same target, and every
    scan is acknowledged and stored once."""
    stack.start_checkin("checkin-2")
    device_id, config = _device(stack, db_conn, tmp_path)
    config = replace(config, target=f"{stack.target('checkin')},{stack.target('checkin-2')}")
    tokens = _tokens(stack, 10)
    total = 4000

    async def run() -> DeviceClient:
        with ScanBuffer(tmp_path / "scans.db") as buffer:
            marks = {1000: asyncio.Event(), 2500: asyncio.Event()}

            def acked(_: BatchAck) -> None:
                for count, reached in marks.items():
                    if dev.stats.acked >= count:
                        reached.set()

            dev = DeviceClient(
                config, buffer, reconnect=FAST, max_scans_per_batch=100, on_ack=acked
            )

            async def feed() -> None:
                for start in range(0, total, 100):
                    now = _now()
                    dev.scan_many((tokens[(start + i) % 10], now, EXIT) for i in range(100))
                    await asyncio.sleep(0.01)

            async with dev:
                feeder = asyncio.create_task(feed())
                async with asyncio.timeout(90):
                    for (count, reached), name in zip(
                        marks.items(), ("checkin", "checkin-2"), strict=True
                    ):
                        await reached.wait()
                        assert dev.stats.acked >= count
                        await asyncio.to_thread(stack.stop_checkin, kill=True, name=name)
                        await asyncio.to_thread(stack.start_checkin, name)
                    await feeder
                    await dev.drain()
            assert len(buffer) == 0
            return dev

    dev = asyncio.run(run())
    assert dev.stats.reconnects >= 1
    assert dev.stats.acked == total
    assert set(dev.stats.outcomes) <= {"ADMITTED", "DUPLICATE"}
    assert _stored(db_conn, device_id) == list(range(1, total + 1))


def test_a_server_ends_old_connections_so_streams_rebalance(
    settings: Settings, pki: Pki, db_conn: Query, tmp_path: Path
) -> None:
    """With a short max_connection_age the server asks the device's connection to go
    away and cuts its stream after the grace: the device reconnects by itself (through
    its balancer, which may pick another server) and loses nothing."""
    from services.checkin.server import SPEC as checkin
    from services.venue.server import SPEC as venue

    aged = replace(
        settings,
        commit_interval_ms=50.0,
        grpc_max_connection_age_s=1.0,
        grpc_max_connection_age_grace_s=0.5,
    )
    tls = TlsMaterial.from_settings(aged)
    runner = ServerThread()
    try:
        ports = {spec.name: runner.start(spec, aged, tls) for spec in (checkin, venue)}
        stack = Stack(runner, aged, tls, pki, ports)
        device_id, config = _device(stack, db_conn, tmp_path)
        tokens = _tokens(stack, 5)

        async def run() -> DeviceClient:
            with ScanBuffer(tmp_path / "scans.db") as buffer:
                async with DeviceClient(config, buffer, reconnect=FAST) as dev:
                    dev.scan_many((tokens[i % 5], _now(), ENTRY) for i in range(100))
                    async with asyncio.timeout(60):
                        await asyncio.to_thread(
                            wait_for, lambda: dev.stats.connects >= 2, 30, "a second connection"
                        )
                        dev.scan_many((tokens[i % 5], _now(), EXIT) for i in range(100))
                        await dev.drain()
                assert len(buffer) == 0
                return dev

        dev = asyncio.run(run())
    finally:
        runner.close()
    assert dev.stats.connects >= 2
    assert dev.stats.acked == 200
    assert _stored(db_conn, device_id) == list(range(1, 201))


def test_a_quiet_device_keeps_its_connection_and_opens_a_stream_with_its_next_scan(
    quiet_stack: Stack, db_conn: Query, tmp_path: Path
) -> None:
    """The server ends the stream of a device with nothing to send (idle_timeout): the
    client neither reconnects nor backs off; it keeps the connection, and opens its
    next stream on it when the next scan is recorded."""
    stack = quiet_stack
    device_id, config = _device(stack, db_conn, tmp_path)
    tokens = _tokens(stack, 2)
    port = stack.ports["checkin"]

    async def until(condition: Callable[[], bool], what: str) -> None:
        deadline = asyncio.get_running_loop().time() + 30
        while not condition():
            assert asyncio.get_running_loop().time() < deadline, f"timed out waiting: {what}"
            await asyncio.sleep(0.02)

    async def run() -> tuple[DeviceClient, list[set[tuple[str, str]]]]:
        seen = []
        with ScanBuffer(tmp_path / "scans.db") as buffer:
            async with DeviceClient(config, buffer, reconnect=FAST) as dev:
                dev.scan(tokens[0])
                async with asyncio.timeout(30):
                    await dev.drain()
                await until(lambda: dev.stats.idle_ends == 1, "the stream's idle end")
                seen.append(connections_to(port))
                # Quiet for longer than the idle limit: no stream is reopened.
                idle_at = asyncio.get_running_loop().time()
                await until(lambda: asyncio.get_running_loop().time() > idle_at + 4 * 0.5, "quiet")
                assert (dev.stats.connects, dev.stats.idle_ends) == (1, 1)
                assert not stack.runner.running["checkin"].servicer._streams
                seen.append(connections_to(port))
                dev.scan(tokens[1])
                async with asyncio.timeout(30):
                    await dev.drain()
                seen.append(connections_to(port))
            return dev, seen

    dev, seen = asyncio.run(run())
    assert dev.stats.acked == 2
    assert dev.stats.connects == 2
    assert dev.stats.reconnects == 0
    # One connection throughout: the second stream opened on the first's.
    assert len(seen[0]) == 1
    assert seen[0] == seen[1] == seen[2]
    assert _stored(db_conn, device_id) == [1, 2]


def test_scans_whose_ack_was_lost_are_resent_and_stored_once(
    stack: Stack, db_conn: Query, tmp_path: Path
) -> None:
    """The server stored a batch but the device never saw the ack (it crashed first):
    the next run resends those scans with their numbers and gets DUPLICATE for them."""
    device_id, config = _device(stack, db_conn, tmp_path)
    tokens = _tokens(stack, 5)
    path = tmp_path / "scans.db"
    with ScanBuffer(path) as buffer:
        buffer.add_many((tokens[i % 5], _now(), ENTRY) for i in range(300))

    async def lost_ack() -> None:
        # Send the first 200 by hand, as DeviceClient would, and drop the ack on the floor.
        async with AsyncCheckInClient(config) as client:
            call = client.rpc.StreamScans()
            first = await call.read()
            assert isinstance(first, cpb.StreamScansResponse)
            assert first.WhichOneof("kind") == "settings"
            with ScanBuffer(path) as buffer:
                buffer.raise_floor(first.settings.last_stored_sequence)  # before any send
                scans = buffer.pending(200)
            batch = cpb.ScanBatch(batch_id="lost")
            for s in scans:
                scan = batch.scans.add(
                    sequence=s.sequence, personal_token=s.token, direction=s.direction
                )
                scan.scan_time.FromDatetime(s.scan_time)
            await call.write(cpb.StreamScansRequest(batch=batch))
            ack = await call.read()
            assert isinstance(ack, cpb.StreamScansResponse)
            assert ack.WhichOneof("kind") == "ack"
            assert {r.outcome for r in ack.ack.results} == {cpb.SCAN_OUTCOME_ADMITTED}
            call.cancel()

    asyncio.run(lost_ack())

    async def resume() -> DeviceClient:
        with ScanBuffer(path) as buffer:
            async with DeviceClient(config, buffer, reconnect=FAST) as dev:
                async with asyncio.timeout(60):
                    await dev.drain()
            return dev

    dev = asyncio.run(resume())
    assert dev.settings is not None
    assert dev.stats.acked == 300
    assert dev.stats.outcomes == {"DUPLICATE": 200, "ADMITTED": 100}
    assert _stored(db_conn, device_id) == list(range(1, 301))


def test_unknown_device_is_fatal(stack: Stack, tmp_path: Path) -> None:
    issued = stack.pki.issue(str(uuid.uuid4()), "ROLE_DEVICE")
    write_issued(tmp_path, "ghost", issued)
    config = ClientConfig.from_files(
        stack.target("checkin"),
        stack.pki.dir / "ca.pem",
        tmp_path / "ghost.pem",
        tmp_path / "ghost.key",
    )

    async def run() -> None:
        with ScanBuffer.volatile() as buffer:
            dev = DeviceClient(config, buffer, reconnect=FAST)
            dev.scan("S1.x.y")
            async with dev:
                with pytest.raises(PermissionDenied) as raised:
                    async with asyncio.timeout(30):
                        await dev.drain()
                assert raised.value.reason == "DEVICE_REVOKED"
            assert len(buffer) == 1  # nothing is thrown away
            assert dev.stats.reconnects == 0

    asyncio.run(run())


def test_simulator_command_sets_up_streams_and_loses_nothing(
    stack: Stack, db_conn: Query, capsys: pytest.CaptureFixture[str]
) -> None:
    """The simulator registers its venues, devices and people through the API, streams
    for a while, drains, and exits 0 only if every scan it recorded was acknowledged."""
    from services.ops import simulator

    code = simulator.main(
        [
            "--pki-dir",
            str(stack.pki.dir),
            "--checkin",
            stack.target("checkin"),
            "--venue",
            stack.target("venue"),
            "--devices",
            "3",
            "--people",
            "25",
            "--rate",
            "900",
            "--duration",
            "1.5",
            "--plain",
            "--codes-file",
            str(stack.settings.notify_file),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "acked/s=" in out  # the periodic plain lines
    assert "OK: every scan acknowledged" in out
    found = re.search(r"scans recorded ([\d,]+), acknowledged ([\d,]+), lost 0\b", out)
    assert found is not None, out
    recorded = int(found[1].replace(",", ""))
    assert int(found[2].replace(",", "")) == recorded
    assert recorded >= 900
    stored = db_conn("SELECT count(DISTINCT (device_id, sequence)) FROM scan_inbox")[0][0]
    assert stored == recorded
    assert db_conn("SELECT count(*) FROM devices")[0][0] == 3
    assert db_conn("SELECT count(*) FROM people")[0][0] == 25
