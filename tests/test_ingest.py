"""The ingest job against a real Postgres: every acknowledged scan ends up in the
store exactly once, whatever the duplicates, the number of workers, a kill -9 or
a database that drops its connections; partitions and day keys are made ahead.

Rows are synthetic: random ids and random bytes stand in for the pseudonyms and
ciphertexts. Each distinct scan gets its own `person_ref`, shared by its copies,
so "stored exactly once" is checked on the multiset of refs in the store.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from services.domain.checkins import ingest
from services.domain.checkins.inbox import COLUMNS as INBOX_COLUMNS
from services.kernel import db
from services.kernel.config import Settings
from services.kernel.keys import open_keystore
from services.ops import pg, setup
from tests.support.database import Cluster, Query, make_query
from tests.support.fleet import worker_process
from tests.support.servers import process_env
from tests.support.waits import wait_for

COLUMNS = INBOX_COLUMNS

Row = tuple[Any, ...]


def seeded(seed: int) -> random.Random:
    """Reproducible synthetic data (not secrets)."""
    return random.Random(seed)


def today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


@dataclass
class Scans:
    """Distinct synthetic scans, and the rows to put in the inbox (with copies)."""

    distinct: list[Row]
    rows: list[Row]

    def expected_refs(self) -> set[bytes]:
        return {r[9] for r in self.distinct}

    def expected_sequences(self) -> dict[uuid.UUID, int]:
        top: dict[uuid.UUID, int] = {}
        for r in self.distinct:
            if r[2] is not None:
                top[r[2]] = max(top.get(r[2], 0), r[3])
        return top


def make_scans(
    n: int,
    days: list[dt.date],
    *,
    devices: int = 200,
    self_checkin_share: float = 0.02,
    rng: random.Random | None = None,
) -> list[Row]:
    """`n` distinct scans over `days`; a share of them self check-ins (no device)."""
    rng = rng or seeded(7)
    venues = [uuid.UUID(int=rng.getrandbits(128)) for _ in range(20)]
    device_ids = [uuid.UUID(int=rng.getrandbits(128)) for _ in range(devices)]
    next_seq = dict.fromkeys(device_ids, 1)
    now = dt.datetime.now(dt.UTC)
    out: list[Row] = []
    for i in range(n):
        day = days[i % len(days)]
        scan_time = dt.datetime.combine(day, dt.time(12), dt.UTC)
        if rng.random() < self_checkin_share:
            device, seq = None, None
        else:
            device = rng.choice(device_ids)
            seq = next_seq[device]
            next_seq[device] = seq + 1
        out.append(
            (
                day,
                rng.choice(venues),
                device,
                seq,
                scan_time,
                "entry" if i % 2 else "exit",
                "admitted",
                None,
                f"day-{day.isoformat()}",
                rng.randbytes(16),
                rng.randbytes(44),
                now,
            )
        )
    return out


def with_copies(distinct: list[Row], share: float, rng: random.Random | None = None) -> list[Row]:
    """The inbox as a device resending after lost acks fills it: every original, plus
    copies of a `share` of the device scans, half right after the original (same
    batch) and half at the end (another batch)."""
    rng = rng or seeded(11)
    rows: list[Row] = []
    late: list[Row] = []
    for r in distinct:
        rows.append(r)
        if r[2] is not None and rng.random() < share:
            (rows if rng.random() < 0.5 else late).append(r)
    return rows + late


def fill_inbox(settings: Settings, rows: list[Row]) -> None:
    """COPY the rows into the inbox as the migrator (as a CheckIn server would)."""

    async def go() -> None:
        conn = await asyncpg.connect(**db.connect_args(settings, db.MIGRATOR).kwargs())
        try:
            await conn.copy_records_to_table("scan_inbox", records=rows, columns=COLUMNS)
        finally:
            await conn.close()

    asyncio.run(go())


def assert_stored_once(db_conn: Query, scans: Scans) -> None:
    assert db_conn("SELECT count(*) FROM scan_inbox")[0][0] == 0
    refs = [r[0] for r in db_conn("SELECT person_ref FROM checkins")]
    assert len(refs) == len(scans.distinct)
    assert set(refs) == scans.expected_refs()
    nulls = db_conn("SELECT count(*) FROM checkins WHERE device_id IS NULL")[0][0]
    assert nulls == sum(1 for r in scans.distinct if r[2] is None) > 0
    got = {r[0]: r[1] for r in db_conn("SELECT device_id, last_sequence FROM device_sequences")}
    assert got == scans.expected_sequences()


# -- the ingest steps, in this process ------------------------------------------
#
# The steps are asyncio code (services/domain/checkins/ingest.py): they run here,
# on a pool of the worker role, as a worker runs them.


def with_worker_pool(settings: Settings, work: Callable[[asyncpg.Pool], Awaitable[Any]]) -> Any:
    """`work(pool)` on a pool of the worker role, in a fresh event loop."""

    async def go() -> Any:
        pool = await db.create_pool(settings, db.SERVICE_ROLES["worker"])
        try:
            return await work(pool)
        finally:
            await pool.close()

    return asyncio.run(go())


def move_one_batch(settings: Settings) -> dict[str, int]:
    """One `move_batch` of `settings.ingest_batch_rows` rows."""

    async def work(pool: asyncpg.Pool) -> dict[str, int]:
        result = await ingest.move_batch(pool, settings.ingest_batch_rows)
        return {"claimed": result.claimed, "stored": result.stored}

    answer: dict[str, int] = with_worker_pool(settings, work)
    return answer


def days_ahead(settings: Settings) -> dict[str, Any]:
    """One round of `ensure_days_ahead`, with the key store of `settings`."""
    keystore = open_keystore(settings.keystore_dir, settings.secrets_dir)

    async def work(pool: asyncpg.Pool) -> dict[str, Any]:
        done = await ingest.ensure_days_ahead(pool, keystore, settings)
        return {
            "days": [d.isoformat() for d in done.days],
            "keys": {d.isoformat(): k for d, k in done.keys.items()},
            "destroyed": [d.isoformat() for d in done.destroyed],
            "failed": [d.isoformat() for d in done.failed],
            "partitions_created": [d.isoformat() for d in done.partitions_created],
        }

    answer: dict[str, Any] = with_worker_pool(settings, work)
    return answer


def classify() -> dict[str, bool]:
    """`is_missing_partition` on errors made up here."""
    return {
        "missing": ingest.is_missing_partition(
            asyncpg.CheckViolationError('no partition of relation "checkins" found for row')
        ),
        "other_check": ingest.is_missing_partition(
            asyncpg.CheckViolationError('new row for relation "x" violates check constraint')
        ),
        "other_class": ingest.is_missing_partition(
            asyncpg.UniqueViolationError("no partition of relation")
        ),
    }


# -- the worker runtime under trio, in a child process -------------------------
#
# Importing trio-asyncio swaps the event loop policy of the whole process (every
# asyncio loop made afterwards is one of its loops), which would slow and change
# the servers other tests run in this pytest process. So the trio code runs in a
# child: `python -m tests.test_ingest <job> <json>`, configured by the same
# environment as a worker process, answering JSON on stdout.


def in_trio(settings: Settings, job: str, env: dict[str, str] | None = None, **args: Any) -> Any:
    """Run `job` (see `_JOBS`) under trio + trio-asyncio in a child; its JSON answer."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.test_ingest", job, json.dumps(args)],
        env=process_env(settings, **(env or {})),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    sys.stderr.write(done.stderr)  # shown by pytest when a test fails
    return json.loads(done.stdout)


