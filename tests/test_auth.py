"""Every RPC of every service: who may call it, proven over real mutual TLS.

The table comes from the protos' `allowed_roles` options, the same source the
servers enforce, and each case below calls the real server through the typed
clients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
import stopcovid.client as clients
from google.protobuf import descriptor as _descriptor
from google.protobuf import message_factory
from stopcovid.client import ClientConfig, RetryPolicy

from services.kernel import auth
from services.ops.setup import SERVICE_DESCRIPTORS, dev_principal
from tests.support.servers import Servers

SERVICE_OF = {
    "CheckInService": ("checkin", clients.CheckInClient),
    "VenueService": ("venue", clients.VenueClient),
    "ExposureService": ("exposure", clients.ExposureClient),
    "RetentionService": ("retention", clients.RetentionClient),
}
TABLE = auth.role_table(SERVICE_DESCRIPTORS.values())
METHODS = [(s, m) for s in SERVICE_DESCRIPTORS.values() for m in s.methods]


def _ids(case: tuple[_descriptor.ServiceDescriptor, _descriptor.MethodDescriptor]) -> str:
    return f"{case[0].name}.{case[1].name}"


def call(
    servers: Servers,
    principal: str | None,
    service: _descriptor.ServiceDescriptor,
    method: _descriptor.MethodDescriptor,
) -> None:
    """Call `method` with an empty request as `principal`; raise what the client raises."""
    key, client_cls = SERVICE_OF[service.name]
    config = replace(
        ClientConfig.from_pki_dir(servers.target(key), servers.pki.dir, principal),
        retry=RetryPolicy(max_attempts=1),  # a refusal is the answer; do not retry it
    )
    request = message_factory.GetMessageClass(method.input_type)()
    with client_cls(config) as client:
        stub_method: Callable[..., Any] = getattr(client.rpc, method.name)
        if method.client_streaming:
            result = stub_method(iter([request]), timeout=5)
        else:
            result = stub_method(request, timeout=5)
        if method.server_streaming:
            list(result)


def test_every_rpc_declares_roles() -> None:
    missing = [path for path, roles in TABLE.items() if not roles]
    assert missing == []
    assert len(TABLE) == len(METHODS) > 20


@pytest.mark.parametrize("case", METHODS, ids=_ids)
def test_wrong_role_is_permission_denied(module_servers: Servers, case: Any) -> None:
    service, method = case
    allowed = TABLE[f"/{service.full_name}/{method.name}"]
    wrong = sorted(auth.ROLE_NAMES - allowed)
    assert wrong, "some role must be refused"
    for role in wrong:
        with pytest.raises(clients.PermissionDenied) as caught:
            call(module_servers, dev_principal(role), service, method)
        assert caught.value.reason == "ROLE_NOT_ALLOWED"
        assert caught.value.metadata["role"] == role


@pytest.mark.parametrize("case", METHODS, ids=_ids)
def test_allowed_role_passes_the_gate(module_servers: Servers, case: Any) -> None:
    """An allowed caller gets past authentication and authorization: whatever the
    empty request earns (a validation error, not found), it is never UNAUTHENTICATED
    or PERMISSION_DENIED for lack of a role, nor INTERNAL or UNKNOWN (a handler that
    crashed would otherwise pass for one past the gate)."""
    service, method = case
    for role in sorted(TABLE[f"/{service.full_name}/{method.name}"]):
        try:
            call(module_servers, dev_principal(role), service, method)
        except (clients.Unauthenticated, clients.PermissionDenied) as err:
            assert err.reason not in ("ROLE_NOT_ALLOWED", "UNAUTHENTICATED"), err
        except (clients.Internal, clients.Unknown) as err:
            pytest.fail(f"{method.name} as {role} failed inside the server: {err!r}")
        except clients.StopCovidError as err:
            assert err.reason is not None, f"{method.name}: no ErrorInfo in {err!r}"


@pytest.mark.parametrize("case", METHODS, ids=_ids)
@pytest.mark.parametrize("principal", ["no-role", "bogus-role"])
def test_certificate_without_valid_role_is_unauthenticated(
    module_servers: Servers, case: Any, principal: str
) -> None:
    service, method = case
    with pytest.raises(clients.Unauthenticated) as caught:
        call(module_servers, principal, service, method)
    assert caught.value.reason == "UNAUTHENTICATED"


@pytest.mark.parametrize("case", METHODS, ids=_ids)
@pytest.mark.parametrize("principal", [None, "foreign"])
def test_no_or_foreign_certificate_never_reaches_a_handler(
    module_servers: Servers, case: Any, principal: str | None
) -> None:
    """Python gRPC servers can require a client certificate or not ask for one; we
    require it, so these callers are refused in the TLS handshake (the client sees
    UNAVAILABLE) and no handler, database or log of theirs ever runs."""
    service, method = case
    with pytest.raises(clients.Unavailable):
        call(module_servers, principal, service, method)


@pytest.fixture
def health_targets(module_servers: Servers) -> Iterator[list[str]]:
    yield [module_servers.target(k) for k in ("checkin", "venue", "exposure", "retention")]


def test_health_is_open_to_any_platform_certificate(
    module_servers: Servers, health_targets: list[str]
) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    creds = module_servers.pki.credentials("dev-device")
    for target in health_targets:
        with grpc.secure_channel(target, creds) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
