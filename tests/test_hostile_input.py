"""Malformed and hostile requests get a precise refusal and never an INTERNAL error.

Hypothesis generates arbitrary venues (any text, any numbers, any enum values,
any durations) and arbitrary bytes where a request message should be."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
import stopcovid.client as clients
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stopcovid.client import ClientConfig, VenueClient
from stopcovid.venue.v1 import venue_service_pb2 as pb

from tests.support.servers import Servers

INT32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
venues = st.builds(
    pb.Venue,
    display_name=st.text(max_size=300),
    setting=INT32,
    address=st.text(max_size=600),
    region_code=st.one_of(st.text(max_size=20), st.from_regex(r"KH-[0-9]{1,2}", fullmatch=True)),
    capacity=INT32,
)


@pytest.fixture(scope="module")
def operator(module_servers: Servers) -> Iterator[VenueClient]:
    config = ClientConfig.from_pki_dir(
        module_servers.target("venue"), module_servers.pki.dir, "dev-venue-operator"
    )
    with VenueClient(config) as client:
        yield client


@given(venue=venues, stay=st.one_of(st.none(), st.integers(-(10**12), 10**12)))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_venue_is_created_or_refused_precisely(
    operator: VenueClient, venue: pb.Venue, stay: int | None
) -> None:
    if stay is not None:
        venue.default_stay.seconds = stay
    try:
        made = operator.rpc.CreateVenue(pb.CreateVenueRequest(venue=venue)).venue
    except clients.InvalidArgument as err:
        assert err.reason == "INVALID_ARGUMENT"
        assert err.metadata["field"].startswith("venue.")
        return
    # Accepted: it reads back exactly as stored, cleaned of surrounding blanks.
    got = operator.rpc.GetVenue(pb.GetVenueRequest(venue_id=made.venue_id)).venue
    assert got == made
    assert made.display_name == venue.display_name.strip()


@given(payload=st.binary(max_size=2048))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_arbitrary_bytes_never_cause_an_internal_error(
    operator: VenueClient, payload: bytes
) -> None:
    raw: grpc.UnaryUnaryMultiCallable[bytes, pb.GetVenueResponse] = operator.channel.unary_unary(
        "/stopcovid.venue.v1.VenueService/GetVenue",
        request_serializer=None,
        response_deserializer=pb.GetVenueResponse.FromString,
    )
    try:
        raw(payload, timeout=10)
    except grpc.RpcError as rpc_err:
        err = clients.from_rpc_error(rpc_err)
        assert isinstance(err, clients.InvalidArgument | clients.NotFound), err
        assert err.reason in ("INVALID_ARGUMENT", "NOT_FOUND")


def test_unparseable_request_is_invalid_argument_not_internal(operator: VenueClient) -> None:
    raw: grpc.UnaryUnaryMultiCallable[bytes, bytes] = operator.channel.unary_unary(
        "/stopcovid.venue.v1.VenueService/GetVenue", request_serializer=None
    )
    with pytest.raises(grpc.RpcError) as caught:
        raw(b"\x0a\xff\xff\xff", timeout=10)  # a field whose length never ends
    err = clients.from_rpc_error(caught.value)
    assert isinstance(err, clients.InvalidArgument)
    assert err.message == "the request is not a valid GetVenue request message"


def test_unparseable_request_from_a_wrong_role_is_still_permission_denied(
    module_servers: Servers,
) -> None:
    config = ClientConfig.from_pki_dir(
        module_servers.target("venue"), module_servers.pki.dir, "dev-device"
    )
    with VenueClient(config) as device:
        raw: grpc.UnaryUnaryMultiCallable[bytes, bytes] = device.channel.unary_unary(
            "/stopcovid.venue.v1.VenueService/GetVenue", request_serializer=None
        )
        with pytest.raises(grpc.RpcError) as caught:
            raw(b"\x0a\xff\xff\xff", timeout=10)
    assert isinstance(clients.from_rpc_error(caught.value), clients.PermissionDenied)