async def _with_pool(settings: Settings, work: Callable[..., Awaitable[Any]]) -> Any:
    import trio_asyncio

    async with trio_asyncio.open_loop():
        pool = await trio_asyncio.aio_as_trio(db.create_pool)(settings, db.SERVICE_ROLES["worker"])
        try:
            return await work(pool)
        finally:
            await trio_asyncio.aio_as_trio(pool.close)()


async def _job_ingest(settings: Settings, until_claimed: int, tasks: int) -> dict[str, Any]:
    """The real ingest loop and LISTEN task, until `until_claimed` rows were moved."""
    import trio

    from services.kernel import channels
    from workers.ingest import IngestJob
    from workers.runtime.listen import listen
    from workers.runtime.loop import ClaimLoop, Shutdown
    from workers.runtime.wakeups import Wakeups

    async def work(pool: Any) -> dict[str, Any]:
        job = IngestJob(settings, pool)
        wakeups = Wakeups([channels.INBOX])
        shutdown = Shutdown()
        loop = ClaimLoop(job, shutdown, wakeup=wakeups[channels.INBOX])
        started = time.perf_counter()
        with shutdown.scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(listen, settings, wakeups)
                for _ in range(tasks):
                    await nursery.start(loop.run)
                with trio.fail_after(120):
                    while job.stats.claimed < until_claimed:  # noqa: ASYNC110 - a test's probe
                        await trio.sleep(0.005)
                shutdown.stop()
        return {
            **job.stats.summary(loop.counters),
            "rows_per_s": round(job.stats.claimed / (time.perf_counter() - started)),
        }

    result: dict[str, Any] = await _with_pool(settings, work)
    return result


