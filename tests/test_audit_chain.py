"""The hash-chained audit log: gapless sequences filled by the database, listing
with filters and pages, and verification that finds and locates an edited,
deleted or moved entry, and a checkpoint that does not match after expiry_run."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import itertools
import json
import uuid

import asyncpg
import pytest
import stopcovid.client as clients
from stopcovid.common.v1 import auth_pb2, common_pb2
from stopcovid.retention.v1 import retention_service_pb2 as pb

from services.domain.retention import audit_actions, expiry_run
from services.kernel import audit, db
from services.kernel.auth import Principal
from services.kernel.config import Settings
from services.kernel.keys import open_keystore
from services.retention.audit_log import verdict
from services.retention.queries.audit_log import Anchor, ChainCheck, ChainHead
from tests.support.checkin_helpers import config, create_venue
from tests.support.database import Query
from tests.support.servers import Servers
from tests.support.waits import every_page

OFFICER = Principal("officer-1", "ROLE_HEALTH_OFFICIAL", "")
CASE = uuid.UUID("00000000-0000-4000-8000-00000000c0de")


def write_events(settings: Settings, count: int, role: str = "stopcovid_exposure") -> None:
    """`count` audit entries written the way services write them, as a service role."""

    async def go() -> None:
        conn = await asyncpg.connect(**db.connect_args(settings, role).kwargs())
        try:
            for i in range(count):
                await audit.record(
                    conn,
                    "stopcovid.exposure.v1.ExposureService/StartTrace",
                    "traces",
                    str(uuid.UUID(int=i + 1)),
                    {"contacts": i},
                    case_id=CASE if i % 2 else None,
                    principal=OFFICER,
                )
        finally:
            await conn.close()

    asyncio.run(go())


def verify(servers: Servers, start: int = 0, end: int = 0) -> pb.VerifyAuditChainResponse:
    with clients.RetentionClient(config(servers, "retention", "dev-auditor")) as retention:
        reply: pb.VerifyAuditChainResponse = retention.rpc.VerifyAuditChain(
            pb.VerifyAuditChainRequest(start_sequence=start, end_sequence=end)
        )
        return reply


def list_all(servers: Servers, **filters: object) -> list[pb.AuditEvent]:
    events: list[pb.AuditEvent] = []
    with clients.RetentionClient(config(servers, "retention", "dev-auditor")) as retention:
        for page in every_page(
            lambda token: retention.rpc.ListAuditEvents(
                pb.ListAuditEventsRequest(page_size=3, page_token=token, **filters)  # type: ignore[arg-type]
            )
        ):
            events.extend(page.audit_events)
    return events


def test_an_intact_chain_verifies_and_lists_in_order(servers: Servers, db_conn: Query) -> None:
    create_venue(servers)  # one entry through a real RPC
    write_events(servers.settings, 7)
    events = list_all(servers)
    assert [e.sequence for e in events] == list(range(1, 9))
    assert events[0].previous_hash == "00" * 32
    for before, after in itertools.pairwise(events):
        assert after.previous_hash == before.hash
    trace = events[1]
    assert trace.action == "stopcovid.exposure.v1.ExposureService/StartTrace"
    assert trace.principal == "officer-1"
    assert trace.role == auth_pb2.ROLE_HEALTH_OFFICIAL
    assert trace.outcome == pb.AUDIT_OUTCOME_SUCCEEDED
    assert trace.resource == f"traces/{uuid.UUID(int=1)}"
    assert trace.details == {"contacts": "0"}

    reply = verify(servers)
    assert reply.ok and reply.problem == pb.AUDIT_CHAIN_PROBLEM_UNSPECIFIED
    assert reply.checked_count == 8
    assert reply.first_broken_sequence == 0
    assert reply.head_hash == events[-1].hash
    part = verify(servers, start=3, end=5)
    assert part.ok and part.checked_count == 3 and part.head_hash == events[4].hash

    # The digest is SHA-256 over the previous hash and the canonical content.
    row = db_conn("SELECT * FROM audit_events WHERE sequence = 2")[0]
    content = json.loads(
        db_conn(
            "SELECT jsonb_build_array(sequence, (extract(epoch FROM occur_time) * 1000000)::bigint,"
            " principal, role, action, outcome, error_reason, case_id::text, grant_id::text,"
            " resource_type, resource_id, details)::text AS c FROM audit_events WHERE sequence = 2"
        )[0]["c"]
    )
    assert content[0] == 2 and content[2] == "officer-1"
    assert (
        row["hash"]
        == hashlib.sha256(
            bytes(row["previous_hash"])
            + db_conn(
                "SELECT convert_to(jsonb_build_array(sequence,"
                " (extract(epoch FROM occur_time) * 1000000)::bigint, principal, role, action,"
                " outcome, error_reason, case_id::text, grant_id::text, resource_type, resource_id,"
                " details)::text, 'UTF8') AS b FROM audit_events WHERE sequence = 2"
            )[0]["b"]
        ).digest()
    )


def test_filters_and_page_tokens(servers: Servers) -> None:
    create_venue(servers)
    write_events(servers.settings, 6)
    by_case = list_all(servers, case_id=str(CASE))
    assert [e.sequence for e in by_case] == [3, 5, 7]
    assert all(e.case_id == str(CASE) for e in by_case)
    assert [e.action for e in list_all(servers, principal="dev-venue-operator")] == ["venue.create"]
    assert len(list_all(servers, action="stopcovid.exposure.v1.ExposureService/StartTrace")) == 6
    events = list_all(servers)
    window = common_pb2.TimeRange(start_time=events[2].event_time, end_time=events[4].event_time)
    assert [e.sequence for e in list_all(servers, time_range=window)] == [3, 4]
    with clients.RetentionClient(config(servers, "retention", "dev-auditor")) as retention:
        first = retention.rpc.ListAuditEvents(pb.ListAuditEventsRequest(page_size=2))
        with pytest.raises(clients.InvalidArgument) as caught:
            retention.rpc.ListAuditEvents(
                pb.ListAuditEventsRequest(
                    page_size=2, page_token=first.next_page_token, principal="someone"
                )
            )
        assert caught.value.reason == "INVALID_PAGE_TOKEN"
        with (
            pytest.raises(clients.PermissionDenied),
            clients.RetentionClient(
                config(servers, "retention", "dev-grievance-officer")
            ) as officer,
        ):
            officer.rpc.ListAuditEvents(pb.ListAuditEventsRequest())


def test_an_edited_entry_is_detected_and_located(servers: Servers, db_conn: Query) -> None:
    write_events(servers.settings, 6)
    db_conn("""UPDATE audit_events SET details = '{"contacts": 99}' WHERE sequence = 4""")
    reply = verify(servers)
    assert not reply.ok
    assert reply.problem == pb.AUDIT_CHAIN_PROBLEM_CONTENT_MODIFIED
    assert reply.first_broken_sequence == 4
    assert reply.checked_count == 3
    # Editing the time or the principal is an edit too.
    db_conn("""UPDATE audit_events SET details = '{"contacts": 3}' WHERE sequence = 4""")
    assert verify(servers).ok
    db_conn("UPDATE audit_events SET principal = 'someone-else' WHERE sequence = 2")
    assert verify(servers).first_broken_sequence == 2


def test_a_deleted_middle_entry_is_detected_and_located(servers: Servers, db_conn: Query) -> None:
    write_events(servers.settings, 6)
    db_conn("DELETE FROM audit_events WHERE sequence = 3")
    reply = verify(servers)
    assert not reply.ok
    assert reply.problem == pb.AUDIT_CHAIN_PROBLEM_SEQUENCE_GAP
    assert reply.first_broken_sequence == 4
    # Renumbering the rest to hide the gap breaks the link instead.
    db_conn("UPDATE audit_events SET sequence = sequence - 1 WHERE sequence > 3")
    reply = verify(servers)
    assert reply.problem == pb.AUDIT_CHAIN_PROBLEM_LINK_BROKEN
    assert reply.first_broken_sequence == 3


def test_a_deleted_newest_entry_is_detected(servers: Servers, db_conn: Query) -> None:
    write_events(servers.settings, 5)
    db_conn("DELETE FROM audit_events WHERE sequence = 5")
    reply = verify(servers)
    assert not reply.ok
    assert reply.problem == pb.AUDIT_CHAIN_PROBLEM_SEQUENCE_GAP
    assert reply.first_broken_sequence == 5
    assert reply.checked_count == 4


def test_reordered_entries_are_detected(servers: Servers, db_conn: Query) -> None:
    write_events(servers.settings, 6)
    # Swap entries 2 and 5 (everything moves but the position).
    db_conn(
        "UPDATE audit_events SET sequence = CASE sequence WHEN 2 THEN -5 ELSE -2 END"
        " WHERE sequence IN (2, 5)"
    )
    db_conn("UPDATE audit_events SET sequence = -sequence WHERE sequence < 0")
    reply = verify(servers)
    assert not reply.ok
    assert reply.problem == pb.AUDIT_CHAIN_PROBLEM_LINK_BROKEN
    assert reply.first_broken_sequence == 2


def test_swapped_contents_are_detected(servers: Servers, db_conn: Query) -> None:
    write_events(servers.settings, 6)
    db_conn(
        "UPDATE audit_events a SET resource_id = b.resource_id, details = b.details"
        " FROM audit_events b WHERE (a.sequence, b.sequence) IN ((2, 5), (5, 2))"
    )
    reply = verify(servers)
    assert reply.problem == pb.AUDIT_CHAIN_PROBLEM_CONTENT_MODIFIED
    assert reply.first_broken_sequence == 2


def test_sequences_stay_gapless_under_concurrency_and_rollback(settings: Settings) -> None:
    async def go() -> list[int]:
        pool = await asyncpg.create_pool(
            **db.connect_args(settings, "stopcovid_checkin").kwargs(), min_size=4, max_size=4
        )
        assert pool is not None
        try:

            async def one(i: int) -> None:
                async with pool.acquire() as conn:
                    tx = conn.transaction()
                    await tx.start()
                    await audit.record(conn, "person.enroll", "person", str(i), principal=OFFICER)
                    if i % 3 == 0:
                        await tx.rollback()
                    else:
                        await tx.commit()

            await asyncio.gather(*(one(i) for i in range(30)))
            async with pool.acquire() as conn:
                # The service roles cannot read the log; ask as the migrator below.
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.fetch("SELECT sequence FROM audit_events")
        finally:
            await pool.close()
        conn = await asyncpg.connect(**db.connect_args(settings, db.MIGRATOR).kwargs())
        try:
            return [r[0] for r in await conn.fetch("SELECT sequence FROM audit_events ORDER BY 1")]
        finally:
            await conn.close()

    assert asyncio.run(go()) == list(range(1, 21))


def test_an_open_transaction_that_audited_blocks_no_one(settings: Settings) -> None:
    """Entries are linked at commit: a transaction that wrote an audit entry and then
    waits (for a lock, a partition drop, a slow query) holds nothing that other
    audited actions need, so they commit meanwhile, and the chain orders entries by
    commit."""

    async def go() -> list[str]:
        args = db.connect_args(settings, "stopcovid_exposure").kwargs()
        slow, quick = await asyncpg.connect(**args), await asyncpg.connect(**args)
        try:
            tx = slow.transaction()
            await tx.start()
            await audit.record(slow, "slow", "test", "1", principal=OFFICER)
            # Linked at insert, this would wait for `slow` to end, forever.
            await asyncio.wait_for(
                audit.record(quick, "quick", "test", "2", principal=OFFICER), timeout=30
            )
            await tx.commit()
        finally:
            await slow.close()
            await quick.close()
        conn = await asyncpg.connect(**db.connect_args(settings, db.MIGRATOR).kwargs())
        try:
            rows = await conn.fetch("SELECT action FROM audit_events ORDER BY sequence")
            return [r["action"] for r in rows]
        finally:
            await conn.close()

    assert asyncio.run(go()) == ["quick", "slow"]


def test_expiry_keeps_a_checkpoint_and_a_bad_one_is_detected(
    servers: Servers, db_conn: Query
) -> None:
    write_events(servers.settings, 4)
    cutoff = db_conn("SELECT occur_time FROM audit_events WHERE sequence = 3")[0][0]
    write_events(servers.settings, 2)

    async def expire() -> int:
        conn = await asyncpg.connect(
            **db.connect_args(servers.settings, "stopcovid_retention").kwargs()
        )
        try:
            deleted: int = await conn.fetchval("SELECT expire_audit_before($1)", cutoff)
            return deleted
        finally:
            await conn.close()

    assert asyncio.run(expire()) == 2
    assert asyncio.run(expire()) == 0
    reply = verify(servers)
    assert reply.ok and reply.checked_count == 4
    head = db_conn("SELECT checkpoint_sequence FROM audit_chain_head")[0][0]
    assert head == 2
    # A forged checkpoint no longer matches the oldest kept entry's link.
    db_conn("UPDATE audit_chain_head SET checkpoint_hash = sha256('forged')")
    reply = verify(servers)
    assert reply.problem == pb.AUDIT_CHAIN_PROBLEM_CHECKPOINT_MISMATCH
    assert reply.first_broken_sequence == 3


def test_audit_expiry_by_its_retention_class_keeps_the_chain_verifiable(
    servers: Servers, db_conn: Query
) -> None:
    """The AUDIT_EVENTS class as an expiry run deletes it (registered in
    services/domain/retention/expiry_run.py): the old prefix goes, a checkpoint stays, the rest
    still verifies, and the deletion is itself audited and reported."""
    write_events(servers.settings, 6)
    keystore = open_keystore(servers.settings.keystore_dir, servers.settings.secrets_dir)

    async def go() -> expiry_run.ExpiryRun:
        pool = await db.create_pool(servers.settings, db.SERVICE_ROLES["worker"])
        try:
            return await expiry_run.run_expiry(
                pool, keystore, now=dt.datetime.now(dt.UTC) + dt.timedelta(days=731),
                classes=["audit_events"], trigger=expiry_run.SCHEDULED, requester=audit.WORKER,
            )  # fmt: skip
        finally:
            await pool.close()

    (report,) = asyncio.run(go()).reports
    assert (report.data_class, report.row_count) == ("audit_events", 6)
    kept = db_conn("SELECT sequence, action FROM audit_events ORDER BY sequence")
    assert [(r["sequence"], r["action"]) for r in kept] == [
        (7, "worker.expiry.delete_audit_events")
    ]
    assert db_conn("SELECT checkpoint_sequence FROM audit_chain_head")[0][0] == 6
    result = verify(servers)
    assert result.ok and result.checked_count == 1


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_events SET action = 'x'",
        "DELETE FROM audit_events",
        "UPDATE audit_chain_head SET last_sequence = 0",
        "UPDATE audit_events SET sequence = sequence",
    ],
)
def test_service_roles_can_only_append(settings: Settings, statement: str) -> None:
    async def go(role: str) -> None:
        conn = await asyncpg.connect(**db.connect_args(settings, role).kwargs())
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(statement)
        finally:
            await conn.close()

    for role in db.SERVICE_ROLES.values():
        asyncio.run(go(role))


def test_verify_refuses_bad_ranges(servers: Servers) -> None:
    with clients.RetentionClient(config(servers, "retention", "dev-auditor")) as retention:
        with pytest.raises(clients.InvalidArgument) as caught:
            retention.rpc.VerifyAuditChain(
                pb.VerifyAuditChainRequest(start_sequence=5, end_sequence=2)
            )
        assert caught.value.metadata["field"] == "end_sequence"
    empty = verify(servers)
    assert empty.ok and empty.checked_count == 0 and empty.head_hash == "00" * 32


# -- the seams: the verdict on what verify_chain found, the action names ------------

HEAD = ChainHead(
    last_sequence=8, last_hash=b"\x08" * 32, checkpoint_sequence=2, checkpoint_hash=b"\x02" * 32
)
FROM_CHECKPOINT = Anchor(2, b"\x02" * 32, is_checkpoint=True)


def found(
    verified: int, last: int | None, problem: str | None = None, broken: int | None = None
) -> ChainCheck:
    last_hash = None if last is None else bytes([last]) * 32
    return ChainCheck(broken, problem, verified, last_hash, last)


def test_a_range_that_verifies_ends_at_its_last_good_hash() -> None:
    whole = verdict(HEAD, FROM_CHECKPOINT, found(6, 8), end=8)
    assert (whole.ok, whole.checked_count, whole.head_hash) == (True, 6, "08" * 32)
    part = verdict(HEAD, FROM_CHECKPOINT, found(3, 5), end=5)
    assert part.ok and part.head_hash == "05" * 32
    empty = verdict(HEAD, Anchor(8, HEAD.last_hash, is_checkpoint=False), found(0, None), end=8)
    assert empty.ok and empty.checked_count == 0 and empty.head_hash == "08" * 32


def test_the_first_problem_found_is_the_answer() -> None:
    for word, problem in (
        ("gap", pb.AUDIT_CHAIN_PROBLEM_SEQUENCE_GAP),
        ("link", pb.AUDIT_CHAIN_PROBLEM_LINK_BROKEN),
        ("checkpoint", pb.AUDIT_CHAIN_PROBLEM_CHECKPOINT_MISMATCH),
        ("modified", pb.AUDIT_CHAIN_PROBLEM_CONTENT_MODIFIED),
    ):
        reply = verdict(HEAD, FROM_CHECKPOINT, found(2, 4, word, broken=5), end=8)
        assert (reply.ok, reply.problem, reply.first_broken_sequence) == (False, problem, 5)
        assert reply.checked_count == 2 and reply.head_hash == "04" * 32 and reply.detail


def test_what_the_head_remembers_is_checked_too() -> None:
    # The newest entries are gone: the head still counts 8.
    missing = verdict(HEAD, FROM_CHECKPOINT, found(4, 6), end=8)
    assert (missing.ok, missing.problem) == (False, pb.AUDIT_CHAIN_PROBLEM_SEQUENCE_GAP)
    assert missing.first_broken_sequence == 7 and "7 to 8" in missing.detail
    # The newest entry links and hashes, but is not the one the head recorded.
    rewritten_max = dataclasses.replace(found(6, 9), max_sequence=8)
    rewritten = verdict(HEAD, FROM_CHECKPOINT, rewritten_max, end=8)
    assert (rewritten.ok, rewritten.problem) == (False, pb.AUDIT_CHAIN_PROBLEM_CONTENT_MODIFIED)
    assert (rewritten.first_broken_sequence, rewritten.checked_count) == (8, 5)
    # A range that stops before the newest entry is not held to the head's hash.
    assert verdict(HEAD, FROM_CHECKPOINT, found(5, 7), end=7).ok


def test_audit_actions_are_the_full_method_names() -> None:
    assert audit_actions.RUN_EXPIRY == "stopcovid.retention.v1.RetentionService/RunExpiry"
    assert audit_actions.START_TRACE == "stopcovid.exposure.v1.ExposureService/StartTrace"
    assert audit_actions.expiry_step("drop_partition") == "worker.expiry.drop_partition"
    with pytest.raises(KeyError):
        audit_actions.rpc("NoSuchMethod")
