"""VenueService end to end: typed client -> mutual TLS -> auth -> service -> Postgres."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import stopcovid.client as clients
from google.protobuf import duration_pb2, field_mask_pb2, message_factory
from stopcovid.client import ClientConfig, VenueClient
from stopcovid.venue.v1 import venue_service_pb2 as pb

from services.venue import service
from tests.support.database import Query
from tests.support.servers import Servers
from tests.support.waits import every_page


@pytest.fixture
def venues(servers: Servers) -> Iterator[VenueClient]:
    config = ClientConfig.from_pki_dir(
        servers.target("venue"), servers.pki.dir, "dev-venue-operator"
    )
    with VenueClient(config) as client:
        yield client


def new_venue(**overrides: object) -> pb.Venue:
    fields: dict[str, object] = {
        "display_name": "Central Market",
        "setting": pb.VENUE_SETTING_INDOOR,
        "address": "Street 1, Phnom Penh",
        "region_code": "KH-12",
        "capacity": 300,
    }
    fields.update(overrides)
    return pb.Venue(**fields)  # type: ignore[arg-type]


def create(client: VenueClient, **overrides: object) -> pb.Venue:
    return client.rpc.CreateVenue(pb.CreateVenueRequest(venue=new_venue(**overrides))).venue


def test_create_get_roundtrip_and_defaults(venues: VenueClient, db_conn: Query) -> None:
    created = create(venues)
    assert created.venue_id
    assert created.state == pb.VENUE_STATE_ACTIVE
    assert created.default_stay.ToSeconds() == 3600  # the documented default
    assert created.etag == "1"
    got = venues.rpc.GetVenue(pb.GetVenueRequest(venue_id=created.venue_id)).venue
    assert got == created


def test_create_is_audited_with_principal(venues: VenueClient, db_conn: Query) -> None:
    created = create(venues)
    rows = db_conn("SELECT principal, role, action, resource_id FROM audit_events")
    assert [tuple(r) for r in rows] == [
        ("dev-venue-operator", "ROLE_VENUE_OPERATOR", "venue.create", created.venue_id)
    ]


def test_create_with_request_id_is_idempotent(venues: VenueClient, db_conn: Query) -> None:
    request = pb.CreateVenueRequest(
        venue=new_venue(), request_id="7b0c3c9e-8a36-4c55-9a1f-0d7f1b1f0a11"
    )
    first = venues.rpc.CreateVenue(request).venue
    second = venues.rpc.CreateVenue(request).venue
    assert first == second
    assert db_conn("SELECT count(*) FROM venues")[0][0] == 1


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"display_name": ""}, "venue.display_name"),
        ({"display_name": "x" * 201}, "venue.display_name"),
        ({"display_name": "bad\x00name"}, "venue.display_name"),
        ({"setting": pb.VENUE_SETTING_UNSPECIFIED}, "venue.setting"),
        ({"setting": 99}, "venue.setting"),
        ({"region_code": "Phnom Penh"}, "venue.region_code"),
        ({"capacity": -1}, "venue.capacity"),
        ({"capacity": 1_000_001}, "venue.capacity"),
        ({"address": "a" * 501}, "venue.address"),
        ({"default_stay": duration_pb2.Duration(seconds=60)}, "venue.default_stay"),
        ({"default_stay": duration_pb2.Duration(seconds=13 * 3600)}, "venue.default_stay"),
        ({"default_stay": duration_pb2.Duration(seconds=-600)}, "venue.default_stay"),
    ],
)
def test_create_rejects_bad_input_precisely(
    venues: VenueClient, db_conn: Query, overrides: dict[str, object], field: str
) -> None:
    with pytest.raises(clients.InvalidArgument) as caught:
        create(venues, **overrides)
    # A NUL is refused at the edge, before the handler, by its own reason.
    nul = "\x00" in str(overrides.get("display_name", ""))
    assert caught.value.reason == ("INVALID_CHARACTERS" if nul else "INVALID_ARGUMENT")
    assert caught.value.domain == "stopcovid.gov.kh"
    assert caught.value.metadata["field"] == field
    assert [v[0] for v in caught.value.field_violations] == [field]
    assert db_conn("SELECT count(*) FROM venues")[0][0] == 0


@pytest.mark.parametrize("venue_id", ["", "not-a-uuid", "'; DROP TABLE venues; --"])
def test_get_rejects_malformed_id(venues: VenueClient, venue_id: str) -> None:
    with pytest.raises(clients.InvalidArgument) as caught:
        venues.rpc.GetVenue(pb.GetVenueRequest(venue_id=venue_id))
    assert caught.value.metadata["field"] == "venue_id"


def test_get_unknown_is_not_found(venues: VenueClient) -> None:
    with pytest.raises(clients.NotFound) as caught:
        venues.rpc.GetVenue(pb.GetVenueRequest(venue_id="00000000-0000-4000-8000-000000000000"))
    assert caught.value.reason == "NOT_FOUND"


def test_list_paginates_every_venue_once_in_order(venues: VenueClient) -> None:
    made = [create(venues, display_name=f"Shop {i}").venue_id for i in range(7)]
    seen: list[str] = []
    pages = 0
    for page in every_page(
        lambda token: venues.rpc.ListVenues(pb.ListVenuesRequest(page_size=3, page_token=token))
    ):
        seen += [v.venue_id for v in page.venues]
        pages += 1
    assert seen == made
    assert pages == 3


def test_list_filters_and_refuses_token_from_other_query(venues: VenueClient) -> None:
    create(venues, region_code="KH-12")
    create(venues, region_code="KH-12")
    other = create(venues, region_code="KH-3")
    page = venues.rpc.ListVenues(pb.ListVenuesRequest(region_code="KH-3"))
    assert [v.venue_id for v in page.venues] == [other.venue_id]
    first = venues.rpc.ListVenues(pb.ListVenuesRequest(region_code="KH-12", page_size=1))
    assert first.next_page_token
    with pytest.raises(clients.InvalidArgument) as caught:
        venues.rpc.ListVenues(
            pb.ListVenuesRequest(region_code="KH-3", page_token=first.next_page_token)
        )
    assert caught.value.reason == "INVALID_PAGE_TOKEN"
    for bad in ["garbage!", "e30", "x" * 2000]:
        with pytest.raises(clients.InvalidArgument):
            venues.rpc.ListVenues(pb.ListVenuesRequest(page_token=bad))
    with pytest.raises(clients.InvalidArgument):
        venues.rpc.ListVenues(pb.ListVenuesRequest(page_size=1001))


def test_update_with_mask_and_etag(venues: VenueClient) -> None:
    created = create(venues)
    change = pb.Venue(venue_id=created.venue_id, display_name="Olympic Market", capacity=999)
    updated = venues.rpc.UpdateVenue(
        pb.UpdateVenueRequest(
            venue=change,
            update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
            etag=created.etag,
        )
    ).venue
    assert updated.display_name == "Olympic Market"
    assert updated.capacity == created.capacity  # not in the mask: untouched
    assert updated.etag != created.etag
    with pytest.raises(clients.Aborted) as caught:
        venues.rpc.UpdateVenue(
            pb.UpdateVenueRequest(
                venue=change,
                update_mask=field_mask_pb2.FieldMask(paths=["capacity"]),
                etag=created.etag,  # stale
            )
        )
    assert caught.value.reason == "ETAG_MISMATCH"
    for mask in ([], ["state"], ["venue_id"]):
        with pytest.raises(clients.InvalidArgument) as bad:
            venues.rpc.UpdateVenue(
                pb.UpdateVenueRequest(
                    venue=change, update_mask=field_mask_pb2.FieldMask(paths=mask)
                )
            )
        assert bad.value.metadata["field"] == "update_mask"
    with pytest.raises(clients.InvalidArgument) as invalid:
        venues.rpc.UpdateVenue(
            pb.UpdateVenueRequest(
                venue=pb.Venue(venue_id=created.venue_id, region_code="nowhere"),
                update_mask=field_mask_pb2.FieldMask(paths=["region_code"]),
            )
        )
    assert invalid.value.metadata["field"] == "venue.region_code"


def test_suspend_and_resume_are_idempotent_and_audited(venues: VenueClient, db_conn: Query) -> None:
    created = create(venues)
    with pytest.raises(clients.InvalidArgument):
        venues.rpc.SuspendVenue(pb.SuspendVenueRequest(venue_id=created.venue_id, reason=" "))
    for _ in range(2):
        suspended = venues.rpc.SuspendVenue(
            pb.SuspendVenueRequest(venue_id=created.venue_id, reason="health inspection")
        ).venue
        assert suspended.state == pb.VENUE_STATE_SUSPENDED
        assert suspended.suspend_reason == "health inspection"
    listed = venues.rpc.ListVenues(pb.ListVenuesRequest(state=pb.VENUE_STATE_SUSPENDED))
    assert [v.venue_id for v in listed.venues] == [created.venue_id]
    resumed = venues.rpc.ResumeVenue(pb.ResumeVenueRequest(venue_id=created.venue_id)).venue
    assert resumed.state == pb.VENUE_STATE_ACTIVE
    assert resumed.suspend_reason == ""
    actions = [r[0] for r in db_conn("SELECT action FROM audit_events ORDER BY event_id")]
    assert actions == ["venue.create", "venue.suspend", "venue.resume"]


def test_every_venue_rpc_is_implemented(venues: VenueClient) -> None:
    """No VenueService RPC answers UNIMPLEMENTED any more (devices, codes and posters
    are tested in test_devices.py); an empty request earns a precise refusal, never
    INTERNAL or UNKNOWN (a handler that crashed)."""
    for method in pb.DESCRIPTOR.services_by_name["VenueService"].methods:
        request = message_factory.GetMessageClass(method.input_type)()
        try:
            getattr(venues.rpc, method.name)(request)
        except clients.Unimplemented as err:
            pytest.fail(f"{method.name} is not implemented: {err!r}")
        except (clients.Internal, clients.Unknown) as err:
            pytest.fail(f"{method.name} failed inside the server: {err!r}")
        except clients.StopCovidError:
            pass


def test_async_client_works_too(servers: Servers) -> None:
    import asyncio

    async def go() -> pb.Venue:
        config = ClientConfig.from_pki_dir(
            servers.target("venue"), servers.pki.dir, "dev-venue-operator"
        )
        async with clients.AsyncVenueClient(config) as client:
            made = await client.rpc.CreateVenue(pb.CreateVenueRequest(venue=new_venue()))
            got = await client.rpc.GetVenue(pb.GetVenueRequest(venue_id=made.venue.venue_id))
            with pytest.raises(clients.NotFound):
                await client.rpc.GetVenue(
                    pb.GetVenueRequest(venue_id="00000000-0000-4000-8000-000000000001")
                )
            return got.venue

    assert asyncio.run(go()).display_name == "Central Market"


def test_validated_fields_come_in_query_column_order() -> None:
    """insert_venue and update_venue take the validated values positionally."""
    assert tuple(service._fields(new_venue())) == service.UPDATABLE