async def _job_listen(settings: Settings, probe_s: float) -> dict[str, Any]:
    """The LISTEN task on every channel of a worker: each channel's notification
    arrives; then its backend is stopped (SIGSTOP: the connection stays open and
    answers nothing, as a half-open one does) and the task must replace it on its
    own, after which each channel's notifications arrive again."""
    import functools

    import trio
    import trio_asyncio

    from services.kernel import channels
    from workers.runtime.listen import APPLICATION_NAME, listen
    from workers.runtime.wakeups import Wakeups

    async def work(pool: Any) -> dict[str, Any]:
        async def query(sql: str, *args: Any) -> list[Any]:
            rows: list[Any] = await trio_asyncio.aio_as_trio(pool.fetch)(sql, *args)
            return rows

        async def listeners() -> set[int]:
            found = await query(
                "SELECT pid FROM pg_stat_activity"
                " WHERE application_name = $1 AND datname = current_database()",
                APPLICATION_NAME,
            )
            return {r["pid"] for r in found}

        async def arrives(channel: str) -> None:
            """NOTIFY `channel` until a notification reaches its wake-up (one sent
            while the listener reconnects is lost, as it would be in production)."""
            wakeup = wakeups[channel]
            before = wakeup.notifications
            while wakeup.notifications == before:
                await query("SELECT pg_notify($1, '')", channel)
                await trio.sleep(0.05)

        wakeups = Wakeups(channels.WORKER_POOL)
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(listen, settings, wakeups, probe_s=probe_s))
            with trio.fail_after(60):
                for channel in wakeups.channels:
                    await arrives(channel)
                [first] = await listeners()
                try:
                    os.kill(first, signal.SIGSTOP)
                except (ProcessLookupError, PermissionError):
                    nursery.cancel_scope.cancel()  # a database server elsewhere
                    return {"skipped": "the database's backends are not this machine's"}
                try:
                    for channel in wakeups.channels:
                        await arrives(channel)
                    now = await listeners()
                finally:
                    os.kill(first, signal.SIGCONT)
                    await query("SELECT pg_terminate_backend($1)", first)
            nursery.cancel_scope.cancel()
        return {
            # The stopped backend still shows until it runs again; one other listens.
            "replaced": len(now - {first}) == 1,
            "notifications": {c: wakeups[c].notifications for c in wakeups.channels},
        }

    result: dict[str, Any] = await _with_pool(settings, work)
    return result


_JOBS: dict[str, Callable[..., Awaitable[Any]]] = {
    "ingest": _job_ingest,
    "listen": _job_listen,
}


def _child_main(job: str, raw: str) -> None:
    import trio

    from services.kernel import logging as sc_logging

    sc_logging.configure("info", "json", process="test-ingest")  # stderr; stdout is the answer
    args = json.loads(raw)
    settings = Settings.from_env()
    answer = trio.run(lambda: _JOBS[job](settings, **args))
    print(json.dumps(answer))


def test_ingest_stores_each_distinct_scan_once(settings: Settings, db_conn: Query) -> None:
    """Copies in one batch, copies across batches, copies of scans stored earlier,
    self check-ins, and days with no partition yet (created on the way)."""
    days = [today() - dt.timedelta(days=1), today(), today() - dt.timedelta(days=9)]
    rng = seeded(1)
    first = make_scans(6_000, days, rng=rng)
    rows = with_copies(first, 0.1, rng)
    fill_inbox(settings, rows)
    small = {"STOPCOVID_INGEST_BATCH_ROWS": "1000"}

    stats = in_trio(settings, "ingest", small, until_claimed=len(rows), tasks=2)
    assert stats["claimed"] == len(rows)
    assert stats["stored"] == len(first)
    assert stats["duplicates_dropped"] == len(rows) - len(first)
    assert stats["partition_repairs"] >= 1  # no maintenance ran: every day was missing
    assert_stored_once(db_conn, Scans(first, rows))

    # Scans resent long after they were stored, mixed with new ones.
    second = make_scans(2_000, days, rng=seeded(2))
    resent = rng.sample([r for r in first if r[2] is not None], 500)
    later = second[:1000] + resent + second[1000:]
    fill_inbox(settings, later)
    stats = in_trio(settings, "ingest", small, until_claimed=len(later), tasks=3)
    assert (stats["claimed"], stats["stored"]) == (len(later), len(second))
    assert_stored_once(db_conn, Scans(first + second, rows + later))


