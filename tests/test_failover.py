"""A failover that loses nothing: the exactly-once history against the HA topology.

A highly available Postgres (services/ops/ha.py: three etcd members, two Patroni
nodes, a synchronous standby) serves two CheckIn server processes, two worker
processes and the other servers; devices misbehave as in tests/test_history.py,
reaching both CheckIn servers through one round-robin target (as the device SDK
does). While they stream, in turn:

1. the primary's node dies (SIGKILL of Patroni and its Postgres): the standby is
   promoted, every process finds it by itself, and the old node is started again
   and rejoins as the synchronous standby;
2. a CheckIn server is killed (its devices go on through the other) and started again;
3. a worker is killed and started again;
4. an etcd member is killed (the other two keep the quorum; the primary stays) and
   started again.

Then every scan without an answer is resent until it has one, the inbox drains,
and the store is checked against the history: every acknowledged scan stored
exactly once, with its content. Both CheckIn servers hear the new primary's
notifications (a risk set there is denied at the door), traces and notifications
run on the new primary, and expiry destroys a day's key there. The time from the
primary's death to the next acknowledged scan and the scans acknowledged per second
through the failover are printed.

A group commit whose connection was lost while the primary died is settled on
the promoted standby by its transaction's status and its mark (services/checkin/
commit.py, migration 0012): checked here directly for a transaction committed on
the old primary and one that was still open there, whose id the new primary may
have given to another transaction since.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import random
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import asyncpg
import pytest
from stopcovid.checkin.v1 import checkin_service_pb2 as pb
from stopcovid.exposure.v1 import exposure_service_pb2 as epb

from services.checkin.commit import Q as COMMIT_QUERIES
from services.checkin.commit import outcome
from services.kernel.config import Settings
from services.ops import setup
from services.ops.ha import HaPostgres
from services.ops.harness import Child
from tests.support import exposure_helpers as ex
from tests.support.checkin_helpers import add_device, create_venue, enroll
from tests.support.database import Query, make_query
from tests.support.expiry_helpers import days_ago, own_keystore, seed_days
from tests.support.expiry_helpers import run as run_expiry
from tests.support.fleet import Fleet, fleet, free_port
from tests.support.history import History, acked_keys, check, summary
from tests.support.history_driver import Device, Run, Scanned, stored_scans
from tests.support.servers import Pki, Servers, running_servers
from tests.support.trace_helpers import entry_decision, finished_trace, small_scenario
from tests.support.waits import wait_for

DEVICES = 4
PEOPLE = 6
STEP_ACKS = 150
"""Scans acknowledged between one fault and the next: each fault meets a stream."""

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def ha(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HaPostgres]:
    cluster = HaPostgres(tmp_path_factory.mktemp("ha"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def ha_settings(session_settings: Settings, ha: HaPostgres) -> Settings:
    """The session's state (keys, PKI, role passwords) on a database of the HA cluster."""
    settings = replace(
        session_settings,
        database_url=ha.dsn(),
        database_name=f"stopcovid_ha_{uuid.uuid4().hex[:8]}",
    )
    passwords = setup.ensure_db_passwords(settings)
    asyncio.run(setup.prepare_database(settings, ha.superuser_dsn(), passwords))
    return settings


