"""Exactly once under any interleaving: a randomized history against real processes.

Devices stream through two CheckIn server processes while two worker processes move
scans into the store, and a nemesis kills (SIGKILL) servers and workers at random
moments and restarts them. The devices misbehave on purpose
(tests/support/history_driver.py): they reconnect at random, open a second stream
while the first is still open (on the other server), resend scans, reuse numbers
with other content (on other UTC days too), repeat a scan inside one batch, drop
streams with acks pending, and mix in unary CheckIn calls. Every scan sent and
every answer is recorded. At the end every scan that never got an answer is resent
until it gets one, the inbox drains, and the store is checked against the history
(tests/support/history.py).

The run is seeded: the seed is printed, and STOPCOVID_HISTORY_SEED replays the
same choices (the processes' timing still varies). STOPCOVID_HISTORY_SECONDS sets
how long the devices misbehave (default 40; the long mode is 1800), and
STOPCOVID_HISTORY_DEVICES how many there are (default 6).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from pathlib import Path

import pytest

from services.ops.harness import Child
from tests.support.checkin_helpers import add_device, create_venue, enroll
from tests.support.database import Query
from tests.support.fleet import Fleet, fleet, free_port
from tests.support.history import REUSED, History, acked_keys, check, summary
from tests.support.history_driver import Device, Run, stored_scans
from tests.support.servers import Pki, Servers
from tests.support.waits import wait_for

SECONDS = float(os.environ.get("STOPCOVID_HISTORY_SECONDS") or 40)
DEVICES = int(os.environ.get("STOPCOVID_HISTORY_DEVICES") or 6)
PEOPLE = 8

pytestmark = pytest.mark.timeout(int(SECONDS) + 300)


class Nemesis:
    """Kills a random CheckIn server or worker now and then (SIGKILL), and starts it
    again after a moment."""

    def __init__(self, fleet_: Fleet, servers: dict[int, Child], query: Query):
        self.fleet = fleet_
        self.servers = servers
        self.workers: list[Child] = []
        self.query = query
        self.kills: dict[str, int] = {"checkin": 0, "worker": 0}

    async def run(self, rng: random.Random, until: float) -> None:
        while time.monotonic() < until:
            # The fault schedule itself is random timing, not a wait for a condition.
            await asyncio.sleep(rng.uniform(2, 5))
            victims = [("checkin", port) for port in self.servers] + [
                ("worker", i) for i in range(len(self.workers))
            ]
            kind, which = rng.choice(victims)
            proc = self.servers[which] if kind == "checkin" else self.workers[which]
            await asyncio.to_thread(self.fleet.kill, proc)
            self.kills[kind] += 1
            await asyncio.sleep(rng.uniform(0.1, 1.5))
            await asyncio.to_thread(self.restart, kind, which)

    def restart(self, kind: str, which: int) -> None:
        if kind == "checkin":
            self.servers[which] = self.fleet.restart(self.servers[which])
        else:
            self.workers[which] = self.fleet.restart(self.workers[which], self.query)


def test_exactly_once_under_a_random_history_with_kills(
    servers: Servers, db_conn: Query, pki: Pki, tmp_path: Path
) -> None:
    seed = int(os.environ.get("STOPCOVID_HISTORY_SEED") or random.SystemRandom().randrange(2**32))
    print(f"history seed {seed} (replay: STOPCOVID_HISTORY_SEED={seed})")
    rng = random.Random(seed)
    venue = create_venue(servers)
    device_ids = [add_device(servers, db_conn, venue) for _ in range(DEVICES)]
    people = [enroll(servers, f"+8551400{i:04d}") for i in range(PEOPLE)]
    tokens = {p.person_id: p.personal_token.token for p in people}
    # One person at the highest risk level, so entries are DENIED too.
    db_conn(
        "INSERT INTO risk_status (person_id, level, expire_time)"
        " VALUES ($1, 'high', now() + '1 day')",
        uuid.UUID(people[0].person_id),
    )
    history = History()
    ports = [free_port(), free_port()]
    with fleet(servers.settings, tmp_path, STOPCOVID_EXPIRY_INTERVAL_S="0") as f:
        procs = {port: f.server(port) for port in ports}
        nemesis = Nemesis(f, procs, db_conn)
        nemesis.workers = [f.worker(db_conn), f.worker(db_conn)]
        run = Run(pki, ports, tokens, seed, history)
        devices = [Device(d, random.Random(rng.getrandbits(64))) for d in device_ids]

        async def storm() -> None:
            until = time.monotonic() + SECONDS
            await asyncio.gather(
                nemesis.run(random.Random(rng.getrandbits(64)), until),
                *(run.misbehave(d, until) for d in devices),
            )
            for port, proc in list(procs.items()):  # the nemesis may have left one down
                if not proc.alive():
                    await asyncio.to_thread(nemesis.restart, "checkin", port)
            deadline = time.monotonic() + 120
            await asyncio.gather(*(run.resend_unanswered(d, deadline) for d in devices))

        asyncio.run(storm())
        wait_for(
            lambda: db_conn("SELECT count(*) FROM scan_inbox")[0][0] == 0,
            timeout=120,
            what="the workers to drain the inbox",
        )
    stored = stored_scans(servers.settings.keystore_dir, servers.settings.secrets_dir, db_conn)
    problems = check(history, stored)
    acked = acked_keys(history)
    figures = {
        "devices": DEVICES,
        "checkin_servers": len(ports),
        "workers": 2,
        "checkin_kills": nemesis.kills["checkin"],
        "worker_kills": nemesis.kills["worker"],
        "scans_acked_distinct": len(acked),
        "rows_stored": len(stored),
    }
    print("history:", summary(history, figures))
    assert not problems, f"seed {seed}: {len(problems)} violations, first: " + "; ".join(
        problems[:10]
    )
    # The run must have exercised what it claims to, or it proves nothing.
    events = history.events
    for wanted in (
        "answer_ADMITTED",
        "answer_DENIED",
        "answer_DUPLICATE",
        f"answer_{REUSED}",
        "concurrent_streams",
        "stream_ended_STREAM_SUPERSEDED",
    ):
        assert events[wanted] > 0, f"seed {seed}: the history never saw {wanted}"
    assert sum(nemesis.kills.values()) > 0, f"seed {seed}: nothing was killed"
    assert acked <= {key for key, _ in stored}
