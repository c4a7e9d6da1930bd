"""The standard gRPC server metrics, from one aio interceptor: calls started and
handled (by status code), messages received and sent, and handling time, each
labelled by service, method and type (unary, client_stream, server_stream,
bidi_stream), under the names every gRPC dashboard knows (`grpc_server_*`).

It is the outermost interceptor (services/kernel/server.py puts it first), so it
sees every call, refusals by the authentication interceptor included, with the
status the caller got. Labelled children are bound once per method; a message
costs one counter increment.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from prometheus_client import Counter, Histogram

from services.kernel.handlers import WrappingInterceptor, behaviour, rewrapped, serve
from services.kernel.rpc import Context, Handler

_LABELS = ["grpc_type", "grpc_service", "grpc_method"]

STARTED = Counter("grpc_server_started", "RPCs started on the server.", _LABELS)
HANDLED = Counter(
    "grpc_server_handled", "RPCs completed on the server, by status code.", [*_LABELS, "grpc_code"]
)
RECEIVED = Counter("grpc_server_msg_received", "Stream messages received by the server.", _LABELS)
SENT = Counter("grpc_server_msg_sent", "Stream messages sent by the server.", _LABELS)
HANDLING = Histogram(
    "grpc_server_handling_seconds",
    "Time from an RPC's start to its end on the server.",
    _LABELS,
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0, 300.0),
)


class _Method:
    """One method's labelled children, bound once."""

    __slots__ = ("handled", "handling", "labels", "received", "sent", "started")

    def __init__(self, kind: str, method: str) -> None:
        service, _, name = method.lstrip("/").partition("/")
        self.labels = (kind, service, name)
        self.started = STARTED.labels(*self.labels)
        self.received = RECEIVED.labels(*self.labels)
        self.sent = SENT.labels(*self.labels)
        self.handling = HANDLING.labels(*self.labels)
        self.handled: dict[grpc.StatusCode, Any] = {}

    def code(self, code: grpc.StatusCode) -> Any:
        child = self.handled.get(code)
        if child is None:
            child = self.handled[code] = HANDLED.labels(*self.labels, code.name)
        return child

    def done(self, code: grpc.StatusCode, started: float) -> None:
        self.code(code).inc()
        self.handling.observe(time.perf_counter() - started)


def status_of(context: Context, exc: BaseException | None) -> grpc.StatusCode:
    """The status the caller gets: what the handler set or aborted with; UNKNOWN for
    an exception gRPC turns into one; CANCELLED when the call was cancelled."""
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    code: grpc.StatusCode | None = context.code()
    if code is not None:
        return code
    return grpc.StatusCode.OK if exc is None else grpc.StatusCode.UNKNOWN


class _CountingContext:
    """The servicer context, counting what is written to the stream."""

    __slots__ = ("_context", "_sent")

    def __init__(self, context: Context, sent: Any) -> None:
        self._context = context
        self._sent = sent

    async def write(self, message: Any) -> None:
        await self._context.write(message)
        self._sent.inc()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


async def _counted(requests: AsyncIterator[Any], received: Any) -> AsyncIterator[Any]:
    async for request in requests:
        received.inc()
        yield request


class MetricsInterceptor(WrappingInterceptor):
    """Counts every call of the server. The methods of `services` get their series
    at once (at zero): a rate needs a sample from before the first call."""

    def __init__(self, services: Iterable[ServiceDescriptor] = ()) -> None:
        for service in services:
            for method in service.methods:
                kind = _KINDS[(method.client_streaming, method.server_streaming)]
                _method(kind, f"/{service.full_name}/{method.name}").code(grpc.StatusCode.OK)

    def wrap(self, handler: Handler, method: str) -> Handler:
        return _wrap(handler, method)


_KINDS = {
    (False, False): "unary",
    (True, False): "client_stream",
    (False, True): "server_stream",
    (True, True): "bidi_stream",
}


def _kind(handler: Handler) -> str:
    return _KINDS[(bool(handler.request_streaming), bool(handler.response_streaming))]


_bound: dict[tuple[str, str], _Method] = {}


def _method(kind: str, method: str) -> _Method:
    found = _bound.get((kind, method))
    if found is None:
        found = _bound[(kind, method)] = _Method(kind, method)
    return found


def _wrap(handler: Handler, method: str) -> Handler:
    m = _method(_kind(handler), method)
    streaming_in = handler.request_streaming
    streaming_out = handler.response_streaming
    inner = behaviour(handler)

    # A streaming handler written as an async generator is run in the writer form,
    # so every message it yields passes the counting write.
    writes_items = streaming_out and inspect.isasyncgenfunction(inner)

    async def run(request: Any, context: Context) -> Any:
        m.started.inc()
        started = time.perf_counter()
        if streaming_in:
            request = _counted(request, m.received)
        else:
            m.received.inc()
        ctx: Any = _CountingContext(context, m.sent) if streaming_out else context
        try:
            result = await serve(inner, request, ctx, writes_items=writes_items)
        except BaseException as exc:
            m.done(status_of(context, exc), started)
            raise
        if not streaming_out:
            m.sent.inc()
        m.done(status_of(context, None), started)
        return result

    return rewrapped(handler, run)