def test_one_batch_holding_the_same_scan_twice(settings: Settings, db_conn: Query) -> None:
    """ON CONFLICT DO NOTHING also drops a copy inserted earlier by the same
    statement (only DO UPDATE refuses that), so one claim may hold both."""
    scans = make_scans(50, [today()], self_checkin_share=0.2, rng=seeded(3))
    device_scan = next(r for r in scans if r[2] is not None)
    rows = [device_scan, *scans, device_scan]
    fill_inbox(settings, rows)
    assert move_one_batch(settings) == {"claimed": 52, "stored": 50}
    assert_stored_once(db_conn, Scans(scans, rows))


def test_missing_partition_is_recognised_by_class_and_text() -> None:
    found = classify()
    assert found == {"missing": True, "other_check": False, "other_class": False}


def test_days_ahead_get_partitions_and_keys(
    settings: Settings, db_conn: Query, tmp_path: Path
) -> None:
    own = replace(settings, keystore_override=tmp_path / "keys")
    keystore = open_keystore(own.keystore_dir, own.secrets_dir)
    window = [today() + dt.timedelta(days=n) for n in range(-4, 3)]  # 3 days' scan age + 1
    gone = window[1]
    keystore.destroy_day_key(gone)  # expired early: must never come back
    marked = window[2]  # the database says destroyed, whatever the key store holds
    db_conn("INSERT INTO day_keys (day, key_id, destroy_time) VALUES ($1, 'x', now())", marked)

    result = days_ahead(own)
    assert result["days"] == [d.isoformat() for d in window]
    assert result["destroyed"] == [gone.isoformat()]
    assert result["failed"] == []
    assert not keystore.has_day_key(gone)
    wanted = [d for d in window if d not in (gone, marked)]
    assert result["partitions_created"] == [d.isoformat() for d in wanted]
    partitions = {
        r[0]
        for r in db_conn(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'checkins'::regclass"
        )
    }
    assert partitions == {f"checkins_{d:%Y%m%d}" for d in wanted}
    registered = {r[0]: r[1] for r in db_conn("SELECT day, key_id FROM day_keys")}
    assert gone not in registered
    for d in window:
        if d != gone:
            assert registered[d] == ("x" if d == marked else keystore.day_key(d).key_id)
            assert keystore.has_day_key(d)

    again = days_ahead(own)  # as another process would: nothing new
    assert again["partitions_created"] == []
    assert again["destroyed"] == [gone.isoformat()]


def test_one_listener_wakes_every_channel_and_replaces_a_half_open_one(
    settings: Settings,
) -> None:
    found = in_trio(settings, "listen", probe_s=0.5)
    if "skipped" in found:
        pytest.skip(found["skipped"])
    assert found["replaced"]
    # Each channel's notification arrived on the first connection and on the next.
    assert set(found["notifications"]) == {"stopcovid_inbox", "stopcovid_trace", "stopcovid_notify"}
    assert all(n >= 2 for n in found["notifications"].values())


# -- worker processes -----------------------------------------------------------


def logged(log_file: Path, *events: str) -> int:
    """How many times the worker has logged any of `events` so far."""
    text = log_file.read_text()
    return sum(text.count(f'"{event}"') for event in events)


def inbox_rows(db_conn: Query) -> int:
    count: int = db_conn("SELECT count(*) FROM scan_inbox")[0][0]
    return count


def worker_statements(cluster: Cluster, settings: Settings) -> list[str]:
    """Statements the worker role is executing now in the test's database (read as
    the cluster's admin: only it may see another role's query text)."""

    async def go() -> list[str]:
        conn = await asyncpg.connect(cluster.admin_dsn)
        try:
            rows = await conn.fetch(
                "SELECT query FROM pg_stat_activity "
                "WHERE usename = $1 AND datname = $2 AND state = 'active'",
                db.SERVICE_ROLES["worker"],
                settings.database_name,
            )
            return [r[0] for r in rows]
        finally:
            await conn.close()

    return asyncio.run(go())


