"""Monitoring of a running system, for real: a CheckIn server process and a worker
process serve their metrics on ports of their own; a real Prometheus scrapes them
over loopback and the test reads the figures back through PromQL; `stopcovid
status` reads the same endpoints. Devices stream through the SDK meanwhile, so
the figures have something to count, and must count it exactly."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from stopcovid.client import ClientConfig
from stopcovid.client.buffer import ScanBuffer
from stopcovid.client.device import DeviceClient

from services.ops.harness import Child
from tests.support.checkin_helpers import add_device, create_venue, enroll
from tests.support.database import Query
from tests.support.fleet import Fleet, fleet, free_port
from tests.support.servers import Pki, Servers
from tests.support.waits import wait_for

pytestmark = pytest.mark.timeout(240)

PROMETHEUS = shutil.which("prometheus")

SCANS_PER_DEVICE = 600


def metrics_text(endpoint: str) -> str:
    with urllib.request.urlopen(f"http://{endpoint}/metrics", timeout=5) as reply:
        text: str = reply.read().decode()
        return text


async def _stream(configs: list[ClientConfig], tmp: Path, tokens: list[str]) -> int:
    devices = [DeviceClient(c, ScanBuffer(tmp / f"{i}.db")) for i, c in enumerate(configs)]
    for device in devices:
        await device.start()
    sent = 0
    for start in range(0, SCANS_PER_DEVICE, 100):
        for device in devices:
            now = dt.datetime.now(dt.UTC)
            device.scan_many((tokens[(start + i) % len(tokens)], now, 1) for i in range(100))
            sent += 100
        await asyncio.sleep(0.05)
    async with asyncio.timeout(120):
        for device in devices:
            await device.drain()
    for device in devices:
        await device.close()
    return sent


@pytest.fixture
def system(
    servers: Servers, db_conn: Query, tmp_path: Path
) -> Iterator[tuple[Fleet, Child, Child, list[str], list[str]]]:
    """A CheckIn server process and a worker process, with devices and people."""
    venue = create_venue(servers)
    devices = [add_device(servers, db_conn, venue) for _ in range(2)]
    tokens = [enroll(servers, f"+8551410{i:04d}").personal_token.token for i in range(10)]
    with fleet(servers.settings, tmp_path / "logs") as f:
        server = f.server(free_port())
        worker = f.worker(db_conn)
        yield f, server, worker, devices, tokens


def test_every_process_serves_metrics_on_its_own_port(
    system: tuple[Fleet, Child, Child, list[str], list[str]],
) -> None:
    f, server, worker, _, _ = system
    endpoints = f.harness.metrics_endpoints()
    assert set(endpoints) == {server.name, worker.name}
    assert len(set(endpoints.values())) == 2
    served = metrics_text(endpoints[server.name])
    assert 'grpc_server_started_total{grpc_method="Check"' in served  # the harness's probe
    assert "stopcovid_checkin_inbox_lag_rows" in served
    assert 'stopcovid_certificate_expiry_timestamp_seconds{certificate="server"}' in served
    assert HEARTBEAT not in served
    wait_for(
        lambda: _value(metrics_text(endpoints["workers"]), HEARTBEAT) > 0,
        what="the worker's first heartbeat in its metrics",
    )
    # Each process exports its own figures only: no CheckIn gauge at zero in a worker.
    assert "stopcovid_checkin_" not in metrics_text(endpoints["workers"])


HEARTBEAT = "stopcovid_worker_heartbeat_timestamp_seconds"


def _value(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not served")


def _prometheus(tmp: Path, targets: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    assert PROMETHEUS is not None
    jobs = "".join(
        f"  - job_name: stopcovid-{name}\n    static_configs: [{{targets: ['{where}']}}]\n"
        for name, where in targets.items()
    )
    config = tmp / "prometheus.yml"
    config.write_text(f"global:\n  scrape_interval: 1s\nscrape_configs:\n{jobs}")
    listen = f"127.0.0.1:{free_port()}"
    log = (tmp / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address={listen}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    log.close()
    return proc, listen


def _query(listen: str, promql: str) -> list[dict[str, object]]:
    url = f"http://{listen}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as reply:
        body = json.loads(reply.read())
    assert body["status"] == "success", body
    result: list[dict[str, object]] = body["data"]["result"]
    return result


def _scalar(listen: str, promql: str) -> float | None:
    try:
        result = _query(listen, promql)
    except OSError:
        return None  # not listening yet
    if not result:
        return None
    value = result[0]["value"]
    assert isinstance(value, list)
    return float(value[1])


@pytest.mark.skipif(
    PROMETHEUS is None,
    reason="prometheus is not installed (Debian: apt-get install prometheus; ./dev test "
    "installs it when it runs as root with apt-get)",
)
def test_prometheus_scrapes_the_running_system_and_reads_rates_back(
    system: tuple[Fleet, Child, Child, list[str], list[str]], pki: Pki, tmp_path: Path
) -> None:
    f, server, worker, devices, tokens = system
    endpoints = f.harness.metrics_endpoints()
    proc, listen = _prometheus(
        tmp_path, {"checkin": endpoints[server.name], "workers": endpoints[worker.name]}
    )
    try:
        wait_for(
            lambda: _scalar(listen, 'sum(up{job=~"stopcovid-.*"})') == 2.0,
            what="Prometheus to scrape both processes",
        )
        target = f"localhost:{server.port}"
        configs = [ClientConfig.from_pki_dir(target, pki.dir, d) for d in devices]
        sent = asyncio.run(_stream(configs, tmp_path, tokens))
        assert sent == 2 * SCANS_PER_DEVICE

        # Rates, read back while the scans are still inside the rate's window.
        admitted = 'sum(rate(stopcovid_checkin_scans_total{outcome="admitted"}[1m]))'
        wait_for(lambda: (_scalar(listen, admitted) or 0) > 0, what="a rate of admitted scans")
        received = (
            'sum(rate(grpc_server_msg_received_total{grpc_method="StreamScans",'
            ' grpc_type="bidi_stream"}[1m]))'
        )
        wait_for(lambda: (_scalar(listen, received) or 0) > 0, what="a rate of batches received")
        beats = 'sum(rate(stopcovid_worker_job_batches_total{worker_job="worker_heartbeat"}[1m]))'
        wait_for(lambda: (_scalar(listen, beats) or 0) > 0, what="a rate of worker heartbeats")
        # And the counts are exact once the last scrape has them: every scan admitted
        # once, each written by exactly one group commit.
        wait_for(
            lambda: (
                _scalar(listen, 'sum(stopcovid_checkin_scans_total{outcome="admitted"})') == sent
            ),
            what="Prometheus to hold the exact count of admitted scans",
        )
        assert _scalar(listen, 'sum(stopcovid_checkin_scans_total{outcome!="admitted"})') == 0
        commit_rows = _scalar(listen, "sum(stopcovid_checkin_group_commit_rows_sum)")
        assert commit_rows == sent
        wait_for(
            lambda: _scalar(listen, "max(stopcovid_checkin_inbox_lag_rows)") == 0,
            what="an empty inbox, as scraped",
        )
        handled = _query(
            listen,
            'sum by (grpc_code) (grpc_server_handled_total{grpc_method="StreamScans"})',
        )
        codes = {str(r["metric"]["grpc_code"]) for r in handled}  # type: ignore[index]
        assert codes <= {"OK", "CANCELLED"}, codes
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_status_shows_the_key_figures_of_the_running_system(
    system: tuple[Fleet, Child, Child, list[str], list[str]], pki: Pki, tmp_path: Path
) -> None:
    f, server, worker, devices, tokens = system
    configs = [ClientConfig.from_pki_dir(f"localhost:{server.port}", pki.dir, d) for d in devices]
    sent = asyncio.run(_stream(configs, tmp_path, tokens))
    endpoints = f.harness.metrics_endpoints()
    args = [f"--endpoint=checkin={endpoints[server.name]}"]
    args += [f"--endpoint=workers={endpoints[worker.name]}", "--endpoint=venue=127.0.0.1:1"]
    shown = subprocess.run(
        [sys.executable, "-m", "services.ops.cli", "status", "--interval=0.2", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "160"},
        timeout=60,
        check=False,
    )
    out = shown.stdout
    assert shown.returncode == 1, out + shown.stderr  # the venue endpoint is down
    lines = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in _rows(out)}
    processes = {row[0]: row[2] for row in (r.split("│")[1:4] for r in _rows(out)) if row}
    assert lines["scans decided (since start)"] == f"{sent:,}"
    assert lines["open streams"] == "0"
    assert lines["inbox lag (rows, oldest)"] == "0, 0.0 s"
    assert lines["caches last reloaded"].endswith(" s ago")
    assert lines["nearest certificate expiry"].endswith(" days")
    assert {k.strip(): v.strip() for k, v in processes.items()}.items() >= {
        "checkin": "up",
        "workers": "up",
        "venue": "down (URLError)",
    }.items()


def _rows(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("│")]
