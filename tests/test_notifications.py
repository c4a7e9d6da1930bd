"""The notification outbox (services/domain/exposure/outbox.py, scheduled by
workers/notify.py, sending through services/kernel/senders.py): exactly one
message per contact, even when the SMS gateway fails and the outbox retries, or a
worker is killed mid-send; nothing sent once the grant is gone; messages that
never reveal the case.

The SMS gateway is a fake on loopback (http.server in a thread) that dedupes by
the Idempotency-Key header, as a real gateway must for the HTTP sender.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from stopcovid.exposure.v1 import exposure_service_pb2 as pb

from services.domain.exposure.messages import render
from services.domain.exposure.outbox import Delivery, after_attempt
from services.kernel.config import Settings
from services.kernel.senders import FileSender
from tests.support import exposure_helpers as ex
from tests.support.database import Query
from tests.support.fleet import worker_process
from tests.support.servers import Servers
from tests.support.trace_helpers import Small, finished_trace, small_scenario
from tests.support.waits import wait_for


@dataclass
class Gateway:
    """A fake SMS gateway: fails the first `fail_first` requests with 500, records
    each message once per Idempotency-Key, and (with `stall`) holds every answer
    until `release` is set."""

    fail_first: int = 0
    stall: bool = False
    requests: list[str] = field(default_factory=list)
    delivered: dict[str, dict[str, Any]] = field(default_factory=dict)
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def handle(self, key: str, body: dict[str, Any]) -> int:
        with self.lock:
            self.requests.append(key)
            if self.fail_first > 0:
                self.fail_first -= 1
                return 500
            self.delivered.setdefault(key, body)
        if self.stall:
            self.release.wait(30)
        return 200


@pytest.fixture
def gateway_factory() -> Iterator[Any]:
    servers: list[ThreadingHTTPServer] = []
    made: list[Gateway] = []

    def make(**kwargs: Any) -> Gateway:
        gateway = Gateway(**kwargs)

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length))
                status = gateway.handle(self.headers.get("Idempotency-Key", ""), body)
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    pass  # the worker was killed while we stalled

            def log_message(self, format: str, *args: Any) -> None:
                return

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        gateway.url = f"http://127.0.0.1:{server.server_address[1]}/sms"
        servers.append(server)
        made.append(gateway)
        return gateway

    yield make
    for gateway in made:
        gateway.release.set()
    for server in servers:
        server.shutdown()
        server.server_close()


def http_env(gateway: Gateway, **extra: str) -> dict[str, str]:
    return {
        "STOPCOVID_NOTIFY_SENDER": "http",
        "STOPCOVID_NOTIFY_HTTP_URL": gateway.url,
        "STOPCOVID_NOTIFY_BACKOFF_BASE_S": "0.05",
        "STOPCOVID_NOTIFY_BACKOFF_CAP_S": "0.2",
        **extra,
    }


def states(db_conn: Query) -> list[str]:
    return sorted(r[0] for r in db_conn("SELECT state FROM notifications"))


def traced(servers: Servers, db_conn: Query, tag: str) -> tuple[Small, str]:
    s = small_scenario(servers, db_conn, tag)
    trace = ex.start_trace(servers, s.case_id, s.grant_id)
    done = finished_trace(servers, trace.trace_id)
    assert done.state == pb.TRACE_STATE_SUCCEEDED, done.error_message
    return s, trace.trace_id


def assert_never_about_the_case(s: Small, texts: list[str]) -> None:
    for text in texts:
        for secret in (s.case_phone, s.case_person, s.case_id, s.case_phone[4:]):
            assert secret not in text


def test_a_failing_gateway_is_retried_and_each_contact_gets_one_message(
    servers: Servers, db_conn: Query, tmp_path: Path, gateway_factory: Any
) -> None:
    gateway: Gateway = gateway_factory(fail_first=3)
    with worker_process(servers.settings, tmp_path / "w.log", **http_env(gateway)):
        # "brief" reads English: the template and the text follow the person.
        s = small_scenario(servers, db_conn, "301")
        db_conn(
            "UPDATE people SET language_code = 'en' WHERE person_id = $1",
            uuid.UUID(s.people["brief"].person_id),
        )
        trace = ex.start_trace(servers, s.case_id, s.grant_id)
        assert finished_trace(servers, trace.trace_id).state == pb.TRACE_STATE_SUCCEEDED
        wait_for(lambda: states(db_conn) == ["sent", "sent"], what="both notifications sent")

    assert len(gateway.requests) >= 5  # 3 refused, then one per contact at least
    assert len(gateway.delivered) == 2
    by_phone = {m["to"]: m for m in gateway.delivered.values()}
    assert set(by_phone) == {"+85513010001", "+85513010002"}
    close, brief = by_phone["+85513010001"], by_phone["+85513010002"]
    assert "Hall 301" in close["text"] and "ខ្ពស់" in close["text"]
    assert brief["text"].startswith("Stop COVID: you were at Hall 301")
    assert "MEDIUM" in brief["text"]
    assert_never_about_the_case(s, [m["text"] for m in gateway.delivered.values()])

    rows = db_conn("SELECT notification_id, attempt_count, template, last_error FROM notifications")
    assert {str(r["notification_id"]) for r in rows} == set(gateway.delivered)
    assert sum(r["attempt_count"] for r in rows) == len(gateway.requests)
    assert {r["template"] for r in rows} == {"exposure-high-km-1", "exposure-medium-en-1"}
    with ex.exposure(servers) as client:
        listed = client.rpc.ListNotifications(
            pb.ListNotificationsRequest(trace_id=trace.trace_id)
        ).notifications
    assert {n.state for n in listed} == {pb.NOTIFICATION_STATE_SENT}
    for n in listed:
        assert "+855" not in str(n)
    # Each phone decryption was audited under the grant, with counts only.
    audits = db_conn(
        "SELECT grant_id, details FROM audit_events WHERE action = 'worker.notify.decrypt_phone'"
    )
    assert audits and {str(a["grant_id"]) for a in audits} == {s.grant_id}
    assert sum(json.loads(a["details"])["phones"] for a in audits) == len(gateway.requests)
    assert all("+855" not in a["details"] for a in audits)


def test_a_worker_killed_mid_send_leaves_each_message_delivered_once(
    servers: Servers, db_conn: Query, tmp_path: Path, gateway_factory: Any
) -> None:
    gateway: Gateway = gateway_factory(stall=True)
    # The first worker would wait 20 s for an answer; its lease is 3 s.
    slow = http_env(gateway, STOPCOVID_NOTIFY_LEASE_S="3", STOPCOVID_NOTIFY_HTTP_TIMEOUT_S="20")
    env = http_env(gateway, STOPCOVID_NOTIFY_LEASE_S="3", STOPCOVID_NOTIFY_HTTP_TIMEOUT_S="2")
    with worker_process(servers.settings, tmp_path / "first.log", **slow) as first:
        s, _ = traced(servers, db_conn, "302")
        # The gateway has accepted both messages; the worker waits for its answer.
        wait_for(lambda: len(gateway.delivered) == 2, what="the gateway to get both")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=15)
    assert states(db_conn) == ["queued", "queued"]
    gateway.stall = False
    gateway.release.set()
    with worker_process(servers.settings, tmp_path / "second.log", **env):
        wait_for(lambda: states(db_conn) == ["sent", "sent"], what="both marked sent")
    assert len(gateway.requests) == 4  # each sent again after the lease: same key
    assert len(gateway.delivered) == 2
    assert sorted(m["to"] for m in gateway.delivered.values()) == [
        "+85513020001",
        "+85513020002",
    ]
    assert [r[0] for r in db_conn("SELECT attempt_count FROM notifications")] == [2, 2]
    assert_never_about_the_case(s, [m["text"] for m in gateway.delivered.values()])


def test_nothing_is_sent_once_the_grant_has_expired(
    servers: Servers, db_conn: Query, tmp_path: Path, gateway_factory: Any
) -> None:
    # The gateway is down at first: both messages wait for a retry an hour away.
    gateway: Gateway = gateway_factory(fail_first=2)
    env = http_env(
        gateway,
        STOPCOVID_NOTIFY_BACKOFF_BASE_S="3600",
        STOPCOVID_NOTIFY_BACKOFF_CAP_S="3600",
    )
    with worker_process(servers.settings, tmp_path / "w.log", **env):
        s, _ = traced(servers, db_conn, "303")
        wait_for(lambda: len(gateway.requests) == 2, what="the failed attempts")
        db_conn(
            "UPDATE access_grants SET create_time = now() - interval '2 hours',"
            " expire_time = now() - interval '1 hour' WHERE grant_id = $1",
            uuid.UUID(s.grant_id),
        )
        db_conn("UPDATE notifications SET next_attempt_time = now()")
        wait_for(lambda: states(db_conn) == ["cancelled", "cancelled"], what="cancelled")
    assert len(gateway.requests) == 2 and gateway.delivered == {}
    errors = {r[0] for r in db_conn("SELECT last_error FROM notifications")}
    assert errors == {"cancelled: access grant no longer active (GRANT_EXPIRED)"}
    assert (
        db_conn(
            "SELECT count(*) FROM audit_events WHERE action = 'worker.notify.decrypt_phone'"
            " AND details->>'phones' = '2'"
        )[0][0]
        == 1
    )  # the first attempt's; none after the expiry


def test_a_revoked_grant_cancels_queued_notifications(
    servers: Servers, db_conn: Query, tmp_path: Path, gateway_factory: Any
) -> None:
    gateway: Gateway = gateway_factory(fail_first=2)
    env = http_env(
        gateway,
        STOPCOVID_NOTIFY_BACKOFF_BASE_S="2",
        STOPCOVID_NOTIFY_BACKOFF_CAP_S="2",
    )
    with worker_process(servers.settings, tmp_path / "w.log", **env):
        s, _ = traced(servers, db_conn, "304")
        wait_for(lambda: len(gateway.requests) == 2, what="the failed attempts")
        ex.revoke(servers, s.grant_id)
        db_conn("UPDATE notifications SET next_attempt_time = now() WHERE state = 'queued'")
        wait_for(
            lambda: states(db_conn) == ["cancelled", "cancelled"], what="cancelled", timeout=30
        )
    assert gateway.delivered == {}


def test_a_contact_reported_as_a_case_before_delivery_is_not_told_they_were_exposed(
    servers: Servers, db_conn: Query, tmp_path: Path, gateway_factory: Any
) -> None:
    gateway: Gateway = gateway_factory(fail_first=2)
    env = http_env(
        gateway, STOPCOVID_NOTIFY_BACKOFF_BASE_S="3600", STOPCOVID_NOTIFY_BACKOFF_CAP_S="3600"
    )
    with worker_process(servers.settings, tmp_path / "w.log", **env):
        s, _ = traced(servers, db_conn, "305")
        wait_for(lambda: len(gateway.requests) == 2, what="the failed attempts")
        # Meanwhile "close" tests positive: told as a case, not as a contact.
        ex.report_case(servers, ex.by_id(s.people["close"].person_id), reference="LAB-305")
        db_conn("UPDATE notifications SET next_attempt_time = now() WHERE state = 'queued'")
        wait_for(lambda: states(db_conn) == ["cancelled", "sent"], what="one cancelled, one sent")
    assert [m["to"] for m in gateway.delivered.values()] == ["+85513050002"]  # "brief"
    errors = {
        r[0] for r in db_conn("SELECT last_error FROM notifications WHERE state = 'cancelled'")
    }
    assert errors == {"cancelled: a confirmed case"}


def test_the_file_sender_writes_each_notification_once(tmp_path: Path) -> None:
    path = tmp_path / "out" / "sms.jsonl"
    first, second = uuid.uuid4(), uuid.uuid4()
    sender = FileSender(path)
    sender._send_sync(first, "+85512999001", "one")
    sender._send_sync(first, "+85512999001", "one")
    # Another process (or this one after a crash) knows what is in the file.
    with path.open("ab") as f:
        f.write(b'{"notification_id": "torn')  # a crash mid-write: not a message
    again = FileSender(path)
    again._send_sync(first, "+85512999001", "one")
    again._send_sync(second, "+85512999002", "two")
    sender._send_sync(second, "+85512999002", "two")
    ids = []
    for line in path.read_bytes().split(b"\n"):
        try:
            ids.append(json.loads(line)["notification_id"])
        except ValueError:
            assert line in (b"", b'{"notification_id": "torn')
    assert sorted(ids) == sorted([str(first), str(second)])
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_messages_say_level_venue_date_and_advice_in_khmer_or_english() -> None:
    import datetime as dt

    day = dt.date(2026, 11, 20)
    english = render("high", "Central Market", day, "en")
    assert "Central Market" in english and "2026-11-20" in english and "HIGH" in english
    assert "stay at home" in english
    khmer = render("low", "Central Market", day, "km")
    assert "ទាប" in khmer and "2026-11-20" in khmer
    assert render("medium", "", None, "km")  # no venue or date known: still a message


def test_an_attempt_is_sent_retried_with_a_growing_capped_delay_or_given_up() -> None:
    import datetime as dt
    from dataclasses import replace

    settings = replace(
        Settings.from_env(),
        notify_max_attempts=6,
        notify_backoff_base_s=30.0,
        notify_backoff_cap_s=100.0,
    )
    now = dt.datetime(2026, 11, 20, 8, tzinfo=dt.UTC)

    def attempt(count: int) -> Delivery:
        return Delivery(uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), count, "+85512999001", "x")

    assert after_attempt(settings, attempt(1), now=now).state == "sent"
    for count, full in [(1, 30.0), (2, 60.0), (3, 100.0), (5, 100.0)]:
        retry = after_attempt(settings, attempt(count), "gateway answered HTTP 503", now=now)
        assert (retry.state, retry.last_error) == ("queued", "gateway answered HTTP 503")
        assert retry.next_attempt_time is not None
        wait = (retry.next_attempt_time - now).total_seconds()
        assert full / 2 <= wait <= full  # jittered, never past the cap
    last = after_attempt(settings, attempt(6), "gateway timed out", now=now)
    refused = after_attempt(settings, attempt(1), "gateway answered HTTP 400", permanent=True)
    for given_up in (last, refused):
        assert given_up.state == "failed" and given_up.next_attempt_time is None