def batch_running(cluster: Cluster, settings: Settings) -> bool:
    """An ingest batch is executing (pg_stat_activity keeps the first 1 kB of it)."""
    head = ingest.Q["ingest_batch"][:200]
    return any(q.startswith(head) for q in worker_statements(cluster, settings))


@pytest.fixture
def own_keys(settings: Settings, tmp_path: Path) -> Settings:
    """The test's settings with a key store of its own (the session's is shared)."""
    return replace(settings, keystore_override=tmp_path / "keys")


def test_three_worker_processes_move_each_scan_once(
    own_keys: Settings, db_conn: Query, tmp_path: Path
) -> None:
    days = [today() - dt.timedelta(days=1), today(), today() + dt.timedelta(days=1)]
    distinct = make_scans(190_000, days, devices=2_000, rng=seeded(4))
    rows = with_copies(distinct, 0.053, seeded(5))
    assert len(rows) >= 195_000
    fill_inbox(own_keys, rows)
    env = {"STOPCOVID_INGEST_BATCH_ROWS": "5000", "STOPCOVID_INGEST_WORKERS": "2"}
    logs = [tmp_path / f"worker{i}.log" for i in range(3)]
    with (
        worker_process(own_keys, logs[0], **env) as a,
        worker_process(own_keys, logs[1], **env) as b,
        worker_process(own_keys, logs[2], **env) as c,
    ):
        wait_for(lambda: inbox_rows(db_conn) == 0, timeout=120)
        for proc in (a, b, c):
            proc.send_signal(signal.SIGTERM)
        for proc in (a, b, c):
            assert proc.wait(timeout=15) == 0
    assert_stored_once(db_conn, Scans(distinct, rows))
    summaries = [line for log in logs for line in log.read_text().splitlines() if "claimed" in line]
    assert len(summaries) == 3  # each process said what it moved, in counts only


def test_kill_9_mid_batch_loses_nothing(
    own_keys: Settings, cluster: Cluster, db_conn: Query, tmp_path: Path
) -> None:
    distinct = make_scans(300_000, [today()], devices=3_000, rng=seeded(6))
    rows = with_copies(distinct, 0.02, seeded(7))
    fill_inbox(own_keys, rows)
    big = {"STOPCOVID_INGEST_BATCH_ROWS": "100000", "STOPCOVID_INGEST_WORKERS": "1"}
    with worker_process(own_keys, tmp_path / "killed.log", **big) as proc:
        wait_for(lambda: batch_running(cluster, own_keys), timeout=60)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    assert inbox_rows(db_conn) > 0
    # The orphaned statement either commits whole or rolls back whole; either way
    # the next worker finds the rest.
    wait_for(lambda: not worker_statements(cluster, own_keys), timeout=60)
    with worker_process(own_keys, tmp_path / "next.log") as proc:
        wait_for(lambda: inbox_rows(db_conn) == 0, timeout=120)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    assert_stored_once(db_conn, Scans(distinct, rows))


def test_sigterm_stops_a_worker_cleanly(own_keys: Settings, db_conn: Query, tmp_path: Path) -> None:
    log_file = tmp_path / "worker.log"
    with worker_process(own_keys, log_file) as proc:
        wait_for(lambda: db_conn("SELECT count(*) FROM worker_heartbeats")[0][0] == 1)
        scans = make_scans(100, [today()], rng=seeded(8))
        fill_inbox(own_keys, scans)  # its NOTIFY wakes the worker at once
        wait_for(lambda: db_conn("SELECT count(*) FROM checkins")[0][0] == 100, timeout=30)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    text = log_file.read_text()
    assert '"event": "workers_stopped"' in text
    assert '"event": "ingest_summary"' in text
    assert not any(r[9].hex() in text for r in scans)  # counts only, never rows
    assert db_conn("SELECT count(*) FROM worker_heartbeats")[0][0] == 0


