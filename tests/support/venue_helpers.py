"""A Venue client for the venue operator and a venue made through it, for the tests
of venues, devices, posters and provinces."""

from __future__ import annotations

from stopcovid.client import ClientConfig, VenueClient
from stopcovid.venue.v1 import venue_service_pb2 as pb

from tests.support.servers import Servers


def venue_client(servers: Servers) -> VenueClient:
    return VenueClient(
        ClientConfig.from_pki_dir(servers.target("venue"), servers.pki.dir, "dev-venue-operator")
    )


def create_venue(client: VenueClient, name: str = "Central Market") -> pb.Venue:
    venue = pb.Venue(display_name=name, setting=pb.VENUE_SETTING_INDOOR, region_code="KH-12")
    return client.rpc.CreateVenue(pb.CreateVenueRequest(venue=venue)).venue
