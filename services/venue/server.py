"""The Venue process."""

from stopcovid.venue.v1 import venue_service_pb2, venue_service_pb2_grpc

from services.kernel.server import generated_spec
from services.venue.service import VenueService

SPEC = generated_spec(
    "venue", venue_service_pb2, venue_service_pb2_grpc, "VenueService", VenueService
)
