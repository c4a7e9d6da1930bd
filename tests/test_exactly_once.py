"""Exactly once, case by case, through the real servers: a device has one writer at a
time on any server, a number names one scan on every day, and numbers outlive the
days that expire. tests/test_history.py drives the same rules at random."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator

import pytest
import stopcovid.client as clients
from stopcovid.checkin.v1 import checkin_service_pb2 as pb

from services.checkin.scans import Ledger
from services.checkin.server import SPEC as CHECKIN
from services.domain.retention.expiry_run import Q as EXPIRY
from services.kernel.keys import open_keystore, row_aad
from services.kernel.server import TlsMaterial
from tests.support.checkin_helpers import (
    EXIT,
    DeviceStream,
    add_device,
    batch,
    config,
    create_venue,
    enroll,
    now,
    open_stream,
    scan,
)
from tests.support.database import Query
from tests.support.servers import Servers, ServerThread

R = pb.ScanRejectReason
ADMITTED, DUPLICATE, REJECTED = (
    pb.SCAN_OUTCOME_ADMITTED,
    pb.SCAN_OUTCOME_DUPLICATE,
    pb.SCAN_OUTCOME_REJECTED,
)
REUSED = R.Value("SCAN_REJECT_REASON_SEQUENCE_REUSED")


def answers(stream: DeviceStream) -> list[tuple[int, int]]:
    return [(r.outcome, r.reject_reason) for r in stream.ack().results]


@pytest.fixture
def second_checkin(servers: Servers) -> Iterator[int]:
    """A second CheckIn server on the same database (as behind a load balancer)."""
    runner = ServerThread()
    try:
        yield runner.start(CHECKIN, servers.settings, TlsMaterial.from_settings(servers.settings))
    finally:
        runner.close()


def open_on(servers: Servers, port: int, device: str) -> DeviceStream:
    on = Servers({**servers.ports, "checkin": port}, servers.settings, servers.pki)
    return open_stream(on, device)


def superseded(stream: DeviceStream) -> bool:
    err = stream.ended_with(timeout=30)
    return isinstance(err, clients.Aborted) and err.reason == "STREAM_SUPERSEDED"


def test_a_new_stream_ends_the_old_one_on_another_server(
    servers: Servers, db_conn: Query, second_checkin: int
) -> None:
    """Stream 2 stores number 1; stream 1 (still open on the other server) then sends
    number 1 with other content: it must not be acknowledged, and one scan is stored."""
    venue = create_venue(servers)
    device = add_device(servers, db_conn, venue)
    alice = enroll(servers, "+85512100001").personal_token.token
    bob = enroll(servers, "+85512100002").personal_token.token
    first = open_stream(servers, device)
    second = open_on(servers, second_checkin, device)
    second.send(batch("b1", scan(1, alice)))
    assert answers(second) == [(ADMITTED, 0)]
    first.send(batch("b1", scan(1, bob)))
    assert superseded(first)
    assert second.end() is None
    rows = db_conn("SELECT sequence, person_ref FROM scan_inbox")
    assert len(rows) == 1


def test_a_stream_that_lost_its_device_cannot_commit_even_unnotified(
    servers: Servers, db_conn: Query, second_checkin: int
) -> None:
    """With the notification that ends old streams gone, the commit itself refuses
    the old stream's rows: the truth is checked where it cannot be bypassed."""
    db_conn("DROP TRIGGER device_streams_notify ON device_streams")
    venue = create_venue(servers)
    device = add_device(servers, db_conn, venue)
    alice = enroll(servers, "+85512100011").personal_token.token
    bob = enroll(servers, "+85512100012").personal_token.token
    first = open_stream(servers, device)
    second = open_on(servers, second_checkin, device)
    second.send(batch("b1", scan(7, alice)))
    assert answers(second) == [(ADMITTED, 0)]
    first.send(batch("b1", scan(7, bob), scan(8, bob)))
    assert superseded(first)
    second.send(batch("b2", scan(8, alice), scan(7, bob)))
    assert answers(second) == [(ADMITTED, 0), (REJECTED, REUSED)]
    assert second.end() is None
    assert [r[0] for r in db_conn("SELECT sequence FROM scan_inbox ORDER BY 1")] == [7, 8]


