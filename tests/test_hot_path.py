"""The hot path's write side: scans encoded once as binary COPY rows, written straight
into the store (the inbox only for what the store refuses), in groups of bounded
size, and never twice when a commit's answer is lost with its connection."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import uuid
from dataclasses import replace
from urllib.parse import urlsplit

import asyncpg
import pytest

from services.checkin import copyrows
from services.checkin.commit import INBOX, STORE, GroupCommitter, copy_rows
from services.domain.checkins.inbox import COLUMNS, InboxRow
from services.kernel import db
from services.kernel.config import Settings
from tests.support.checkin_helpers import (
    add_device,
    batch,
    create_venue,
    enroll,
    now,
    open_stream,
    scan,
)
from tests.support.database import Query
from tests.support.faults import commit_cutter
from tests.support.servers import Servers

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _us(at: dt.datetime) -> int:
    return (at - _EPOCH) // dt.timedelta(microseconds=1)


def _rows(count: int, day: dt.date, device: uuid.UUID | None = None) -> list[InboxRow]:
    """Synthetic rows (content is not checked by the store: any bytes will do)."""
    venue = uuid.uuid4()
    at = dt.datetime.combine(day, dt.time(9, 30, 15, 123456), dt.UTC)
    return [
        InboxRow(
            day,
            venue,
            device,
            i + 1 if device else None,
            at + dt.timedelta(seconds=i),
            "entry" if i % 3 else "exit",
            "denied" if i % 5 == 0 else "admitted",
            uuid.uuid4() if i % 5 == 0 else None,
            f"day-{day.isoformat()}",
            bytes([i % 256]) * 16,
            bytes([(i + 1) % 256]) * 44,
            at + dt.timedelta(seconds=i, milliseconds=3),
        )
        for i in range(count)
    ]


def _encode(rows: list[InboxRow]) -> bytes:
    """Rows as the Decider encodes them (one encoder per venue, device and batch)."""
    first = rows[0]
    encoder = copyrows.RowEncoder(first.venue_id, first.device_id, _us(first.receive_time))
    out = []
    for r in rows:
        assert (r.venue_id, r.device_id, r.receive_time) == (
            first.venue_id,
            first.device_id,
            first.receive_time,
        )
        out.append(
            encoder.row(
                r.day,
                r.day_key_id,
                r.sequence,
                _us(r.scan_time),
                r.direction,
                r.outcome,
                r.decision_id,
                r.person_ref,
                r.person_enc,
            )
        )
    return b"".join(out)


async def _connect(settings: Settings, role: str = db.MIGRATOR) -> asyncpg.Connection:
    return await asyncpg.connect(**db.connect_args(settings, role).kwargs())


def test_encoded_rows_read_back_as_the_inbox_row_in_both_tables(
    settings: Settings, db_conn: Query
) -> None:
    day = now().date()
    db_conn("SELECT ensure_checkin_partition($1)", day)
    device_rows = _rows(7, day, uuid.uuid4())
    self_rows = _rows(3, day)
    # Each row's receive time is its own, not the batch's, in these synthetic rows:
    # encode one row per encoder so the comparison is exact.
    chunks = [_encode([r]) for r in device_rows + self_rows]
    expected = sorted(device_rows + self_rows, key=repr)
    for table, rows in asyncio.run(_copy_and_read(settings, chunks)).items():
        assert rows == expected, table


async def _copy_and_read(settings: Settings, chunks: list[bytes]) -> dict[str, list[InboxRow]]:
    """The encoded rows COPYed into the store and into the inbox, and read back (sorted)."""
    conn = await _connect(settings)
    try:
        out = {}
        for table in (STORE, INBOX):
            async with conn.transaction():
                await copy_rows(conn, table, chunks)
            read = await conn.fetch(f"SELECT {', '.join(COLUMNS)} FROM {table}")  # noqa: S608
            out[table] = sorted((InboxRow(*r.values()) for r in read), key=repr)
        return out
    finally:
        await conn.close()


def test_packed_rows_are_the_general_rows_and_read_back(settings: Settings, db_conn: Query) -> None:
    """The one-struct packer of the common shape (a device's admitted scan) gives the
    general encoder's bytes, which COPY takes into the store and the inbox."""
    day = now().date()
    db_conn("SELECT ensure_checkin_partition($1)", day)
    first, *others = _rows(6, day, uuid.uuid4())
    rows = [
        dataclasses.replace(
            r, outcome="admitted", decision_id=None, receive_time=first.receive_time
        )
        for r in [first, *others]
    ]
    encoder = copyrows.RowEncoder(first.venue_id, first.device_id, _us(first.receive_time))
    packed = []
    for r in rows:
        assert r.sequence is not None
        pack = encoder.packer(r.day, r.day_key_id, r.direction, r.outcome)
        packed.append(pack(r.sequence, _us(r.scan_time), r.person_ref, r.person_enc))
    assert packed == [_encode([r]) for r in rows]
    with pytest.raises(ValueError, match="size"):
        pack(1, 0, b"short", rows[0].person_enc)
    with pytest.raises(ValueError, match="device"):
        copyrows.RowEncoder(first.venue_id, None, 0).packer(day, "k", "entry", "admitted")

    for table, read in asyncio.run(_copy_and_read(settings, packed)).items():
        assert read == sorted(rows, key=repr), table


def test_new_scans_go_straight_into_the_store(servers: Servers, db_conn: Query) -> None:
    """With the day's partition in place (the workers make them ahead), nothing waits
    in the inbox: the scan is in the store when its ack arrives."""
    db_conn("SELECT ensure_checkin_partition($1)", now().date())
    venue = create_venue(servers)
    device = add_device(servers, db_conn, venue)
    token = enroll(servers, "+85512300001").personal_token.token
    stream = open_stream(servers, device)
    stream.send(batch("b1", scan(1, token), scan(2, token)))
    assert [r.outcome for r in stream.ack().results] == [1, 1]
    assert stream.end() is None
    assert db_conn("SELECT count(*) FROM checkins")[0][0] == 2
    assert db_conn("SELECT count(*) FROM scan_inbox")[0][0] == 0


def test_a_day_without_its_partition_waits_in_the_inbox(servers: Servers, db_conn: Query) -> None:
    venue = create_venue(servers)
    device = add_device(servers, db_conn, venue)
    token = enroll(servers, "+85512300002").personal_token.token
    stream = open_stream(servers, device)
    stream.send(batch("b1", scan(1, token)))
    assert [r.outcome for r in stream.ack().results] == [1]
    assert stream.end() is None
    assert db_conn("SELECT count(*) FROM checkins")[0][0] == 0
    assert db_conn("SELECT count(*) FROM scan_inbox")[0][0] == 1


def test_a_group_commit_takes_at_most_max_rows(settings: Settings, db_conn: Query) -> None:
    """Rows that piled up while the commit slots were busy are committed in several
    groups of at most `max_rows` (plus the last caller's rows), never in one
    (which took seconds at full load and made every ack arrive in one burst)."""
    day = now().date()
    db_conn("SELECT ensure_checkin_partition($1)", day)
    callers = [[_encode([r]) for r in _rows(3, day)] for _ in range(20)]

    async def go() -> None:
        pool = await db.create_pool(settings, db.SERVICE_ROLES["checkin"])
        committer = GroupCommitter(pool, interval_s=0.001, max_rows=10, max_concurrent=1)
        await committer.start()
        try:
            # All submitted before the committer runs: they pile up together.
            await asyncio.gather(*(committer.submit(rows) for rows in callers))
        finally:
            await committer.close()
            await pool.close()

    asyncio.run(go())
    groups = [r[0] for r in db_conn("SELECT count(*) FROM checkins GROUP BY xmin::text")]
    assert sum(groups) == 20 * 3
    assert max(groups) <= 10 + 2  # whole callers: the group that reaches 10 may hold 12
    assert len(groups) >= 5


def test_a_commit_whose_answer_is_lost_is_written_once(settings: Settings, db_conn: Query) -> None:
    """The connection dies right after Postgres committed the group, before the
    answer reaches the server: the retry asks what became of the transaction
    instead of writing the group again. Self check-ins (no device, no sequence) have
    no key that would catch a second copy, so the count is the proof."""
    day = now().date()
    db_conn("SELECT ensure_checkin_partition($1)", day)
    rows = _rows(5, day)
    chunks = [_encode([r]) for r in rows]
    upstream = urlsplit(str(settings.database_url)).port
    assert upstream is not None
    with commit_cutter(upstream) as cutter:
        through = replace(settings, database_url=f"postgresql://127.0.0.1:{cutter.port}/")

        async def go() -> None:
            pool = await db.create_pool(through, db.SERVICE_ROLES["checkin"])
            committer = GroupCommitter(pool, interval_s=0.001, max_rows=100)
            await committer.start()
            try:
                cutter.arm(1)
                await committer.submit(chunks)
            finally:
                await committer.close()
                await pool.close()

        asyncio.run(go())
        assert cutter.cuts == 1
    assert db_conn("SELECT count(*) FROM checkins")[0][0] == len(rows)
    assert db_conn("SELECT count(*) FROM scan_inbox")[0][0] == 0
