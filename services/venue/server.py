"""The Venue process."""

from stopcovid.venue.v1 import venue_service_pb2, venue_service_pb2_grpc

from services.core.server import ServiceSpec
from services.venue.service import VenueService

SPEC = ServiceSpec(
    name="venue",
    descriptor=venue_service_pb2.DESCRIPTOR.services_by_name["VenueService"],
    add_to_server=venue_service_pb2_grpc.add_VenueServiceServicer_to_server,
    make_servicer=VenueService,
)
