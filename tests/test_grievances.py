"""Grievances against a real Retention server and Postgres: filing, routing, due
times, the complainant's view behind a secret, the officers' workflow with its
state rules, and denied-entry appeals that show the level and basis of a denial
but never who caused it."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import uuid

import asyncpg
import pytest
import stopcovid.client as clients
from google.protobuf import timestamp_pb2
from stopcovid.common.v1 import common_pb2
from stopcovid.retention.v1 import retention_service_pb2 as pb

from services.kernel import db, errors
from services.kernel.keys import Sealed
from services.retention import tracking
from tests.support.accountability_helpers import (
    Door,
    deny_entry,
    keystore,
    move_inbox,
    retention,
    set_high_risk,
)
from tests.support.checkin_helpers import add_device, create_venue, enroll, open_stream
from tests.support.database import Query
from tests.support.servers import Servers


def file(
    client: clients.RetentionClient,
    category: pb.GrievanceCategory.ValueType = pb.GRIEVANCE_CATEGORY_PRIVACY,
    request_id: str = "",
    **fields: str,
) -> pb.FileGrievanceResponse:
    reply: pb.FileGrievanceResponse = client.rpc.FileGrievance(
        pb.FileGrievanceRequest(
            grievance=pb.Grievance(
                category=category,
                description=fields.pop("description", "My number was shared with a shop."),
                **fields,  # type: ignore[arg-type]
            ),
            request_id=request_id,
        )
    )
    return reply


def status(
    client: clients.RetentionClient, tracking_id: str, secret: str
) -> pb.GetGrievanceStatusResponse:
    reply: pb.GetGrievanceStatusResponse = client.rpc.GetGrievanceStatus(
        pb.GetGrievanceStatusRequest(tracking_id=tracking_id, secret=secret)
    )
    return reply


def hours_between(a: timestamp_pb2.Timestamp, b: timestamp_pb2.Timestamp) -> float:
    return (b.ToDatetime() - a.ToDatetime()).total_seconds() / 3600


def test_routing_and_due_times(servers: Servers) -> None:
    with retention(servers, "dev-registrar") as front:
        filed = {
            category: file(front, category)
            for category in (
                pb.GRIEVANCE_CATEGORY_MISUSE_OF_DATA,
                pb.GRIEVANCE_CATEGORY_PRIVACY,
                pb.GRIEVANCE_CATEGORY_DENIED_ENTRY,
                pb.GRIEVANCE_CATEGORY_WRONG_DATA,
                pb.GRIEVANCE_CATEGORY_OTHER,
            )
        }
        bodies = {c: r.body for c, r in filed.items()}
        assert bodies == {
            pb.GRIEVANCE_CATEGORY_MISUSE_OF_DATA: pb.GRIEVANCE_BODY_COMMITTEE,
            pb.GRIEVANCE_CATEGORY_PRIVACY: pb.GRIEVANCE_BODY_REGULATOR,
            pb.GRIEVANCE_CATEGORY_DENIED_ENTRY: pb.GRIEVANCE_BODY_COMMITTEE,
            pb.GRIEVANCE_CATEGORY_WRONG_DATA: pb.GRIEVANCE_BODY_MPTC,
            pb.GRIEVANCE_CATEGORY_OTHER: pb.GRIEVANCE_BODY_MPTC,
        }
        for category, days in (
            (pb.GRIEVANCE_CATEGORY_MISUSE_OF_DATA, 30),
            (pb.GRIEVANCE_CATEGORY_PRIVACY, 45),
            (pb.GRIEVANCE_CATEGORY_WRONG_DATA, 30),
        ):
            got = status(front, filed[category].tracking_id, filed[category].secret)
            assert hours_between(got.create_time, got.due_time) == pytest.approx(days * 24)
        for reply in filed.values():
            assert reply.tracking_id.startswith("G-") and len(reply.tracking_id) == 11
            assert len(reply.secret) >= 32
    with retention(servers, "dev-grievance-officer") as officer:
        listed = officer.rpc.ListGrievances(pb.ListGrievancesRequest()).grievances
        # Earliest due first.
        assert [g.due_time.ToDatetime() for g in listed] == sorted(
            g.due_time.ToDatetime() for g in listed
        )
        assert listed[-1].category == pb.GRIEVANCE_CATEGORY_PRIVACY
        regulator = officer.rpc.ListGrievances(
            pb.ListGrievancesRequest(body=pb.GRIEVANCE_BODY_REGULATOR)
        ).grievances
        assert [g.tracking_id for g in regulator] == [
            filed[pb.GRIEVANCE_CATEGORY_PRIVACY].tracking_id
        ]
        first = officer.rpc.ListGrievances(pb.ListGrievancesRequest(page_size=2))
        second = officer.rpc.ListGrievances(
            pb.ListGrievancesRequest(page_size=10, page_token=first.next_page_token)
        )
        assert [g.tracking_id for g in [*first.grievances, *second.grievances]] == [
            g.tracking_id for g in listed
        ]
        assert not second.next_page_token


def test_full_lifecycle(servers: Servers, db_conn: Query) -> None:
    with retention(servers, "dev-registrar") as front:
        filed = file(front, pb.GRIEVANCE_CATEGORY_WRONG_DATA, contact="+85512000900")
        seen = status(front, filed.tracking_id, filed.secret)
        assert seen.state == pb.GRIEVANCE_STATE_OPEN and seen.body == pb.GRIEVANCE_BODY_MPTC
    with retention(servers, "dev-grievance-officer") as officer:
        rpc = officer.rpc
        got = rpc.GetGrievance(pb.GetGrievanceRequest(tracking_id=filed.tracking_id)).grievance
        assert got.contact == "+85512000900" and not got.HasField("denial_context")
        assert got.description == "My number was shared with a shop."
        # The complainant's words and contact are stored encrypted, never in clear.
        (stored,) = db_conn("SELECT g::text AS row FROM grievances g")
        assert "85512000900" not in stored["row"] and "shared with a shop" not in stored["row"]
        assigned = rpc.AssignGrievance(
            pb.AssignGrievanceRequest(tracking_id=filed.tracking_id)
        ).grievance
        assert assigned.state == pb.GRIEVANCE_STATE_IN_PROGRESS
        assert assigned.assignee == "dev-grievance-officer"
        again = rpc.AssignGrievance(pb.AssignGrievanceRequest(tracking_id=filed.tracking_id))
        assert again.grievance.update_time == assigned.update_time  # nothing changed
        rerouted = rpc.AssignGrievance(
            pb.AssignGrievanceRequest(
                tracking_id=filed.tracking_id,
                assignee="officer-7",
                body=pb.GRIEVANCE_BODY_REGULATOR,
            )
        ).grievance
        assert rerouted.assignee == "officer-7" and rerouted.body == pb.GRIEVANCE_BODY_REGULATOR
        assert rerouted.due_time == assigned.due_time
        request_id = str(uuid.uuid4())
        for _ in range(2):
            responded = rpc.RespondToGrievance(
                pb.RespondToGrievanceRequest(
                    tracking_id=filed.tracking_id,
                    message="Please send the date of the visit.",
                    request_id=request_id,
                )
            ).grievance
        assert [r.message for r in responded.responses] == ["Please send the date of the visit."]
        resolve = pb.ResolveGrievanceRequest(
            tracking_id=filed.tracking_id,
            outcome=pb.GRIEVANCE_OUTCOME_UPHELD,
            resolution_summary="The record was corrected.",
        )
        resolved = rpc.ResolveGrievance(resolve).grievance
        assert resolved.state == pb.GRIEVANCE_STATE_RESOLVED
        assert resolved.HasField("resolve_time") and not resolved.overdue
        assert rpc.ResolveGrievance(resolve).grievance.resolve_time == resolved.resolve_time
        with pytest.raises(clients.FailedPrecondition):
            rpc.ResolveGrievance(
                pb.ResolveGrievanceRequest(
                    tracking_id=filed.tracking_id,
                    outcome=pb.GRIEVANCE_OUTCOME_NOT_UPHELD,
                    resolution_summary="Changed my mind.",
                )
            )
        with pytest.raises(clients.FailedPrecondition):
            rpc.RespondToGrievance(
                pb.RespondToGrievanceRequest(tracking_id=filed.tracking_id, message="More?")
            )
        with pytest.raises(clients.FailedPrecondition):
            rpc.AssignGrievance(pb.AssignGrievanceRequest(tracking_id=filed.tracking_id))
        # The retried response (same request_id) still answers after resolution.
        rpc.RespondToGrievance(
            pb.RespondToGrievanceRequest(
                tracking_id=filed.tracking_id, message="ignored", request_id=request_id
            )
        )
    with retention(servers, "dev-registrar") as front:
        seen = status(front, filed.tracking_id, filed.secret)
        assert seen.state == pb.GRIEVANCE_STATE_RESOLVED
        assert seen.outcome == pb.GRIEVANCE_OUTCOME_UPHELD
        assert seen.resolution_summary == "The record was corrected."
        assert [r.message for r in seen.responses] == ["Please send the date of the visit."]
    actions = [
        r["action"].rsplit("/", 1)[-1]
        for r in db_conn("SELECT action FROM audit_events ORDER BY sequence")
    ]
    assert actions == [
        "FileGrievance",
        "AssignGrievance",
        "AssignGrievance",
        "RespondToGrievance",
        "ResolveGrievance",
    ]
    details = db_conn("SELECT details::text AS d FROM audit_events")
    assert not any("+85512000900" in r["d"] for r in details)


def test_overdue_is_flagged_listed_and_cleared_by_resolution(
    servers: Servers, db_conn: Query
) -> None:
    with retention(servers, "dev-registrar") as front:
        late = file(front, pb.GRIEVANCE_CATEGORY_OTHER)
        on_time = file(front, pb.GRIEVANCE_CATEGORY_OTHER)
    db_conn(
        "UPDATE grievances SET due_time = now() - interval '1 hour' WHERE tracking_id = $1",
        late.tracking_id,
    )
    with retention(servers, "dev-grievance-officer") as officer:
        rpc = officer.rpc
        overdue = rpc.ListGrievances(pb.ListGrievancesRequest(overdue_only=True)).grievances
        assert [g.tracking_id for g in overdue] == [late.tracking_id]
        assert overdue[0].overdue
        fine = rpc.GetGrievance(pb.GetGrievanceRequest(tracking_id=on_time.tracking_id))
        assert not fine.grievance.overdue
        resolved = rpc.ResolveGrievance(
            pb.ResolveGrievanceRequest(
                tracking_id=late.tracking_id,
                outcome=pb.GRIEVANCE_OUTCOME_REFERRED,
                resolution_summary="Referred to the police.",
            )
        ).grievance
        assert not resolved.overdue
        assert not rpc.ListGrievances(pb.ListGrievancesRequest(overdue_only=True)).grievances


def test_a_complainant_cannot_read_another_grievance(servers: Servers) -> None:
    with retention(servers, "dev-registrar") as front:
        mine = file(front)
        theirs = file(front)
        assert mine.secret != theirs.secret
        with pytest.raises(clients.NotFound) as wrong_secret:
            status(front, theirs.tracking_id, mine.secret)
        with pytest.raises(clients.NotFound) as unknown:
            status(front, "G-2222-2222", mine.secret)
        with pytest.raises(clients.NotFound) as malformed:
            status(front, "nonsense", mine.secret)
        assert wrong_secret.value.message == unknown.value.message == malformed.value.message
        assert wrong_secret.value.metadata == unknown.value.metadata
        # Case does not matter in a tracking id read over the phone.
        assert status(front, mine.tracking_id.lower(), mine.secret).tracking_id == mine.tracking_id
    with (
        retention(servers, "dev-grievance-officer") as officer,
        pytest.raises(clients.PermissionDenied),
    ):
        officer.rpc.GetGrievanceStatus(
            pb.GetGrievanceStatusRequest(tracking_id=mine.tracking_id, secret=mine.secret)
        )
    with retention(servers, "dev-registrar") as front, pytest.raises(clients.PermissionDenied):
        front.rpc.GetGrievance(pb.GetGrievanceRequest(tracking_id=mine.tracking_id))


def test_filing_is_idempotent_and_validated(servers: Servers, db_conn: Query) -> None:
    request_id = str(uuid.uuid4())
    with retention(servers, "dev-registrar") as front:
        first = file(front, request_id=request_id)
        again = file(front, request_id=request_id)
        assert (again.tracking_id, again.secret) == (first.tracking_id, first.secret)
        assert db_conn("SELECT count(*) FROM grievances")[0][0] == 1
        stored = db_conn("SELECT secret_hash FROM grievances")[0][0]
        assert first.secret.encode() not in bytes(stored)
        for fields, field in (
            ({"category": pb.GRIEVANCE_CATEGORY_UNSPECIFIED}, "grievance.category"),
            ({"description": "   "}, "grievance.description"),
            ({"incident_date": "12/03/2026"}, "grievance.incident_date"),
            ({"venue_id": "not-a-uuid"}, "grievance.venue_id"),
            ({"contact": "x" * 201}, "grievance.contact"),
            (
                {
                    "category": pb.GRIEVANCE_CATEGORY_PRIVACY,
                    "denial_decision_id": str(uuid.uuid4()),
                },
                "grievance.denial_decision_id",
            ),
        ):
            with pytest.raises(clients.InvalidArgument) as caught:
                file(front, **fields)
            assert caught.value.metadata["field"] == field
        with pytest.raises(clients.NotFound) as caught_nf:
            file(front, pb.GRIEVANCE_CATEGORY_DENIED_ENTRY, denial_decision_id=str(uuid.uuid4()))
        assert caught_nf.value.metadata["field"] == "denial_decision_id"
        with pytest.raises(clients.NotFound):
            file(front, venue_id=str(uuid.uuid4()))


def test_an_appeal_shows_level_and_basis_and_nothing_identifying(
    servers: Servers, db_conn: Query
) -> None:
    venue = create_venue(servers, "Night Market")
    contact_venue = create_venue(servers, "Riverside Cafe")
    device = add_device(servers, db_conn, venue)
    person = enroll(servers, "+85512000777")
    case_id = uuid.uuid4()
    set_high_risk(db_conn, person.person_id, contact_venue, "Riverside Cafe")
    door = Door(open_stream(servers, device))
    decision = deny_entry(servers, door, device, person.personal_token.token)
    # The level changes after the denial: the appeal shows the one in force then.
    db_conn(
        "UPDATE risk_status SET level = 'medium', reason = 'venue_contact', rule = 'later rule'"
        " WHERE person_id = $1",
        uuid.UUID(person.person_id),
    )
    with retention(servers, "dev-registrar") as front:
        # Still in the inbox (no worker has moved it yet): the denial is held.
        appeal = file(
            front,
            pb.GRIEVANCE_CATEGORY_DENIED_ENTRY,
            description="I was refused at the market but I tested negative.",
            denial_decision_id=decision,
        )
        assert appeal.body == pb.GRIEVANCE_BODY_COMMITTEE
        seen = status(front, appeal.tracking_id, appeal.secret)
        assert hours_between(seen.create_time, seen.due_time) == pytest.approx(3 * 24)
        move_inbox(db_conn)
        from_store = file(front, pb.GRIEVANCE_CATEGORY_DENIED_ENTRY, denial_decision_id=decision)
    with retention(servers, "dev-grievance-officer") as officer:
        for tracking in (appeal.tracking_id, from_store.tracking_id):
            reply = officer.rpc.GetGrievance(pb.GetGrievanceRequest(tracking_id=tracking))
            context = reply.grievance.denial_context
            assert context.decision_id == decision
            assert context.venue_id == venue
            assert context.risk_level == common_pb2.RISK_LEVEL_HIGH
            assert context.basis.reason == common_pb2.RISK_REASON_VENUE_CONTACT
            assert context.basis.venue_id == contact_venue
            assert context.basis.venue_display_name == "Riverside Cafe"
            assert context.basis.overlap.seconds == 40 * 60
            assert context.basis.rule == "indoor overlap of 15 minutes or more"
            assert context.current_risk_level == common_pb2.RISK_LEVEL_MEDIUM
            age = dt.datetime.now(dt.UTC) - context.decision_time.ToDatetime(dt.UTC)
            assert dt.timedelta(0) <= age < dt.timedelta(minutes=10)
            raw = reply.SerializeToString()
            for secret in (person.person_id, "+85512000777", str(case_id), "85512000777"):
                assert secret.encode() not in raw
            assert uuid.UUID(person.person_id).bytes not in raw
        listed = officer.rpc.ListGrievances(pb.ListGrievancesRequest()).grievances
        assert listed and not any(g.HasField("denial_context") for g in listed)
    db_conn("DELETE FROM risk_status WHERE person_id = $1", uuid.UUID(person.person_id))
    db_conn("DELETE FROM people WHERE person_id = $1", uuid.UUID(person.person_id))
    with retention(servers, "dev-grievance-officer") as officer:
        gone = officer.rpc.GetGrievance(pb.GetGrievanceRequest(tracking_id=appeal.tracking_id))
        context = gone.grievance.denial_context
        assert context.current_risk_level == common_pb2.RISK_LEVEL_UNSPECIFIED
        assert context.risk_level == common_pb2.RISK_LEVEL_HIGH
    stored = db_conn("SELECT * FROM grievances WHERE tracking_id = $1", appeal.tracking_id)[0]
    assert uuid.UUID(person.person_id).bytes not in bytes(stored["person_enc"])
    events = db_conn(
        "SELECT details::text AS d, resource_id FROM audit_events"
        " WHERE action LIKE 'stopcovid.retention.%'"
    )
    assert events
    assert not any(person.person_id in r["d"] + r["resource_id"] for r in events)


def test_grievance_expiry_deletes_only_long_resolved_ones(servers: Servers, db_conn: Query) -> None:
    with retention(servers, "dev-registrar") as front:
        old, recent, open_one = (file(front) for _ in range(3))
    with retention(servers, "dev-grievance-officer") as officer:
        for filed in (old, recent):
            officer.rpc.RespondToGrievance(
                pb.RespondToGrievanceRequest(tracking_id=filed.tracking_id, message="Noted.")
            )
            officer.rpc.ResolveGrievance(
                pb.ResolveGrievanceRequest(
                    tracking_id=filed.tracking_id,
                    outcome=pb.GRIEVANCE_OUTCOME_UPHELD,
                    resolution_summary="Done.",
                )
            )
    db_conn(
        "UPDATE grievances SET resolve_time = now() - interval '400 days',"
        " create_time = now() - interval '401 days' WHERE tracking_id = $1",
        old.tracking_id,
    )
    db_conn(
        "UPDATE grievances SET create_time = now() - interval '500 days' WHERE tracking_id = $1",
        open_one.tracking_id,
    )

    async def expire() -> int:
        conn = await asyncpg.connect(
            **db.connect_args(servers.settings, "stopcovid_worker").kwargs()
        )
        try:
            deleted: int = await conn.fetchval(
                "SELECT expire_grievances_before(now() - interval '365 days')"
            )
            return deleted
        finally:
            await conn.close()

    assert asyncio.run(expire()) == 1
    left = {r["tracking_id"] for r in db_conn("SELECT tracking_id FROM grievances")}
    assert left == {recent.tracking_id, open_one.tracking_id}
    assert db_conn("SELECT count(*) FROM grievance_responses")[0][0] == 1


# -- the seams: tracking ids and secrets, stored ciphertexts --------------------------


def test_tracking_ids_read_over_the_phone() -> None:
    made = {tracking.new_tracking_id() for _ in range(200)}
    assert len(made) == 200
    for found in made:
        assert re.fullmatch(r"G-[23456789ABCDEFGHJKMNPQRSTVWXYZ]{4}-[2-9A-Z]{4}", found)
        assert not set(found) & set("01OILU")
        assert tracking.tracking_id(f"  {found.lower()} ") == found
    assert tracking.cleaned("G-0000-0000") is None  # no such id can exist
    with pytest.raises(errors.NotFound) as unknown:
        tracking.tracking_id("nonsense")
    assert unknown.value.reason == "NOT_FOUND"
    with pytest.raises(errors.InvalidArgument) as empty:
        tracking.tracking_id("   ")
    assert empty.value.field == "tracking_id"


def test_a_secret_is_derived_from_the_key_and_the_grievance() -> None:
    key, other_key = b"k" * 32, b"o" * 32
    one, two = uuid.uuid4(), uuid.uuid4()
    secret = tracking.secret_of(key, one)
    assert secret == tracking.secret_of(key, one) and len(secret) == 36
    assert secret not in {tracking.secret_of(key, two), tracking.secret_of(other_key, one)}
    stored = tracking.secret_hash(secret)
    assert secret.encode() not in stored
    tracking.check_secret(secret, stored)
    for given, held in ((tracking.secret_of(key, two), stored), (secret, None)):
        with pytest.raises(errors.NotFound) as refused:
            tracking.check_secret(given, held)
        assert refused.value.message == tracking.not_found().message


def test_texts_sealed_before_the_sealed_kinds_still_open(servers: Servers, db_conn: Query) -> None:
    """Grievances stored before keys.Sealed wrote their associated data by hand
    (b"grievance-description|" + id, ...): the formats are byte-identical, so they
    open unchanged."""
    with retention(servers, "dev-registrar") as front:
        filed = file(front, pb.GRIEVANCE_CATEGORY_OTHER, contact="+85512000901")
    (row,) = db_conn("SELECT grievance_id, text_key_id FROM grievances")
    ks = keystore(servers.settings)
    key = ks.people_key(row["text_key_id"])
    gid: uuid.UUID = row["grievance_id"]
    db_conn(
        "UPDATE grievances SET description_enc = $2, contact_enc = $3 WHERE grievance_id = $1",
        gid,
        key.encrypt(b"Written the old way.", b"grievance-description|" + gid.bytes),
        key.encrypt(b"+85512000902", b"grievance-contact|" + gid.bytes),
    )
    with retention(servers, "dev-grievance-officer") as officer:
        got = officer.rpc.GetGrievance(pb.GetGrievanceRequest(tracking_id=filed.tracking_id))
    assert (got.grievance.description, got.grievance.contact) == (
        "Written the old way.",
        "+85512000902",
    )
    # An appellant sealed by hand opens as Sealed opens it, and the other way round.
    person = uuid.uuid4().bytes
    by_hand = key.encrypt(person, b"grievance|" + gid.bytes)
    assert Sealed.GRIEVANCE_PERSON.open(key, gid, by_hand) == person
    sealed = Sealed.GRIEVANCE_PERSON.seal(key, gid, person)
    assert key.decrypt(sealed, b"grievance|" + gid.bytes) == person
