"""Tenancy through real servers, with the certificates of two organisations: each
principal touches only what is its organisation's, refusals are precise and
audited, MPTC staff act on everything and are audited as such, a front-end cannot
tell another front-end's person from nobody, and a request_id is its caller's.
(Enrollment of another organisation's number: test_enrollment_verification.py.)"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import stopcovid.client as clients
from google.protobuf import field_mask_pb2
from stopcovid.checkin.v1 import checkin_service_pb2 as cpb
from stopcovid.common.v1 import common_pb2
from stopcovid.exposure.v1 import exposure_service_pb2 as epb
from stopcovid.retention.v1 import retention_service_pb2 as rpb
from stopcovid.venue.v1 import venue_service_pb2 as vpb

from services.kernel import auth, tenancy
from services.ops import setup
from tests.support.checkin_helpers import config, enroll_as, enroll_request, org_principal
from tests.support.database import Query
from tests.support.servers import Servers
from tests.support.waits import wait_for

VENUE_OPERATOR = "ROLE_VENUE_OPERATOR"
REGISTRAR = "ROLE_REGISTRAR"
UNKNOWN_ID = "00000000-0000-4000-8000-000000000000"


_config = config
_principal = org_principal


def _venues(servers: Servers, stem: str) -> clients.VenueClient:
    return clients.VenueClient(_config(servers, "venue", stem))


def _new_venue(client: clients.VenueClient, name: str, request_id: str = "") -> vpb.Venue:
    venue = vpb.Venue(display_name=name, setting=vpb.VENUE_SETTING_INDOOR, region_code="KH-12")
    made: vpb.Venue = client.rpc.CreateVenue(
        vpb.CreateVenueRequest(venue=venue, request_id=request_id)
    ).venue
    return made


def _refusal(call: Callable[[], Any]) -> clients.StopCovidError:
    with pytest.raises(clients.StopCovidError) as caught:
        call()
    return caught.value


def _denials(db_conn: Query, principal: str) -> list[tuple[str, str, str, str]]:
    rows = db_conn(
        "SELECT action, resource_type, resource_id, error_reason FROM audit_events"
        " WHERE principal = $1 AND outcome = 'denied' ORDER BY sequence",
        principal,
    )
    return [tuple(r) for r in rows]


_SERVICES = {
    "checkin": "CheckIn",
    "venue": "Venue",
    "exposure": "Exposure",
    "retention": "Retention",
}


def _method(service: str, rpc: str) -> str:
    return f"stopcovid.{service}.v1.{_SERVICES[service]}Service/{rpc}"


# -- venues and devices ------------------------------------------------------------


def test_a_venue_operator_cannot_touch_another_organisations_venues_or_devices(
    servers: Servers, db_conn: Query
) -> None:
    """Every venue RPC, tried by organisation B's operator on organisation A's venue
    and device: refused with NOT_YOUR_VENUE or NOT_YOUR_DEVICE (an unknown id stays
    NOT_FOUND), audited, and nothing of A's changes; lists show none of A's."""
    a = _principal(servers, "op-a", VENUE_OPERATOR, "org-a")
    b = _principal(servers, "op-b", VENUE_OPERATOR, "org-b")
    with _venues(servers, a) as ours:
        venue = _new_venue(ours, "Market A")
        made = ours.rpc.RegisterDevice(
            vpb.RegisterDeviceRequest(
                device=vpb.Device(venue_id=venue.venue_id, display_name="Gate")
            )
        )
    device = made.device
    assert (venue.owner_organization, device.owner_organization) == ("org-a", "org-a")

    v, d = venue.venue_id, device.device_id
    renamed = vpb.Venue(venue_id=v, display_name="Taken over")
    attempts: dict[str, tuple[Callable[[clients.VenueClient], Any], str]] = {
        "GetVenue": (lambda c: c.rpc.GetVenue(vpb.GetVenueRequest(venue_id=v)), "NOT_YOUR_VENUE"),
        "UpdateVenue": (
            lambda c: c.rpc.UpdateVenue(
                vpb.UpdateVenueRequest(
                    venue=renamed, update_mask=field_mask_pb2.FieldMask(paths=["display_name"])
                )
            ),
            "NOT_YOUR_VENUE",
        ),
        "SuspendVenue": (
            lambda c: c.rpc.SuspendVenue(vpb.SuspendVenueRequest(venue_id=v, reason="mine now")),
            "NOT_YOUR_VENUE",
        ),
        "ResumeVenue": (
            lambda c: c.rpc.ResumeVenue(vpb.ResumeVenueRequest(venue_id=v)),
            "NOT_YOUR_VENUE",
        ),
        "RegisterDevice": (
            lambda c: c.rpc.RegisterDevice(
                vpb.RegisterDeviceRequest(device=vpb.Device(venue_id=v, display_name="Rogue"))
            ),
            "NOT_YOUR_VENUE",
        ),
        "GetVenueQrCode": (
            lambda c: c.rpc.GetVenueQrCode(vpb.GetVenueQrCodeRequest(venue_id=v)),
            "NOT_YOUR_VENUE",
        ),
        "RenderVenuePoster": (
            lambda c: c.rpc.RenderVenuePoster(
                vpb.RenderVenuePosterRequest(venue_id=v, format=vpb.POSTER_FORMAT_SVG)
            ),
            "NOT_YOUR_VENUE",
        ),
        "GetDevice": (
            lambda c: c.rpc.GetDevice(vpb.GetDeviceRequest(device_id=d)),
            "NOT_YOUR_DEVICE",
        ),
        "RevokeDevice": (
            lambda c: c.rpc.RevokeDevice(vpb.RevokeDeviceRequest(device_id=d, reason="mine now")),
            "NOT_YOUR_DEVICE",
        ),
    }
    with _venues(servers, b) as theirs:
        for rpc, (attempt, reason) in attempts.items():
            err = _refusal(lambda attempt=attempt: attempt(theirs))  # type: ignore[misc]
            assert isinstance(err, clients.PermissionDenied), rpc
            assert err.reason == reason, rpc
            kind = "device" if reason == "NOT_YOUR_DEVICE" else "venue"
            assert err.metadata == {f"{kind}_id": d if kind == "device" else v}, rpc
        # An id nobody has is still NOT_FOUND: the refusal is about ownership.
        missing = _refusal(lambda: theirs.rpc.GetVenue(vpb.GetVenueRequest(venue_id=UNKNOWN_ID)))
        assert isinstance(missing, clients.NotFound)
        missing = _refusal(lambda: theirs.rpc.GetDevice(vpb.GetDeviceRequest(device_id=UNKNOWN_ID)))
        assert isinstance(missing, clients.NotFound)
        # Lists are lists of the caller's own, even filtered by A's venue.
        own = _new_venue(theirs, "Market B")
        listed = theirs.rpc.ListVenues(vpb.ListVenuesRequest(page_size=100)).venues
        assert [x.venue_id for x in listed] == [own.venue_id]
        assert not theirs.rpc.ListDevices(vpb.ListDevicesRequest(venue_id=v)).devices
        assert not theirs.rpc.ListDevices(vpb.ListDevicesRequest()).devices

    with _venues(servers, a) as ours:
        after = ours.rpc.GetVenue(vpb.GetVenueRequest(venue_id=v)).venue
        assert (after.display_name, after.state, after.etag) == (
            "Market A",
            vpb.VENUE_STATE_ACTIVE,
            venue.etag,
        )
        devices = ours.rpc.ListDevices(vpb.ListDevicesRequest(venue_id=v)).devices
        assert [(x.device_id, x.state) for x in devices] == [(d, vpb.DEVICE_STATE_ACTIVE)]
        # A sees its own venue, not B's.
        listed = ours.rpc.ListVenues(vpb.ListVenuesRequest(page_size=100)).venues
        assert [x.venue_id for x in listed] == [v]
    assert db_conn("SELECT count(*) FROM devices WHERE venue_id = $1", uuid.UUID(v))[0][0] == 1

    audited = _denials(db_conn, "op-b")
    expected = {
        (_method("venue", rpc), "device" if reason == "NOT_YOUR_DEVICE" else "venue", reason)
        for rpc, (_, reason) in attempts.items()
    }
    assert {(action, kind, reason) for action, kind, _, reason in audited} == expected
    assert all(rid in (v, d) for _, _, rid, _ in audited)
    assert len(audited) == len(attempts)


def test_mptc_staff_act_on_every_organisations_venues_and_each_act_is_audited_as_such(
    servers: Servers, db_conn: Query
) -> None:
    a = _principal(servers, "op-a", VENUE_OPERATOR, "org-a")
    staff = _principal(servers, "mptc-01", tenancy.MPTC_STAFF, None)
    with _venues(servers, a) as ours:
        venue = _new_venue(ours, "Market A")
    v = venue.venue_id
    with _venues(servers, staff) as mptc:
        assert mptc.rpc.GetVenue(vpb.GetVenueRequest(venue_id=v)).venue.venue_id == v
        suspended = mptc.rpc.SuspendVenue(vpb.SuspendVenueRequest(venue_id=v, reason="audit"))
        assert suspended.venue.state == vpb.VENUE_STATE_SUSPENDED
        mptc.rpc.ResumeVenue(vpb.ResumeVenueRequest(venue_id=v))
        made = mptc.rpc.RegisterDevice(
            vpb.RegisterDeviceRequest(device=vpb.Device(venue_id=v, display_name="Gate"))
        )
        assert made.device.owner_organization == "org-a"  # the venue's, not the MPTC's
        mptc.rpc.GetVenueQrCode(vpb.GetVenueQrCodeRequest(venue_id=v))
        listed = mptc.rpc.ListDevices(vpb.ListDevicesRequest(venue_id=v)).devices
        assert [x.device_id for x in listed] == [made.device.device_id]
        own = _new_venue(mptc, "Ministry kiosk")
        assert own.owner_organization == tenancy.MPTC
    rows = db_conn(
        "SELECT action, resource_id, details FROM audit_events"
        " WHERE principal = 'mptc-01' AND outcome = 'succeeded' ORDER BY sequence"
    )
    acts = [(r["action"], r["resource_id"], json.loads(r["details"])) for r in rows]
    assert all(d["acting_as"] == "mptc_staff" for _, _, d in acts), acts
    owners = {(action, d.get("owner_organization")) for action, _, d in acts}
    assert {
        (_method("venue", "GetVenue"), "org-a"),
        ("venue.suspend", "org-a"),
        ("venue.resume", "org-a"),
        ("device.register", "org-a"),
        (_method("venue", "GetVenueQrCode"), "org-a"),
        ("venue.create", tenancy.MPTC),
    } <= owners
    assert any(
        action == _method("venue", "ListDevices") and d["listed"] == 1 for action, _, d in acts
    )


def test_mptc_staff_hand_a_venue_and_its_devices_to_another_organisation(
    servers: Servers, db_conn: Query
) -> None:
    a = _principal(servers, "op-a", VENUE_OPERATOR, "org-a")
    b = _principal(servers, "op-b", VENUE_OPERATOR, "org-b")
    staff = _principal(servers, "mptc-01", tenancy.MPTC_STAFF, None)
    with _venues(servers, a) as ours:
        venue = _new_venue(ours, "Market A")
        device = ours.rpc.RegisterDevice(
            vpb.RegisterDeviceRequest(
                device=vpb.Device(venue_id=venue.venue_id, display_name="Gate")
            )
        ).device
        move = vpb.TransferVenueRequest(
            venue_id=venue.venue_id, owner_organization="org-b", reason="sold"
        )
        err = _refusal(lambda: ours.rpc.TransferVenue(move))  # only MPTC staff
        assert (type(err), err.reason) == (clients.PermissionDenied, "ROLE_NOT_ALLOWED")
    with _venues(servers, staff) as mptc:
        moved = mptc.rpc.TransferVenue(move).venue
        assert moved.owner_organization == "org-b"
        bad = replace_owner(move, "Org B")
        err = _refusal(lambda: mptc.rpc.TransferVenue(bad))
        assert (type(err), err.field_violations[0][0]) == (
            clients.InvalidArgument,
            "owner_organization",
        )
    with _venues(servers, b) as theirs:
        got = theirs.rpc.GetDevice(vpb.GetDeviceRequest(device_id=device.device_id)).device
        assert got.owner_organization == "org-b"
        theirs.rpc.GetVenue(vpb.GetVenueRequest(venue_id=venue.venue_id))
    with _venues(servers, a) as ours:
        err = _refusal(lambda: ours.rpc.GetVenue(vpb.GetVenueRequest(venue_id=venue.venue_id)))
        assert err.reason == "NOT_YOUR_VENUE"
    (row,) = db_conn(
        "SELECT details FROM audit_events WHERE action = $1",
        _method("venue", "TransferVenue"),
    )
    assert json.loads(row["details"]) == {
        "acting_as": "mptc_staff",
        "owner_organization": "org-a",
        "new_owner_organization": "org-b",
        "reason": "sold",
    }


def replace_owner(request: vpb.TransferVenueRequest, owner: str) -> vpb.TransferVenueRequest:
    changed = vpb.TransferVenueRequest()
    changed.CopyFrom(request)
    changed.owner_organization = owner
    return changed


def test_a_venue_operator_or_front_end_without_an_organisation_is_refused(
    servers: Servers,
) -> None:
    operator = _principal(servers, "op-nobody", VENUE_OPERATOR, None)
    registrar = _principal(servers, "fe-nobody", REGISTRAR, None)  # no organisation
    with _venues(servers, operator) as venues:
        err = _refusal(lambda: venues.rpc.ListVenues(vpb.ListVenuesRequest()))
    assert isinstance(err, clients.PermissionDenied)
    assert err.reason == "ORGANIZATION_REQUIRED"
    with clients.CheckInClient(_config(servers, "checkin", registrar)) as checkin:
        err = _refusal(
            lambda: checkin.rpc.EnrollPerson(
                cpb.EnrollPersonRequest(
                    phone_number="+85511000001", consent_given=True, consent_text_version="v1"
                )
            )
        )
    assert isinstance(err, clients.PermissionDenied)
    assert err.reason == "ORGANIZATION_REQUIRED"


# -- people ----------------------------------------------------------------------------


def _enroll(servers: Servers, stem: str, phone: str, version: str = "v1") -> Any:
    """The two steps, the code read from the file the server sent it to."""
    with clients.CheckInClient(_config(servers, "checkin", stem)) as checkin:
        return enroll_as(
            checkin, servers.settings, enroll_request(phone, consent_text_version=version)
        )


def _ask_code(servers: Servers, stem: str, phone: str, version: str = "v1") -> Any:
    with clients.CheckInClient(_config(servers, "checkin", stem)) as checkin:
        return checkin.rpc.EnrollPerson(enroll_request(phone, consent_text_version=version))


def _person_rpcs(servers: Servers, stem: str) -> dict[str, Callable[[Any], Any]]:
    """Every RPC a front-end may call on a person, by a selector."""

    def token(selector: Any) -> Any:
        with clients.CheckInClient(_config(servers, "checkin", stem)) as c:
            return c.rpc.IssuePersonalToken(
                cpb.IssuePersonalTokenRequest(person=selector, form=cpb.PERSONAL_TOKEN_FORM_STATIC)
            )

    def risk(selector: Any) -> Any:
        with clients.ExposureClient(_config(servers, "exposure", stem)) as c:
            return c.rpc.GetRiskStatus(epb.GetRiskStatusRequest(person=selector))

    def export(selector: Any) -> Any:
        with clients.RetentionClient(_config(servers, "retention", stem)) as c:
            return c.rpc.ExportPersonData(rpb.ExportPersonDataRequest(person=selector))

    def withdraw(selector: Any) -> Any:
        with clients.RetentionClient(_config(servers, "retention", stem)) as c:
            return c.rpc.WithdrawConsent(rpb.WithdrawConsentRequest(person=selector))

    return {
        "IssuePersonalToken": token,
        "GetRiskStatus": risk,
        "ExportPersonData": export,
        "WithdrawConsent": withdraw,
    }


def _answer(err: clients.StopCovidError) -> tuple[Any, ...]:
    return (type(err), err.reason, err.message, dict(err.metadata))


def test_a_front_end_cannot_tell_another_front_ends_person_from_nobody(
    servers: Servers, db_conn: Query
) -> None:
    """Front-end B, naming front-end A's person (a confirmed case) by phone number
    or person id, gets exactly the answer for a number nobody enrolled, on every
    RPC that takes a person; each refusal is audited. EnrollPerson of A's number
    returns nothing of A's person and changes nothing."""
    a = _principal(servers, "fe-a", REGISTRAR, "org-a")
    b = _principal(servers, "fe-b", REGISTRAR, "org-b")
    phone, nobody = "+85512000001", "+85512000002"
    enrolled = _enroll(servers, a, phone)
    official = setup.dev_principal("ROLE_HEALTH_OFFICIAL")
    with clients.ExposureClient(_config(servers, "exposure", official)) as exposure:
        exposure.rpc.ReportCase(
            epb.ReportCaseRequest(
                person=common_pb2.PersonSelector(phone_number=phone),
                case=epb.Case(test_date=dt.date.today().isoformat(), external_reference="LAB-1"),
            )
        )

    theirs = _person_rpcs(servers, b)
    for rpc, call in theirs.items():
        for selector, unknown in (
            (
                common_pb2.PersonSelector(phone_number=phone),
                common_pb2.PersonSelector(phone_number=nobody),
            ),
            (
                common_pb2.PersonSelector(person_id=enrolled.person_id),
                common_pb2.PersonSelector(person_id=str(uuid.uuid4())),
            ),
        ):
            refused = _refusal(lambda call=call, selector=selector: call(selector))  # type: ignore[misc]
            absent = _refusal(lambda call=call, unknown=unknown: call(unknown))  # type: ignore[misc]
            assert isinstance(refused, clients.NotFound), rpc
            assert _answer(refused) == _answer(absent), rpc

    # EnrollPerson of A's number, without the code only the person gets: a code
    # sent, as for any number (tests/test_enrollment_verification.py compares the
    # answers), nothing of A's person returned and nothing changed.
    asked = _ask_code(servers, b, phone, version="v2")
    assert asked.state == cpb.ENROLLMENT_STATE_CODE_SENT
    assert not asked.person_id and not asked.HasField("personal_token")
    (row,) = db_conn("SELECT enrolled_by, consent_text_version FROM people")
    assert tuple(row) == ("org-a", "v1")
    assert not db_conn("SELECT 1 FROM person_organizations")

    audited = _denials(db_conn, "fe-b")
    for rpc in theirs:
        service = (
            "checkin"
            if rpc == "IssuePersonalToken"
            else ("exposure" if rpc == "GetRiskStatus" else "retention")
        )
        # Twice each (by phone, by id); a number nobody enrolled costs the same audit
        # write, under its own reason, so the time of the answer says nothing either.
        assert audited.count((_method(service, rpc), "person", "", "NOT_YOUR_PERSON")) == 2, rpc
        assert audited.count((_method(service, rpc), "person", "", "NOT_FOUND")) == 2, rpc
    assert len(audited) == 4 * len(theirs)

    # A, whose person it is, is answered; the case shows as HIGH.
    ours = _person_rpcs(servers, a)
    status = ours["GetRiskStatus"](common_pb2.PersonSelector(phone_number=phone))
    assert status.risk_status.level == common_pb2.RISK_LEVEL_HIGH


