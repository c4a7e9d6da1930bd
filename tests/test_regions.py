"""Cambodia's provinces: the table, venues held to it, and figures counted by it."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import pytest
import stopcovid.client as clients
from google.protobuf import field_mask_pb2
from stopcovid.client import VenueClient
from stopcovid.venue.v1 import venue_service_pb2 as vpb

from services.domain.places import regions
from services.ops import setup
from tests.support.accountability_helpers import keystore, report, seed_trace
from tests.support.checkin_helpers import enroll
from tests.support.database import Query
from tests.support.servers import Servers
from tests.support.venue_helpers import venue_client


def test_the_table_is_iso_3166_2_kh() -> None:
    assert [p.code for p in regions.PROVINCES] == [f"KH-{n}" for n in range(1, 26)]
    assert regions.BY_CODE["KH-12"].name_en == "Phnom Penh"
    assert regions.BY_CODE["KH-25"].name_en == "Tboung Khmum"
    assert regions.BY_CODE["KH-25"].name_km == "ត្បូងឃ្មុំ"
    assert len({p.name_en for p in regions.PROVINCES}) == 25
    assert len({p.name_km for p in regions.PROVINCES}) == 25
    for province in regions.PROVINCES:
        assert re.fullmatch(r"[A-Z][a-z]+( [A-Z][a-z]+)*", province.name_en)
        assert all("\u1780" <= c <= "\u17ff" for c in province.name_km), province.code


@pytest.mark.parametrize("code", ["KH-0", "KH-26", "KH-01", "KH", "TH-10", "Phnom Penh", ""])
def test_anything_else_is_refused_with_a_field_violation(code: str) -> None:
    with pytest.raises(Exception) as caught:
        regions.province(code, "venue.region_code")
    assert getattr(caught.value, "field", None) == "venue.region_code"


@pytest.fixture
def venues(servers: Servers) -> Iterator[VenueClient]:
    with venue_client(servers) as client:
        yield client


def _create(venues: VenueClient, region: str, name: str = "Psar Leu") -> vpb.Venue:
    venue = vpb.Venue(display_name=name, setting=vpb.VENUE_SETTING_INDOOR, region_code=region)
    made: vpb.Venue = venues.rpc.CreateVenue(vpb.CreateVenueRequest(venue=venue)).venue
    return made


def _legacy_venue(db_conn: Query, code: str) -> str:
    """A venue as registered before codes were checked (the old pattern let
    any two letters and up to three more through)."""
    venue_id = uuid.uuid4()
    db_conn(
        "INSERT INTO venues (venue_id, display_name, setting, region_code, created_by,"
        " owner_organization) VALUES ($1, 'Old Kiosk', 'indoor', $2, 'dev-venue-operator', $3)",
        venue_id,
        code,
        setup.DEV_ORGANIZATION,  # the operator's own, as tenancy requires
    )
    return str(venue_id)


def test_venues_hold_a_province_and_list_by_it_exactly(venues: VenueClient, db_conn: Query) -> None:
    siem_reap = _create(venues, " kh-17 ")
    assert siem_reap.region_code == "KH-17"  # canonical form stored
    _create(venues, "KH-1")
    for bad in ("KH-26", "KH-01", "TH-10"):
        with pytest.raises(clients.InvalidArgument) as refused:
            _create(venues, bad)
        assert [v[0] for v in refused.value.field_violations] == ["venue.region_code"]
    listed = venues.rpc.ListVenues(vpb.ListVenuesRequest(region_code="kh-17"))
    assert [v.venue_id for v in listed.venues] == [siem_reap.venue_id]  # not KH-1, not KH-17x
    with pytest.raises(clients.InvalidArgument) as unknown:
        venues.rpc.ListVenues(vpb.ListVenuesRequest(region_code="KH-99"))
    assert unknown.value.metadata["field"] == "region_code"
    assert db_conn("SELECT count(*) FROM venues")[0][0] == 2


def test_a_venue_registered_before_codes_were_checked(venues: VenueClient, db_conn: Query) -> None:
    """It keeps working and keeps its stored code (nothing is rewritten or lost),
    but its next update must give it a province."""
    old = _legacy_venue(db_conn, "KH-01")
    got = venues.rpc.GetVenue(vpb.GetVenueRequest(venue_id=old)).venue
    assert got.region_code == "KH-01"
    rename = vpb.UpdateVenueRequest(
        venue=vpb.Venue(venue_id=old, display_name="New Kiosk"),
        update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
    )
    with pytest.raises(clients.InvalidArgument) as refused:
        venues.rpc.UpdateVenue(rename)
    assert refused.value.metadata["field"] == "venue.region_code"
    fixed = venues.rpc.UpdateVenue(
        vpb.UpdateVenueRequest(
            venue=vpb.Venue(venue_id=old, display_name="New Kiosk", region_code="KH-1"),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name", "region_code"]),
        )
    ).venue
    assert (fixed.display_name, fixed.region_code) == ("New Kiosk", "KH-1")


def test_transparency_figures_by_province(
    servers: Servers, venues: VenueClient, db_conn: Query
) -> None:
    siem_reap = _create(venues, "KH-17", "Angkor Night Market").venue_id
    _create(venues, "KH-12", "Central Market")
    legacy = _legacy_venue(db_conn, "KH-99")
    people = [uuid.UUID(enroll(servers, f"+8551200070{i}").person_id) for i in range(5)]
    ks = keystore(servers.settings)
    seed_trace(
        db_conn,
        ks,
        case_person=people[0],
        venue=siem_reap,
        contacts=[(people[1], "sent"), (people[2], "sent")],
    )
    seed_trace(db_conn, ks, case_person=people[3], venue=legacy, contacts=[(people[4], "sent")])
    # Notifications name the venue of their exposure, as the trace workers write them.
    db_conn(
        "UPDATE notifications n SET venue_id = c.venue_id FROM trace_contacts c"
        " WHERE c.trace_id = n.trace_id AND c.contact_ref = n.contact_ref"
    )

    figures = report(servers)
    rows = {
        p.region_code: (p.venue_count, p.contact_count, p.notification_sent_count)
        for p in figures.by_province
    }
    assert [p.region_code for p in figures.by_province] == [
        *(p.code for p in regions.PROVINCES),
        regions.UNKNOWN,
    ]
    assert rows["KH-17"] == (1, 2, 2)
    assert rows["KH-12"] == (1, 0, 0)
    assert rows[regions.UNKNOWN] == (1, 1, 1)
    assert rows["KH-25"] == (0, 0, 0)
    named = {p.region_code: (p.name_en, p.name_km) for p in figures.by_province}
    assert named["KH-17"] == ("Siem Reap", "សៀមរាប")
    assert sum(p.notification_sent_count for p in figures.by_province) == (
        figures.notification_sent_count
    )
    assert sum(p.entry_denial_count for p in figures.by_province) == figures.entry_denial_count