def test_unary_check_in_takes_over_from_the_devices_stream(
    servers: Servers, db_conn: Query
) -> None:
    venue = create_venue(servers)
    device = add_device(servers, db_conn, venue)
    token = enroll(servers, "+85512100021").personal_token.token
    stream = open_stream(servers, device)
    with clients.CheckInClient(config(servers, "checkin", device)) as checkin:
        result = checkin.rpc.CheckIn(pb.CheckInRequest(scan=scan(3, token))).result
    assert result.outcome == ADMITTED
    assert superseded(stream)
    again = open_stream(servers, device)
    again.send(batch("b1", scan(3, token, at=now() - dt.timedelta(minutes=5))))
    assert answers(again) == [(REJECTED, REUSED)]
    assert again.end() is None


def test_a_number_names_one_scan_on_every_day(servers: Servers, db_conn: Query) -> None:
    """The store's key includes the day; a number's uniqueness does not."""
    venue = create_venue(servers)
    device = add_device(servers, db_conn, venue)
    token = enroll(servers, "+85512100031").personal_token.token
    today = now()
    yesterday = today - dt.timedelta(days=1)
    stream = open_stream(servers, device)
    stream.send(batch("b1", scan(5, token, at=today)))
    stream.send(batch("b2", scan(5, token, at=yesterday), scan(5, token, at=today)))
    assert answers(stream) == [(ADMITTED, 0)]
    assert answers(stream) == [(REJECTED, REUSED), (DUPLICATE, 0)]
    assert stream.end() is None
    # Move the scan on into the store (as a worker does), then ask a new stream.
    db_conn("SELECT ensure_checkin_partition(day) FROM scan_inbox")
    db_conn(
        "WITH moved AS (DELETE FROM scan_inbox RETURNING *) INSERT INTO checkins"
        " (day, venue_id, device_id, sequence, scan_time, direction, outcome, decision_id,"
        " day_key_id, person_ref, person_enc, receive_time) SELECT day, venue_id, device_id,"
        " sequence, scan_time, direction, outcome, decision_id, day_key_id, person_ref,"
        " person_enc, receive_time FROM moved"
    )
    db_conn(
        "INSERT INTO device_sequences (device_id, last_sequence) VALUES ($1, 5)",
        uuid.UUID(device),
    )
    again = open_stream(servers, device)
    again.send(
        batch(
            "b3",
            scan(5, token, at=today - dt.timedelta(days=2)),
            scan(5, token, at=today, direction=EXIT),
            scan(5, token, at=today),
        )
    )
    assert answers(again) == [(REJECTED, REUSED), (REJECTED, REUSED), (DUPLICATE, 0)]
    assert again.end() is None
    assert db_conn("SELECT count(*) FROM checkins")[0][0] == 1


def test_numbers_of_an_expired_day_stay_retired(servers: Servers, db_conn: Query) -> None:
    """A day's rows expire; its numbers do not: reusing them is SEQUENCE_REUSED while
    the device has any scan left."""
    venue = create_venue(servers)
    device = add_device(servers, db_conn, venue)
    token = enroll(servers, "+85512100041").personal_token.token
    old = now().date() - dt.timedelta(days=40)
    keys = open_keystore(servers.settings.keystore_dir, servers.settings.secrets_dir)
    key = keys.day_key(old)
    db_conn("SELECT ensure_checkin_partition($1)", old)
    person = uuid.uuid4().bytes
    at = dt.datetime.combine(old, dt.time(9), dt.UTC)
    for sequence in (1, 2, 9):
        aad = row_aad(uuid.UUID(venue).bytes, uuid.UUID(device).bytes, sequence, old)
        db_conn(
            "INSERT INTO checkins (day, venue_id, device_id, sequence, scan_time, direction,"
            " outcome, day_key_id, person_ref, person_enc, receive_time)"
            " VALUES ($1, $2, $3, $4, $5, 'entry', 'admitted', $6, $7, $8, $5)",
            old,
            uuid.UUID(venue),
            uuid.UUID(device),
            sequence,
            at,
            key.key_id,
            key.pseudonym(person),
            key.encrypt(person, aad),
        )
    db_conn("SELECT expire_checkin_day($1)", old)
    retired = db_conn(
        "SELECT retired_through FROM device_sequences WHERE device_id = $1", uuid.UUID(device)
    )
    assert [r[0] for r in retired] == [9]
    assert db_conn("SELECT count(*) FROM device_day_sequences")[0][0] == 0
    stream = open_stream(servers, device)
    assert stream.settings is not None and stream.settings.last_stored_sequence == 9
    stream.send(batch("b1", scan(2, token), scan(9, token), scan(10, token)))
    assert answers(stream) == [(REJECTED, REUSED), (REJECTED, REUSED), (ADMITTED, 0)]
    assert stream.end() is None