def test_the_persons_own_token_is_the_proof_that_opens_any_front_end(
    servers: Servers, db_conn: Query
) -> None:
    """Through front-end B, a person of front-end A names themself by their
    personal token: the export and the withdrawal go through."""
    a = _principal(servers, "fe-a", REGISTRAR, "org-a")
    b = _principal(servers, "fe-b", REGISTRAR, "org-b")
    phone = "+85512000003"
    enrolled = _enroll(servers, a, phone)
    proof = common_pb2.PersonSelector(personal_token=enrolled.personal_token.token)
    theirs = _person_rpcs(servers, b)
    assert theirs["IssuePersonalToken"](proof).personal_tokens
    assert theirs["GetRiskStatus"](proof).risk_status.level == common_pb2.RISK_LEVEL_NONE
    exported = theirs["ExportPersonData"](proof)
    assert (exported.enrollment.person_id, exported.enrollment.phone_number) == (
        enrolled.person_id,
        phone,
    )
    theirs["WithdrawConsent"](proof)
    assert db_conn("SELECT count(*) FROM people")[0][0] == 0
    assert not _denials(db_conn, "fe-b")


# -- request_id ------------------------------------------------------------------------


def test_a_request_id_reused_by_another_principal_never_returns_the_first_callers_result(
    servers: Servers, db_conn: Query
) -> None:
    rid = str(uuid.uuid4())
    a = _principal(servers, "op-a", VENUE_OPERATOR, "org-a")
    a_twin = _principal(servers, "op-a2", VENUE_OPERATOR, "org-a")
    b = _principal(servers, "op-b", VENUE_OPERATOR, "org-b")
    with _venues(servers, a) as first:
        venue_a = _new_venue(first, "Market A", rid)
        assert _new_venue(first, "Market A", rid).venue_id == venue_a.venue_id  # a retry
    for other, owner in ((b, "org-b"), (a_twin, "org-a")):
        with _venues(servers, other) as second:
            venue = _new_venue(second, "Someone else's", rid)
        assert venue.venue_id != venue_a.venue_id
        assert (venue.display_name, venue.owner_organization) == ("Someone else's", owner)

    fe_a = _principal(servers, "fe-a", REGISTRAR, "org-a")
    fe_b = _principal(servers, "fe-b", REGISTRAR, "org-b")
    grievance = rpb.Grievance(
        category=rpb.GRIEVANCE_CATEGORY_PRIVACY, description="My data was shared."
    )

    def file(stem: str) -> rpb.FileGrievanceResponse:
        with clients.RetentionClient(_config(servers, "retention", stem)) as retention:
            filed: rpb.FileGrievanceResponse = retention.rpc.FileGrievance(
                rpb.FileGrievanceRequest(grievance=grievance, request_id=rid)
            )
            return filed

    filed_a = file(fe_a)
    assert (file(fe_a).tracking_id, file(fe_a).secret) == (filed_a.tracking_id, filed_a.secret)
    filed_b = file(fe_b)
    assert filed_b.tracking_id != filed_a.tracking_id
    assert filed_b.secret != filed_a.secret
    assert db_conn("SELECT count(*) FROM grievances")[0][0] == 2

    official = setup.dev_principal("ROLE_HEALTH_OFFICIAL")
    colleague = _principal(servers, "moh-02", "ROLE_HEALTH_OFFICIAL", None)
    people = [_enroll(servers, fe_a, f"+8551200001{i}") for i in range(2)]

    def report(stem: str, person_id: str) -> epb.Case:
        with clients.ExposureClient(_config(servers, "exposure", stem)) as exposure:
            case: epb.Case = exposure.rpc.ReportCase(
                epb.ReportCaseRequest(
                    person=common_pb2.PersonSelector(person_id=person_id),
                    case=epb.Case(
                        test_date=dt.date.today().isoformat(), external_reference="LAB-2"
                    ),
                    request_id=rid,
                )
            ).case
            return case

    case_a = report(official, people[0].person_id)
    case_b = report(colleague, people[1].person_id)
    assert case_a.case_id != case_b.case_id
    assert report(official, people[0].person_id).case_id == case_a.case_id


