"""What the clients need to know about each RPC, read from the proto service descriptor."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass

import grpc
from google.protobuf import descriptor, descriptor_pb2
from stopcovid.client.config import RetryPolicy

_RETRYABLE_LEVELS = frozenset(
    {
        descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS,
        descriptor_pb2.MethodOptions.IDEMPOTENT,
    }
)

_random = secrets.SystemRandom()


@dataclass(frozen=True, slots=True)
class Method:
    """One RPC of a service."""

    name: str
    client_streaming: bool
    server_streaming: bool
    retryable: bool
    """Whether the proto marks it NO_SIDE_EFFECTS or IDEMPOTENT, so a repeat is harmless."""

    @property
    def unary(self) -> bool:
        return not (self.client_streaming or self.server_streaming)


def methods_of(service: descriptor.ServiceDescriptor) -> list[Method]:
    """The service's RPCs, in proto order."""
    return [
        Method(
            name=m.name,
            client_streaming=m.client_streaming,
            server_streaming=m.server_streaming,
            retryable=m.GetOptions().idempotency_level in _RETRYABLE_LEVELS,
        )
        for m in service.methods
    ]


def should_retry(err: grpc.RpcError, method: Method, attempt: int, policy: RetryPolicy) -> bool:
    """Whether the failed `attempt` (1-based) of a unary call may be tried again."""
    return (
        method.retryable
        and method.unary
        and attempt < policy.max_attempts
        and getattr(err, "code", lambda: None)() == grpc.StatusCode.UNAVAILABLE
    )


def pause(policy: RetryPolicy, attempt: int) -> float:
    """Seconds to wait after failed `attempt` (1-based), jitter applied."""
    base = policy.backoff(attempt)
    return min(policy.max_backoff, base * _random.uniform(1 - policy.jitter, 1 + policy.jitter))


class Rpcs:
    """One wrapped multicallable per RPC, under the RPC's proto name."""

    def __init__(self, service: str, calls: Mapping[str, object]) -> None:
        self._service = service
        self.__dict__.update(calls)

    def __repr__(self) -> str:
        return f"<{self._service} RPCs>"