def test_a_sealed_day_records_each_devices_highest_number(servers: Servers, db_conn: Query) -> None:
    """Sealing (counting a day that can take no more scans) records what expiry will
    retire, so expiring the day later needs no pass over it."""
    venue = create_venue(servers)
    device = uuid.UUID(add_device(servers, db_conn, venue))
    day = now().date() - dt.timedelta(days=10)
    db_conn("INSERT INTO day_keys (day, key_id) VALUES ($1, 'day-x')", day)
    db_conn("SELECT ensure_checkin_partition($1)", day)
    for sequence, outcome in ((3, "admitted"), (4, "denied")):
        db_conn(
            "INSERT INTO checkins (day, venue_id, device_id, sequence, scan_time, direction,"
            " outcome, day_key_id, person_ref, person_enc, receive_time)"
            " VALUES ($1, $2, $3, $4, now(), 'entry', $5, 'day-x', '\\x00', '\\x00', now())",
            day,
            uuid.UUID(venue),
            device,
            sequence,
            outcome,
        )
    db_conn(EXPIRY["seal_day"], day)
    sealed = db_conn("SELECT row_count, denied_count FROM day_keys WHERE day = $1", day)
    assert [tuple(r) for r in sealed] == [(2, 1)]
    recorded = db_conn("SELECT device_id, max_sequence FROM device_day_sequences")
    assert [tuple(r) for r in recorded] == [(device, 4)]


def test_the_ledger_never_forgets_a_number_still_being_committed() -> None:
    ledger = Ledger(high_water=0, keep=2)
    pending = ledger.open_batch()
    for sequence in range(1, 6):
        ledger.remember(pending, sequence, sequence * 10)
    done = ledger.open_batch()
    ledger.remember(done, 6, 60)
    ledger.settle(done)
    # Over `keep`, but the oldest batch is not settled: nothing may go.
    assert sorted(ledger.known) == [1, 2, 3, 4, 5, 6]
    ledger.settle(pending)
    assert len(ledger.known) <= 2
    assert ledger.needs_lookup([]) == []
    assert ledger.high_water == 6


def test_the_ledger_keeps_what_a_batch_skipped_the_lookup_for_until_it_is_decided() -> None:
    """A batch skips the lookup of numbers the ledger holds; another batch's commit
    settling during the awaits before the decision must not drop them, or a reused
    number would be decided as new (found by the history check with a small keep)."""
    ledger = Ledger(high_water=0, keep=2)
    for numbers in ((1,), (2, 3)):
        batch = ledger.open_batch()
        for sequence in numbers:
            ledger.remember(batch, sequence, sequence * 10)
        ledger.settle(batch)  # over keep: the oldest batch (1) goes
    assert sorted(ledger.known) == [2, 3]
    resend = [pb.Scan(sequence=2), pb.Scan(sequence=3)]
    with ledger.deciding():
        assert ledger.needs_lookup(resend) == []  # both held: no lookup
        other = ledger.open_batch()
        for sequence in (4, 5):
            ledger.remember(other, sequence, sequence * 10)
        ledger.settle(other)  # settles while the resend awaits its venue
        ledger.recalled([(9, 90)])  # a lookup's answer trims at once, too
        assert {2: 20, 3: 30}.items() <= ledger.known.items()
    assert len(ledger.known) <= 2  # decided: back within keep