def test_exposure_request_ids_are_each_officials_own(servers: Servers) -> None:
    """An access request and a trace made under one official's request_id are never
    another official's answer under the same id."""
    rid = str(uuid.uuid4())
    fe = _principal(servers, "fe-a", REGISTRAR, "org-a")
    officials = [
        setup.dev_principal("ROLE_HEALTH_OFFICIAL"),
        _principal(servers, "moh-02", "ROLE_HEALTH_OFFICIAL", None),
    ]
    approver = setup.dev_principal("ROLE_APPROVER")
    made: list[tuple[str, str, str]] = []
    for i, official in enumerate(officials):
        person = _enroll(servers, fe, f"+8551200003{i}")
        with clients.ExposureClient(_config(servers, "exposure", official)) as exposure:
            case = exposure.rpc.ReportCase(
                epb.ReportCaseRequest(
                    person=common_pb2.PersonSelector(person_id=person.person_id),
                    case=epb.Case(test_date=dt.date.today().isoformat(), external_reference="L"),
                )
            ).case
            asked = epb.CreateAccessRequestRequest(
                access_request=epb.AccessRequest(
                    case_id=case.case_id,
                    outbreak_reference="PP-2021-04-12",
                    justification="Cluster at a market; contacts must be warned today.",
                ),
                request_id=rid,
            )
            access = exposure.rpc.CreateAccessRequest(asked).access_request
            assert exposure.rpc.CreateAccessRequest(asked).access_request == access  # a retry
        with clients.ExposureClient(_config(servers, "exposure", approver)) as exposure:
            grant = exposure.rpc.ApproveAccessRequest(
                epb.ApproveAccessRequestRequest(
                    access_request_id=access.access_request_id, comment="approved"
                )
            ).access_request.grant
        with clients.ExposureClient(_config(servers, "exposure", official)) as exposure:
            trace = exposure.rpc.StartTrace(
                epb.StartTraceRequest(case_id=case.case_id, grant_id=grant.grant_id, request_id=rid)
            ).trace
        assert (access.case_id, trace.case_id) == (case.case_id, case.case_id)
        made.append((case.case_id, access.access_request_id, trace.trace_id))
    first, second = made
    assert all(x != y for x, y in zip(first, second, strict=True))


