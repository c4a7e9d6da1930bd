"""The API under a hostile client, from its descriptors: for every RPC of the four
services and every role allowed to call it (the role table in the protos), hypothesis
sends structurally valid but hostile requests (tests/support/fuzz.py) to the real
servers, and some no typed client could send (invalid UTF-8, arbitrary bytes).

Whatever it sends: no answer is INTERNAL or UNKNOWN, nothing is logged at error
level, the server keeps serving, and the audit log stays readable page by page.

A bounded number of examples per RPC and role runs with the suite (about a minute
in all); STOPCOVID_FUZZ_EXAMPLES=N runs N each (the long mode, for example 2000).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import structlog
from google.protobuf.descriptor import MethodDescriptor
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from stopcovid.retention.v1 import retention_service_pb2 as rpb

from services.kernel import auth
from services.kernel.config import Settings
from services.ops.setup import SERVICE_DESCRIPTORS, dev_principal, role_slug
from tests.support import fuzz
from tests.support.checkin_helpers import add_device, create_venue
from tests.support.database import Cluster, fresh_database, make_query
from tests.support.raw_calls import Caller, caller
from tests.support.servers import Pki, Servers, running_servers

EXAMPLES = int(os.environ.get("STOPCOVID_FUZZ_EXAMPLES", "24"))
NEVER = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
TIMEOUT_S = 20.0


@dataclass(frozen=True)
class Target:
    service: str
    method: MethodDescriptor
    role: str

    def __str__(self) -> str:
        return f"{self.method.name}-{role_slug(self.role)}"


def _targets() -> list[Target]:
    table = auth.role_table(SERVICE_DESCRIPTORS.values())
    found = []
    for service, descriptor in SERVICE_DESCRIPTORS.items():
        for method in descriptor.methods:
            path = f"/{descriptor.full_name}/{method.name}"
            found += [Target(service, method, role) for role in sorted(table[path])]
    return found


TARGETS = _targets()


@dataclass
class World:
    servers: Servers
    calls: Caller
    device: str
    logged: list[MutableMapping[str, Any]]

    def principal(self, role: str) -> str:
        return self.device if role == "ROLE_DEVICE" else dev_principal(role)

    def errors(self) -> list[str]:
        return [
            f"{e['event']} {e.get('rpc', '')} {e.get('error_type', '')}"
            for e in self.logged
            if e.get("log_level") in ("error", "critical")
        ]


@pytest.fixture(scope="module")
def world(
    session_settings: Settings, template_db: str, cluster: Cluster, pki: Pki
) -> Iterator[World]:
    """The four servers on a database of their own (the fuzzer writes), with one
    venue and its device, and every server's log captured."""
    with (
        fresh_database(session_settings, template_db, cluster) as fresh,
        running_servers(fresh, pki) as servers,
        caller(servers) as calls,
        structlog.testing.capture_logs() as logged,
    ):
        venue = create_venue(servers)
        device = add_device(servers, make_query(fresh), venue)
        yield World(servers, calls, device, logged)


def _serving(world: World, service: str) -> bool:
    health = health_pb2.DESCRIPTOR.services_by_name["Health"].methods_by_name["Check"]
    got = world.calls.call(
        service, dev_principal("ROLE_AUDITOR"), health, health_pb2.HealthCheckRequest()
    )
    return got.code is grpc.StatusCode.OK


@pytest.mark.parametrize("target", TARGETS, ids=str)
def test_no_hostile_request_reaches_internal(world: World, target: Target) -> None:
    principal = world.principal(target.role)
    request_type = target.method.input_type

    @hypothesis_settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        first=fuzz.wire(request_type),
        more=st.lists(fuzz.wire(request_type), max_size=2)
        if target.method.client_streaming
        else st.just([]),
    )
    def hostile(first: bytes, more: list[bytes]) -> None:
        got = world.calls.call(
            target.service,
            principal,
            target.method,
            first,
            stream=list(more),
            timeout=TIMEOUT_S,
        )
        assert got.code not in NEVER, (got.code, got.reason, got.message[:200])
        assert world.errors() == []

    hostile()
    assert _serving(world, target.service)


def test_the_audit_log_stays_readable_after_the_fuzzing(world: World) -> None:
    """Runs after every RPC was fuzzed (pytest keeps the file's order)."""
    rpc = rpb.DESCRIPTOR.services_by_name["RetentionService"].methods_by_name["ListAuditEvents"]
    token, pages = "", 0
    while True:
        got = world.calls.call(
            "retention",
            dev_principal("ROLE_AUDITOR"),
            rpc,
            rpb.ListAuditEventsRequest(page_size=1000, page_token=token),
        )
        assert got.code is grpc.StatusCode.OK, (got.code, got.reason)
        page = rpb.ListAuditEventsResponse.FromString(got.replies[0])
        pages += 1
        token = page.next_page_token
        if not token:
            break
        assert pages < 1000
    assert pages >= 1
    assert world.errors() == []
