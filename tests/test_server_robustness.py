"""Hostile and broken conditions around a real server: oversized messages, more
connections than it holds, a database connection cut under the server, and
processes stopped by signal."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import asyncpg
import grpc
import pytest
import stopcovid.client as clients
from grpc_health.v1 import health_pb2, health_pb2_grpc
from stopcovid.client import ClientConfig, VenueClient
from stopcovid.venue.v1 import venue_service_pb2 as pb

from services.kernel import db, interceptor
from services.kernel.config import Settings
from services.ops.harness import Harness
from tests.support.checkin_helpers import connections_to
from tests.support.database import Cluster, Query
from tests.support.fleet import stop_gracefully, worker_process
from tests.support.servers import Pki, Servers, running_servers
from tests.support.waits import wait_for


def venue_client(servers: Servers) -> VenueClient:
    return VenueClient(
        ClientConfig.from_pki_dir(servers.target("venue"), servers.pki.dir, "dev-venue-operator")
    )


def test_oversized_request_is_refused_and_the_server_keeps_serving(servers: Servers) -> None:
    with venue_client(servers) as client:
        huge = pb.Venue(display_name="x" * (5 * 1024 * 1024))
        with pytest.raises(clients.ResourceExhausted):
            client.rpc.CreateVenue(pb.CreateVenueRequest(venue=huge))
        made = client.rpc.CreateVenue(
            pb.CreateVenueRequest(
                venue=pb.Venue(
                    display_name="Shop", setting=pb.VENUE_SETTING_INDOOR, region_code="KH-12"
                )
            )
        )
        assert made.venue.venue_id


def test_a_server_at_its_connection_bound_closes_the_next_until_one_leaves(
    settings: Settings, pki: Pki
) -> None:
    """STOPCOVID_GRPC_MAX_CONNECTIONS: a connection beyond the bound is closed at once
    (UNAVAILABLE to its caller) while the ones held keep working, and once one of
    them leaves, the newcomer is taken. Each channel has a connection of its own."""
    bounded = replace(settings, grpc_max_connections=2)
    with running_servers(bounded, pki) as servers:
        creds = servers.pki.credentials("dev-device")
        own = [("grpc.use_local_subchannel_pool", 1)]
        first, second, third = (
            grpc.secure_channel(servers.target("venue"), creds, own) for _ in range(3)
        )

        def check(channel: grpc.Channel, wait: bool = False) -> None:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=10, wait_for_ready=wait)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

        try:
            check(first)
            check(second)
            with pytest.raises(grpc.RpcError) as refused:
                check(third)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert len(connections_to(servers.ports["venue"])) == 2
            check(first)
            check(second)
            first.close()
            check(third, wait=True)
            assert len(connections_to(servers.ports["venue"])) == 2
        finally:
            for channel in (first, second, third):
                channel.close()


def test_connections_killed_under_the_server_are_survived(
    servers: Servers, cluster: Cluster
) -> None:
    """Postgres drops every connection of the venue role (as on a failover or a
    restart): the next call fails UNAVAILABLE or is retried by the client, and the
    pool reconnects without a server restart."""
    with venue_client(servers) as client:
        made = client.rpc.CreateVenue(
            pb.CreateVenueRequest(
                venue=pb.Venue(
                    display_name="Shop", setting=pb.VENUE_SETTING_INDOOR, region_code="KH-12"
                )
            )
        ).venue

        async def kill_backends() -> int:
            """Terminate the venue role's backends and wait until they have exited
            (so their goodbye has been sent to the idle pooled connections)."""
            conn = await asyncpg.connect(cluster.admin_dsn)
            try:
                killed: int = await conn.fetchval(
                    "SELECT count(*) FILTER (WHERE gone) FROM (SELECT pg_terminate_backend(pid,"
                    " 10000) AS gone FROM pg_stat_activity WHERE usename = $1 AND datname = $2) t",
                    db.SERVICE_ROLES["venue"],
                    servers.settings.database_name,
                )
                return killed
            finally:
                await conn.close()

        assert asyncio.run(kill_backends()) >= 1
        # GetVenue has no side effects, so the client may retry it on UNAVAILABLE.
        got = client.rpc.GetVenue(pb.GetVenueRequest(venue_id=made.venue_id)).venue
        assert got == made
        assert asyncio.run(kill_backends()) >= 1
        # CreateVenue is not retried: its refusal must be UNAVAILABLE, never INTERNAL,
        # so the caller knows it may retry with the same request_id.
        request = pb.CreateVenueRequest(
            venue=pb.Venue(
                display_name="Other", setting=pb.VENUE_SETTING_OUTDOOR, region_code="KH-12"
            ),
            request_id="5d7e8f00-1111-4222-8333-944455556666",
        )
        try:
            first = client.rpc.CreateVenue(request).venue
        except clients.Unavailable as err:
            assert err.reason == "BACKEND_UNAVAILABLE"
            first = client.rpc.CreateVenue(request).venue
        assert client.rpc.CreateVenue(request).venue == first


def test_worker_pool_beats_and_stops_gracefully(
    servers: Servers, db_conn: Query, tmp_path: Path
) -> None:
    log_file = tmp_path / "workers.log"
    with worker_process(servers.settings, log_file) as proc:
        wait_for(lambda: db_conn("SELECT count(*) FROM worker_heartbeats")[0][0] == 1, timeout=30)
        stop_gracefully(proc)
        err = log_file.read_text()
    assert proc.returncode == 0, err
    assert '"event": "workers_stopped"' in err
    # It said goodbye: no stale heartbeat is left for operators to chase.
    assert db_conn("SELECT count(*) FROM worker_heartbeats")[0][0] == 0


def test_service_process_stops_gracefully_on_sigterm(servers: Servers, tmp_path: Path) -> None:
    with Harness(
        servers.settings, env={"STOPCOVID_LOG_FORMAT": "json"}, log_dir=tmp_path
    ) as processes:
        venue = processes.server("venue", port=0)  # once its health service answers
        proc = venue.proc
        config = ClientConfig.from_pki_dir(
            f"localhost:{venue.port}", servers.pki.dir, "dev-venue-operator"
        )
        with VenueClient(config) as client:
            assert client.rpc.ListVenues(pb.ListVenuesRequest()).venues == []
        stop_gracefully(proc)
        err = venue.log()
    assert proc.returncode == 0, err
    assert '"event": "server_stopped"' in err


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionResetError("peer reset"),
        asyncpg.exceptions.ConnectionDoesNotExistError("closed"),
        asyncpg.exceptions.AdminShutdownError("terminating connection"),
        asyncpg.exceptions.CannotConnectNowError("starting up"),
        asyncpg.exceptions.TooManyConnectionsError("too many"),
        asyncpg.exceptions.InternalClientError("cannot switch to state 11"),
    ],
)
def test_database_going_away_is_unavailable_not_internal(exc: Exception) -> None:
    """Each of these was seen (or is documented) when Postgres restarts or kills a
    backend; the caller must learn it may retry."""
    err = interceptor._to_domain_error(exc)
    assert (err.code, err.reason) == (grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE")
    assert str(exc) not in err.message  # database text never reaches the caller


def test_unexpected_errors_are_internal_without_details() -> None:
    err = interceptor._to_domain_error(KeyError("+85512345678"))
    assert err.code == grpc.StatusCode.INTERNAL
    assert "855" not in err.message