def test_a_self_check_in_request_id_reused_by_another_front_end_gets_its_own_decision(
    servers: Servers,
) -> None:
    """Front-end A's request_id answered a denial (a confirmed case at the door);
    front-end B's call with the same id for someone else is decided afresh."""
    rid = str(uuid.uuid4())
    fe_a = _principal(servers, "fe-a", REGISTRAR, "org-a")
    fe_b = _principal(servers, "fe-b", REGISTRAR, "org-b")
    case = _enroll(servers, fe_a, "+85512000021")
    healthy = _enroll(servers, fe_b, "+85512000022")
    with _venues(servers, _principal(servers, "op-a", VENUE_OPERATOR, "org-a")) as venues:
        venue = _new_venue(venues, "Market A")
        code = venues.rpc.GetVenueQrCode(vpb.GetVenueQrCodeRequest(venue_id=venue.venue_id))
    official = setup.dev_principal("ROLE_HEALTH_OFFICIAL")
    with clients.ExposureClient(_config(servers, "exposure", official)) as exposure:
        exposure.rpc.ReportCase(
            epb.ReportCaseRequest(
                person=common_pb2.PersonSelector(person_id=case.person_id),
                case=epb.Case(test_date=dt.date.today().isoformat(), external_reference="LAB-3"),
            )
        )

    def check_in(stem: str, token: str, request_id: str) -> cpb.ScanResult:
        with clients.CheckInClient(_config(servers, "checkin", stem)) as checkin:
            request = cpb.SelfCheckInRequest(
                venue_code=code.payload,
                personal_token=token,
                direction=common_pb2.SCAN_DIRECTION_ENTRY,
                request_id=request_id,
            )
            request.scan_time.GetCurrentTime()
            result: cpb.ScanResult = checkin.rpc.SelfCheckIn(request).result
            return result

    token = case.personal_token.token
    wait_for(
        lambda: check_in(fe_a, token, "").outcome == cpb.SCAN_OUTCOME_DENIED,
        what="the CheckIn server to hear of the case",
    )
    denied = check_in(fe_a, token, rid)
    assert denied.outcome == cpb.SCAN_OUTCOME_DENIED and denied.decision_id
    assert check_in(fe_a, token, rid).decision_id == denied.decision_id  # a retry
    theirs = check_in(fe_b, healthy.personal_token.token, rid)
    assert theirs.outcome == cpb.SCAN_OUTCOME_ADMITTED
    assert not theirs.decision_id