def test_sigterm_mid_batch_finishes_or_rolls_back(
    own_keys: Settings, cluster: Cluster, db_conn: Query, tmp_path: Path
) -> None:
    distinct = make_scans(250_000, [today()], devices=2_000, rng=seeded(9))
    fill_inbox(own_keys, distinct)
    big = {"STOPCOVID_INGEST_BATCH_ROWS": "100000", "STOPCOVID_INGEST_WORKERS": "1"}
    with worker_process(own_keys, tmp_path / "w1.log", **big) as proc:
        wait_for(lambda: batch_running(cluster, own_keys), timeout=60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    stored = db_conn("SELECT count(*) FROM checkins")[0][0]
    assert stored + inbox_rows(db_conn) == len(distinct)
    assert stored % 100_000 == 0  # whole batches only
    with worker_process(own_keys, tmp_path / "w2.log") as proc:
        wait_for(lambda: inbox_rows(db_conn) == 0, timeout=120)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    assert_stored_once(db_conn, Scans(distinct, distinct))


def test_worker_survives_the_database_going_away(
    own_keys: Settings, cluster: Cluster, db_conn: Query, tmp_path: Path
) -> None:
    """Every worker connection is killed and new ones are refused for a while (as
    during a Postgres restart); the worker logs error types, backs off, and
    resumes on its own, LISTEN included."""
    name = own_keys.database_name
    worker = db.SERVICE_ROLES["worker"]

    async def admin(statement: str, kill: bool = False) -> None:
        conn = await asyncpg.connect(cluster.admin_dsn)
        try:
            await conn.execute(statement)
            if not kill:
                return
            await conn.fetch(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE usename = $1 AND datname = $2",
                worker,
                name,
            )
        finally:
            await conn.close()

    log_file = tmp_path / "worker.log"
    first = make_scans(1_000, [today()], rng=seeded(10))
    second = make_scans(1_000, [today()], rng=seeded(11))
    with worker_process(own_keys, log_file) as proc:
        fill_inbox(own_keys, first)
        wait_for(lambda: inbox_rows(db_conn) == 0)
        failed = ("ingest_batch_failed", "ingest_listen_failed")
        failures = logged(log_file, *failed)
        asyncio.run(admin(f'REVOKE CONNECT ON DATABASE "{name}" FROM {worker}', kill=True))
        wait_for(lambda: logged(log_file, *failed) > failures, what="the worker to be refused")
        fill_inbox(own_keys, second)
        assert inbox_rows(db_conn) == len(second)
        asyncio.run(admin(f'GRANT CONNECT ON DATABASE "{name}" TO {worker}'))
        wait_for(lambda: inbox_rows(db_conn) == 0, timeout=30)
        # LISTEN comes back too (its connection was killed with the others) ...
        wait_for(lambda: log_file.read_text().count('"event": "worker_listening"') >= 2, timeout=60)
        # ... and a new COPY is picked up.
        third = make_scans(10, [today()], rng=seeded(12))
        fill_inbox(own_keys, third)
        wait_for(lambda: inbox_rows(db_conn) == 0, timeout=30)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    assert db_conn("SELECT count(*) FROM checkins")[0][0] == 2_010
    text = log_file.read_text()
    assert '"error_type"' in text
    assert "ingest_batch_failed" in text or "worker_listen_failed" in text


def test_worker_survives_a_postgres_restart(settings: Settings, tmp_path: Path) -> None:
    """A cluster of the test's own is stopped under a running worker and started
    again (same port): the worker rides it out and moves what arrives after."""
    cluster = pg.EmbeddedPostgres(tmp_path / "pg")
    cluster.start()
    try:
        own = replace(
            settings,
            database_url=f"postgresql://127.0.0.1:{cluster.port}/",
            database_name="stopcovid_restart",
            keystore_override=tmp_path / "keys",
        )
        asyncio.run(
            setup.prepare_database(own, cluster.superuser_dsn(), setup.ensure_db_passwords(own))
        )
        own_conn = make_query(own)
        log_file = tmp_path / "worker.log"
        before = make_scans(1_000, [today()], rng=seeded(15))
        after = make_scans(1_000, [today()], rng=seeded(16))
        with worker_process(own, log_file) as proc:
            fill_inbox(own, before)
            wait_for(lambda: inbox_rows(own_conn) == 0)
            failures = logged(log_file, "ingest_batch_failed")
            cluster.stop(mode="fast")
            wait_for(
                lambda: logged(log_file, "ingest_batch_failed") > failures,
                what="the worker's calls to fail",
            )
            assert proc.poll() is None
            port = cluster.port
            cluster.start()
            assert cluster.port == port
            fill_inbox(own, after)
            wait_for(lambda: inbox_rows(own_conn) == 0, timeout=60)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0
        assert_stored_once(own_conn, Scans(before + after, before + after))
        assert "ingest_batch_failed" in log_file.read_text()
    finally:
        cluster.stop(mode="fast")


if __name__ == "__main__":
    _child_main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "{}")