class TimedRun(Run):
    """The history's devices, also noting when each answer arrived."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.answered: list[tuple[float, int]] = []
        self.balanced = True

    def record(
        self, device: Device, scans: list[Scanned], results: list[pb.ScanResult], via: str
    ) -> None:
        super().record(device, scans, results, via)
        self.answered.append((time.monotonic(), len(results)))

    def answers(self) -> int:
        return sum(n for _, n in self.answered)

    def first_answer_after(self, moment: float) -> float | None:
        return next((at for at, _ in self.answered if at > moment), None)

    def rate(self, start: float, end: float) -> float:
        scans = sum(n for at, n in self.answered if start <= at <= end)
        return scans / max(end - start, 1e-9)


ANSWERS_TIMEOUT_S = 120.0


async def _answers_grow(run: TimedRun, more: int) -> None:
    """Until `more` further scans have been answered."""
    target = run.answers() + more
    deadline = time.monotonic() + ANSWERS_TIMEOUT_S
    while run.answers() < target:
        assert time.monotonic() < deadline, f"answers stalled at {run.answers()} of {target}"
        await asyncio.sleep(0.05)


class Faults:
    """The four faults in turn, each once the devices got answers since the last."""

    def __init__(self, ha: HaPostgres, f: Fleet, servers: dict[int, Child], query: Query):
        self.ha, self.fleet, self.servers, self.query = ha, f, servers, query
        self.workers: list[Child] = []
        self.figures: dict[str, float] = {}
        self.killed: list[str] = []

    async def run(self, run: TimedRun, probe_dsn: str, marked: Marked) -> None:
        ha = self.ha
        await _answers_grow(run, 4 * STEP_ACKS)  # long enough for a rate before the kill

        old = ha.node(ha.primary() or "")
        probes, holding = await _transactions_on(probe_dsn)
        marked.update(probes)
        killed_at = time.monotonic()
        await asyncio.to_thread(ha.kill_node, old)
        holding.terminate()
        self.killed.append("primary")
        new = await asyncio.to_thread(ha.wait_primary, time.monotonic() + 90, not_on=old.name)
        promoted_at = time.monotonic()
        await _answers_grow(run, 1)
        answered_at = run.first_answer_after(promoted_at) or time.monotonic()
        ha.start_node(old)
        await asyncio.to_thread(ha.wait_healthy, time.monotonic() + 120)
        healthy_at = time.monotonic()
        assert ha.primary() == new and ha.sync_standby() == old.name
        self.figures |= {
            "seconds_to_promotion": promoted_at - killed_at,
            "seconds_to_first_ack": answered_at - killed_at,
            "seconds_to_sync_standby_again": healthy_at - killed_at,
            "acked_per_s_before": run.rate(run.answered[0][0], killed_at),
            "acked_per_s_kill_to_sync_again": run.rate(killed_at, healthy_at),
        }

        await _answers_grow(run, STEP_ACKS)
        port = next(iter(self.servers))
        await asyncio.to_thread(self.fleet.kill, self.servers[port])
        self.killed.append("checkin")
        await _answers_grow(run, STEP_ACKS)  # through the other server alone
        self.servers[port] = await asyncio.to_thread(self.fleet.restart, self.servers[port])

        await asyncio.to_thread(self.fleet.kill, self.workers[0])
        self.killed.append("worker")
        await _answers_grow(run, STEP_ACKS)
        self.workers[0] = await asyncio.to_thread(self.fleet.restart, self.workers[0], self.query)

        member = ha.etcd[0]
        await asyncio.to_thread(ha.kill_etcd, member)
        self.killed.append("etcd")
        await _answers_grow(run, STEP_ACKS)
        # Patroni's REST API may be slow to answer while its etcd client moves on from
        # the dead member: ask until it does.
        primary = await asyncio.to_thread(ha.wait_primary, time.monotonic() + 60)
        assert primary == new, "losing one etcd member of three must not move the primary"
        ha.start_etcd(member)
        await _answers_grow(run, STEP_ACKS)


Marked = dict[str, tuple[int, uuid.UUID]]
"""A probe transaction's name -> its id and mark, as a group commit writes them."""


async def _transactions_on(dsn: str) -> tuple[Marked, asyncpg.Connection]:
    """On the primary, about to die: one transaction committed (with a synchronous
    standby, so the standby has it) and one still open, each marked as a group
    commit marks itself; the connection holding the open one."""
    conn = await asyncpg.connect(dsn)
    marked: Marked = {}
    async with conn.transaction():
        token = uuid.uuid4()
        marked["committed"] = (
            int(await conn.fetchval(COMMIT_QUERIES["mark_commit"], token)),
            token,
        )
    tx = conn.transaction()
    await tx.start()
    token = uuid.uuid4()
    marked["open"] = (int(await conn.fetchval(COMMIT_QUERIES["mark_commit"], token)), token)
    return marked, conn


async def _outcomes_on(dsn: str, marked: Marked) -> dict[str, str]:
    conn = await asyncpg.connect(dsn)
    try:
        found = {name: await outcome(conn, xid, token) for name, (xid, token) in marked.items()}
        # For the record: what the transaction id alone says of the open one on the
        # new primary (another transaction's status, when the id was given again).
        try:
            by_id = await conn.fetchval(
                "SELECT pg_xact_status($1::bigint::text::xid8)", marked["open"][0]
            )
        except asyncpg.InvalidParameterValueError:
            by_id = "unknown (in the future)"
        print(f"the open transaction's id alone, on the new primary: {by_id}")
        return found
    finally:
        await conn.close()


