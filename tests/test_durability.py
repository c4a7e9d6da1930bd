"""Nothing acknowledged is lost, nothing is stored twice: devices stream through real
CheckIn server processes and worker processes while we kill -9 a server, kill -9 a
worker mid-batch, restart Postgres, or run two servers and three workers at once.

Each scenario ends the same way: every device drains its durable buffer (each scan
acknowledged, resent after reconnecting where it was not), the workers drain the
inbox, and the store holds exactly the scans sent, once each.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from stopcovid.client import ClientConfig
from stopcovid.client.buffer import ScanBuffer
from stopcovid.client.device import DeviceClient, ReconnectPolicy

from services.kernel.config import Settings
from services.ops import pg, setup
from tests.support.checkin_helpers import add_device, create_venue, enroll
from tests.support.database import Query, make_query
from tests.support.fleet import fleet, free_port
from tests.support.servers import Pki, Servers, running_servers
from tests.support.waits import wait_for

pytestmark = pytest.mark.timeout(240)


def stream_scans(
    pki: Pki,
    device_ids: list[str],
    ports: list[int],
    tmp_path: Path,
    tokens: list[str],
    *,
    per_device: int,
    disrupt: Callable[[], None] | None = None,
    disrupt_after: int = 0,
) -> tuple[int, list[ScanBuffer]]:
    """Devices (each with a durable buffer in `tmp_path`, device i on ports[i % n])
    record `per_device` scans each, a few at a time, while streaming; after
    `disrupt_after` scans in all, `disrupt()` runs (in a thread). Returns the scans
    sent, once every device has drained its buffer, and the buffers."""
    buffers = [ScanBuffer(tmp_path / f"{d}.db") for d in device_ids]
    configs = [
        ClientConfig.from_pki_dir(f"localhost:{ports[i % len(ports)]}", pki.dir, d)
        for i, d in enumerate(device_ids)
    ]
    sent = asyncio.run(
        _stream(
            configs,
            buffers,
            tokens,
            per_device=per_device,
            disrupt=disrupt,
            disrupt_after=disrupt_after,
        )
    )
    return sent, buffers


async def _stream(
    configs: list[ClientConfig],
    buffers: list[ScanBuffer],
    tokens: list[str],
    *,
    per_device: int,
    disrupt: Callable[[], None] | None,
    disrupt_after: int,
) -> int:
    devices = [
        DeviceClient(c, b, reconnect=ReconnectPolicy(initial=0.05, maximum=0.5))
        for c, b in zip(configs, buffers, strict=True)
    ]
    for device in devices:
        await device.start()
    recorded = 0
    disrupted = False
    step = 50
    for start in range(0, per_device, step):
        for d, device in enumerate(devices):
            device.scan_many(
                (tokens[(start + i + d) % len(tokens)], _now(), 1) for i in range(step)
            )
            recorded += step
        if disrupt is not None and not disrupted and recorded >= disrupt_after:
            disrupted = True
            await asyncio.to_thread(disrupt)
        await asyncio.sleep(0.01)
    async with asyncio.timeout(120):
        for device in devices:
            await device.drain()
    for device in devices:
        await device.close()
    return recorded


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def stored(query: Query) -> tuple[int, int]:
    """(rows in the store, distinct (device, sequence) among them)."""
    row = query("SELECT count(*) AS n, count(DISTINCT (device_id, sequence)) AS d FROM checkins")[0]
    return row["n"], row["d"]


def inbox_empty(query: Query) -> Callable[[], bool]:
    return lambda: query("SELECT count(*) FROM scan_inbox")[0][0] == 0


def setup_devices(
    servers: Servers, db_conn: Query, count: int, people: int = 20
) -> tuple[list[str], list[str]]:
    venue = create_venue(servers)
    devices = [add_device(servers, db_conn, venue) for _ in range(count)]
    tokens = [enroll(servers, f"+8551300{i:04d}").personal_token.token for i in range(people)]
    return devices, tokens


def test_kill_9_checkin_server_mid_stream(
    servers: Servers, db_conn: Query, pki: Pki, tmp_path: Path
) -> None:
    devices, tokens = setup_devices(servers, db_conn, 2)
    port = free_port()
    with fleet(servers.settings, tmp_path) as f:
        server = f.server(port)
        f.worker()

        def kill_and_restart() -> None:
            f.kill(server)
            f.restart(server)

        sent, buffers = stream_scans(
            pki,
            devices,
            [port],
            tmp_path,
            tokens,
            per_device=3000,
            disrupt=kill_and_restart,
            disrupt_after=2500,
        )
        wait_for(inbox_empty(db_conn), what="the inbox to drain")
    assert sent == 6000
    assert stored(db_conn) == (sent, sent)
    assert all(len(b) == 0 for b in buffers)


def test_kill_9_worker_mid_batch(
    servers: Servers, db_conn: Query, pki: Pki, tmp_path: Path
) -> None:
    devices, tokens = setup_devices(servers, db_conn, 2)
    port = free_port()
    with fleet(servers.settings, tmp_path) as f:
        f.server(port)
        # Fill the inbox with no worker running, so the first worker's batches are big.
        stream_scans(pki, devices, [port], tmp_path, tokens, per_device=10_000)
        assert db_conn("SELECT count(*) FROM scan_inbox")[0][0] == 20_000
        worker = f.worker(STOPCOVID_INGEST_BATCH_ROWS="5000", STOPCOVID_INGEST_WORKERS="1")
        # Kill it as soon as it has moved something but not everything: mid-run.
        wait_for(lambda: stored(db_conn)[0] > 0, what="the first moved batch")
        f.kill(worker)
        left = db_conn("SELECT count(*) FROM scan_inbox")[0][0]
        f.worker()
        wait_for(inbox_empty(db_conn), what="the inbox to drain")
    assert left > 0, "the worker finished before it was killed; the test proved nothing"
    assert stored(db_conn) == (20_000, 20_000)


def test_two_servers_and_three_workers(
    servers: Servers, db_conn: Query, pki: Pki, tmp_path: Path
) -> None:
    devices, tokens = setup_devices(servers, db_conn, 4)
    ports = [free_port(), free_port()]
    with fleet(servers.settings, tmp_path) as f:
        for port in ports:
            f.server(port)
        for _ in range(3):
            f.worker(STOPCOVID_INGEST_BATCH_ROWS="500")
        sent, _ = stream_scans(pki, devices, ports, tmp_path, tokens, per_device=2500)
        wait_for(inbox_empty(db_conn), what="the inbox to drain")
    assert stored(db_conn) == (sent, sent) == (10_000, 10_000)


@pytest.fixture
def own_cluster(
    session_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[pg.EmbeddedPostgres, Settings]]:
    """A cluster of this test's own, so restarting it disturbs no other test."""
    cluster = pg.EmbeddedPostgres(tmp_path_factory.mktemp("own-pg"))
    cluster.start()
    try:
        settings = replace(
            session_settings,
            database_url=f"postgresql://127.0.0.1:{cluster.port}/",
            database_name="stopcovid",
        )
        passwords = setup.ensure_db_passwords(settings)
        asyncio.run(setup.prepare_database(settings, cluster.superuser_dsn(), passwords))
        yield cluster, settings
    finally:
        cluster.stop()


def test_postgres_restart_mid_stream(
    own_cluster: tuple[pg.EmbeddedPostgres, Settings], pki: Pki, tmp_path: Path
) -> None:
    cluster, settings = own_cluster

    query = make_query(settings)

    with running_servers(settings, pki) as servers:
        devices, tokens = setup_devices(servers, query, 2)
    port = free_port()
    with fleet(settings, tmp_path) as f:
        f.server(port)
        f.worker(query)

        def restart_postgres() -> None:
            cluster.stop(mode="immediate")  # like a crash: no checkpoint, WAL replay
            time.sleep(0.5)
            cluster.start()

        sent, _ = stream_scans(
            pki,
            devices,
            [port],
            tmp_path,
            tokens,
            per_device=3000,
            disrupt=restart_postgres,
            disrupt_after=2500,
        )
        wait_for(inbox_empty(query), what="the inbox to drain")
    assert sent == 6000
    assert stored(query) == (sent, sent)
