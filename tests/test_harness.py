"""The process harness (services/ops/harness.py) with real server and worker
processes: readiness on the health service, a child that dies while awaited, a
restart on the same port, the stop order, and a parent-death signal that follows
the process, not the thread that happened to start the child. That `up` killed
outright leaves no server or worker behind is in test_up_grpcurl.py."""

from __future__ import annotations

import datetime as dt
import json
import signal
import sys
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.kernel.config import Settings
from services.ops.harness import Child, ChildFailed, Harness
from tests.support.servers import Pki
from tests.support.waits import wait_for

JSON_LOGS = {"STOPCOVID_LOG_FORMAT": "json"}


def started(log_file: Path) -> bool:
    """The worker pool has said it runs (its signal handling is in place by then)."""
    return '"event": "workers_started"' in log_file.read_text()


def event_time(child: Child, event: str) -> dt.datetime:
    for line in child.log().splitlines():
        if line.startswith("{") and json.loads(line).get("event") == event:
            return dt.datetime.fromisoformat(json.loads(line)["timestamp"])
    raise AssertionError(f"{child.name} never logged {event}")


def health(pki: Pki, port: int) -> int:
    creds = pki.credentials("dev-auditor")
    with grpc.secure_channel(f"localhost:{port}", creds) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
    status: int = reply.status
    return status


def test_a_server_is_ready_when_it_serves_and_restarts_on_its_port(
    settings: Settings, pki: Pki, tmp_path: Path
) -> None:
    with Harness(settings, env=JSON_LOGS, log_dir=tmp_path) as processes:
        server = processes.server("checkin", port=0)
        assert server.port is not None and server.port > 0  # learnt from its port file
        assert health(pki, server.port) == health_pb2.HealthCheckResponse.SERVING
        processes.kill(server)
        assert server.returncode == -signal.SIGKILL
        again = processes.restart(server)
        assert (again.port, again.alive()) == (server.port, True)
        assert again.pid != server.pid
        assert processes.children == [again]
        assert health(pki, server.port) == health_pb2.HealthCheckResponse.SERVING


def test_a_child_that_dies_while_awaited_fails_the_wait_with_its_exit_code(
    settings: Settings, pki: Pki, tmp_path: Path
) -> None:
    with (
        Harness(settings, env=JSON_LOGS, log_dir=tmp_path) as processes,
        pytest.raises(ChildFailed, match="venue exited with code 1"),
    ):
        processes.server("venue", port=0, env={"STOPCOVID_GRACE_SECONDS": "soon"})
    assert "STOPCOVID_GRACE_SECONDS must be a number" in (tmp_path / "venue.log").read_text()


def test_stop_ends_the_servers_before_it_signals_the_workers(
    settings: Settings, pki: Pki, tmp_path: Path
) -> None:
    processes = Harness(settings, env=JSON_LOGS, log_dir=tmp_path)
    try:
        worker = processes.worker(ready=lambda: started(tmp_path / "workers.log"))
        server = processes.server("checkin", port=0)
    finally:
        processes.stop()
    assert (server.returncode, worker.returncode) == (0, 0)  # both stopped gracefully
    assert processes.children == []
    assert event_time(server, "server_stopped") <= event_time(worker, "workers_stopping")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_started_from_a_short_lived_thread_outlives_the_thread(
    settings: Settings, tmp_path: Path
) -> None:
    """Linux sends the parent-death signal when the thread that forked the child
    ends. A worker started from a thread that then ends must keep running: it gets
    no SIGTERM, and stops only on the SIGINT sent here."""
    log_file = tmp_path / "workers.log"
    with Harness(settings, env=JSON_LOGS, log_dir=tmp_path) as processes:
        made: list[Child] = []
        thread_ids: list[int] = []

        def start() -> None:
            thread_ids.append(threading.get_native_id())
            made.append(processes.worker(ready=lambda: started(log_file)))

        thread = threading.Thread(target=start)
        thread.start()
        thread.join()
        # Gone from the kernel too: a signal tied to that thread would have been sent.
        wait_for(
            lambda: not Path(f"/proc/self/task/{thread_ids[0]}").exists(),
            what="the thread to end",
        )
        (worker,) = made
        worker.proc.send_signal(signal.SIGINT)
        assert worker.wait(timeout=30) == 0
    text = log_file.read_text()
    assert '"signal": "SIGINT"' in text
    assert "SIGTERM" not in text