# -- the role table and tenancy --------------------------------------------------------

# Every RPC a scoped role may call, and how this module tests its tenancy.
TENANCY_TESTED = {
    **{
        f"/stopcovid.venue.v1.VenueService/{rpc}": "cross-organisation venue or device"
        for rpc in (
            "CreateVenue",
            "GetVenue",
            "ListVenues",
            "UpdateVenue",
            "SuspendVenue",
            "ResumeVenue",
            "RegisterDevice",
            "GetDevice",
            "ListDevices",
            "RevokeDevice",
            "GetVenueQrCode",
            "RenderVenuePoster",
        )
    },
    "/stopcovid.checkin.v1.CheckInService/EnrollPerson": (
        "another organisation's number: a code, as for any (test_enrollment_verification.py)"
    ),
    "/stopcovid.checkin.v1.CheckInService/IssuePersonalToken": "another organisation's person",
    "/stopcovid.checkin.v1.CheckInService/SelfCheckIn": "request_id reuse; the token is the proof",
    "/stopcovid.exposure.v1.ExposureService/GetRiskStatus": "another organisation's person",
    "/stopcovid.retention.v1.RetentionService/ExportPersonData": "another organisation's person",
    "/stopcovid.retention.v1.RetentionService/WithdrawConsent": "another organisation's person",
    "/stopcovid.retention.v1.RetentionService/FileGrievance": "request_id reuse",
    # The tracking id and secret are the complainant's proof; counts name nobody.
    "/stopcovid.retention.v1.RetentionService/GetGrievanceStatus": "the secret is the proof",
    "/stopcovid.retention.v1.RetentionService/GetTransparencyReport": "counts only",
}


def test_every_rpc_a_scoped_role_may_call_has_its_tenancy_tested() -> None:
    """A new RPC for venue operators or front-ends fails here until its tenancy is
    decided and tested above."""
    table = auth.role_table(setup.SERVICE_DESCRIPTORS.values())
    scoped = {method for method, roles in table.items() if roles & tenancy.SCOPED_ROLES}
    assert scoped == set(TENANCY_TESTED)
    # MPTC staff may do whatever a venue operator may, on every organisation's venues.
    for method, roles in table.items():
        if VENUE_OPERATOR in roles:
            assert tenancy.MPTC_STAFF in roles, method
