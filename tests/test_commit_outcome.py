"""How a group commit whose connection was lost learns whether it committed
(services/checkin/commit.py `outcome`), against a real Postgres: by its
transaction's status and its mark (migration 0012). The cases a failover makes:
a transaction id that names another transaction on the new primary (given again
there, because the old primary's WAL for it never reached the standby), and one
that new primary has not reached yet."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from services.checkin.commit import Q, StillCommitting, outcome
from services.kernel import db
from services.kernel.config import Settings


async def _connect(settings: Settings) -> asyncpg.Connection:
    return await asyncpg.connect(**db.connect_args(settings, db.SERVICE_ROLES["checkin"]).kwargs())


async def _marked(conn: asyncpg.Connection, *, commit: bool) -> tuple[int, uuid.UUID]:
    """A transaction marked as a group commit marks itself, committed or rolled back."""
    token = uuid.uuid4()
    tx = conn.transaction()
    await tx.start()
    xid = int(await conn.fetchval(Q["mark_commit"], token))
    await (tx.commit() if commit else tx.rollback())
    return xid, token


def test_a_commit_is_known_by_its_mark_not_by_its_id_alone(settings: Settings) -> None:
    async def go() -> None:
        conn = await _connect(settings)
        other = await _connect(settings)
        try:
            xid, token = await _marked(conn, commit=True)
            assert await outcome(conn, xid, token) == "committed"

            xid, token = await _marked(conn, commit=False)
            assert await outcome(conn, xid, token) == "aborted"

            # The id of a committed transaction that is not this commit (after a
            # failover: the id given again): its status says committed, its mark
            # is not there.
            someone_else, _ = await _marked(conn, commit=True)
            assert (
                await conn.fetchval("SELECT pg_xact_status($1::bigint::text::xid8)", someone_else)
                == "committed"
            )
            assert await outcome(conn, someone_else, uuid.uuid4()) == "aborted"

            # An id the server has not reached: it never ran there.
            future = someone_else + 1_000_000
            assert await outcome(conn, future, uuid.uuid4()) == "aborted"

            # Still running elsewhere: ask again later.
            tx = other.transaction()
            await tx.start()
            running = int(await other.fetchval(Q["mark_commit"], uuid.uuid4()))
            with pytest.raises(StillCommitting):
                await outcome(conn, running, uuid.uuid4())
            await tx.rollback()
        finally:
            await conn.close()
            await other.close()

    asyncio.run(go())


def test_marks_of_settled_commits_are_pruned_and_recent_ones_kept(settings: Settings) -> None:
    async def go() -> None:
        conn = await _connect(settings)
        try:
            old, recent = uuid.uuid4(), uuid.uuid4()
            await conn.execute(
                "INSERT INTO commit_marks (token, made) VALUES ($1, now() - interval '2 hours'),"
                " ($2, now())",
                old,
                recent,
            )
            await conn.execute(Q["prune_commit_marks"])
            left = {r[0] for r in await conn.fetch("SELECT token FROM commit_marks")}
            assert recent in left and old not in left
        finally:
            await conn.close()

    asyncio.run(go())