def test_a_failover_and_kills_lose_no_acknowledged_scan(
    ha: HaPostgres, ha_settings: Settings, pki: Pki, tmp_path: Path
) -> None:
    seed = int(os.environ.get("STOPCOVID_HISTORY_SEED") or random.SystemRandom().randrange(2**32))
    print(f"failover history seed {seed} (replay: STOPCOVID_HISTORY_SEED={seed})")
    rng = random.Random(seed)
    db_conn = make_query(ha_settings)
    notifications = tmp_path / "sms.jsonl"
    with running_servers(ha_settings, pki) as servers:
        venue = create_venue(servers)
        device_ids = [add_device(servers, db_conn, venue) for _ in range(DEVICES)]
        people = [enroll(servers, f"+8551500{i:04d}") for i in range(PEOPLE)]
        tokens = {p.person_id: p.personal_token.token for p in people}
        history = History()
        ports = [free_port(), free_port()]
        with fleet(
            ha_settings,
            tmp_path,
            STOPCOVID_EXPIRY_INTERVAL_S="0",
            STOPCOVID_CACHE_REFRESH_S="3600",
            STOPCOVID_NOTIFY_FILE=str(notifications),
        ) as f:
            procs = {port: f.server(port) for port in ports}
            faults = Faults(ha, f, procs, db_conn)
            faults.workers = [f.worker(db_conn), f.worker(db_conn)]
            run = TimedRun(pki, ports, tokens, seed, history)
            devices = [Device(d, random.Random(rng.getrandbits(64))) for d in device_ids]
            marked: Marked = {}
            probe_dsn = ha.superuser_dsn(ha_settings.database_name)

            async def storm() -> None:
                streaming = [
                    asyncio.create_task(run.misbehave(d, time.monotonic() + 500)) for d in devices
                ]
                try:
                    await faults.run(run, probe_dsn, marked)
                finally:
                    for task in streaming:
                        task.cancel()
                    await asyncio.gather(*streaming, return_exceptions=True)
                deadline = time.monotonic() + 120
                await asyncio.gather(*(run.resend_unanswered(d, deadline) for d in devices))

            asyncio.run(storm())
            wait_for(
                lambda: db_conn("SELECT count(*) FROM scan_inbox")[0][0] == 0,
                timeout=120,
                what="the workers to drain the inbox",
            )
            stored = stored_scans(ha_settings.keystore_dir, ha_settings.secrets_dir, db_conn)
            problems = check(history, stored)
            acked = acked_keys(history)
            figures = {
                "scans_acked_distinct": len(acked),
                "rows_stored": len(stored),
                **{name: round(value, 1) for name, value in faults.figures.items()},
            }
            print("failover:", summary(history, figures))  # type: ignore[arg-type]
            assert not problems, f"seed {seed}: {len(problems)} violations, first: " + "; ".join(
                problems[:10]
            )
            assert acked <= {key for key, _ in stored}
            assert faults.killed == ["primary", "checkin", "worker", "etcd"]
            assert history.events["answer_ADMITTED"] > 0
            assert history.events["answer_DENIED"] == 0  # nobody is at risk here

            # The promoted standby settles an ambiguous commit of the old primary.
            outcomes = asyncio.run(_outcomes_on(probe_dsn, marked))
            assert outcomes == {"committed": "committed", "open": "aborted"}

            # The CheckIn servers' caches follow the new primary's notifications (their
            # full reload is an hour away): someone set at the highest risk there is
            # denied at the door by both, the one that lived through the failover too.
            at_risk = people[1]
            db_conn(
                "INSERT INTO risk_status (person_id, level, expire_time)"
                " VALUES ($1, 'high', now() + '1 day')",
                uuid.UUID(at_risk.person_id),
            )
            for port in ports:
                door = replace(servers, ports={**servers.ports, "checkin": port})

                def denied(door: Servers = door) -> bool:
                    decision = entry_decision(door, device_ids[0], at_risk.personal_token.token)
                    return decision == pb.SCAN_OUTCOME_DENIED

                wait_for(denied, timeout=30, what=f"the server on {port} to hear of the risk")

            # Traces and notifications on the new primary.
            s = small_scenario(servers, db_conn, "301")
            started = ex.start_trace(servers, s.case_id, s.grant_id)
            trace = finished_trace(servers, started.trace_id)
            assert trace.state == epb.TRACE_STATE_SUCCEEDED, trace.error_message
            assert trace.contacts_found == 2

            def sent() -> int:
                if not notifications.exists():
                    return 0
                lines = notifications.read_text().splitlines()
                return len({json.loads(line)["notification_id"] for line in lines if line})

            wait_for(lambda: sent() == 2, timeout=60, what="both contacts to be notified")

    # Expiry on the new primary destroys the day's key.
    expiring, keystore = own_keystore(ha_settings, tmp_path)
    old_day = days_ago(40)
    seed_days(db_conn, keystore, [old_day])
    run_expiry(expiring, keystore, now=dt.datetime.now(dt.UTC))
    assert not keystore.has_day_key(old_day)
    destroyed = db_conn("SELECT day FROM day_keys WHERE destroy_time IS NOT NULL")
    assert old_day in {r[0] for r in destroyed}
