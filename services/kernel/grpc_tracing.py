"""A span per RPC, from one aio interceptor, installed only when tracing is on
(services/kernel/tracing.py).

The span continues the caller's trace when its metadata carries a W3C
`traceparent`, is current while the handler runs (so what the handler starts,
a stream's batches among them, is its child), and ends with the status the
caller got. Its attributes name the service and method, never a caller or an id.
"""

from __future__ import annotations

import inspect
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.kernel import tracing
from services.kernel.grpc_metrics import status_of
from services.kernel.handlers import WrappingInterceptor, behaviour, rewrapped, serve
from services.kernel.rpc import Context, Handler


class TracingInterceptor(WrappingInterceptor):
    def wrap(self, handler: Handler, method: str) -> Handler:
        return _wrap(handler, method)


def _wrap(handler: Handler, method: str) -> Handler:
    service, _, name = method.lstrip("/").partition("/")
    attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
    inner = behaviour(handler)
    writes_items = handler.response_streaming and inspect.isasyncgenfunction(inner)

    async def run(request: Any, context: Context) -> Any:
        parent = tracing.from_metadata(context.invocation_metadata())
        with tracing.tracer().start_as_current_span(
            f"{service}/{name}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                result = await serve(inner, request, context, writes_items=writes_items)
            except BaseException as exc:
                _end(span, status_of(context, exc))
                raise
            _end(span, status_of(context, None))
            return result

    return rewrapped(handler, run)


def _end(span: trace.Span, code: grpc.StatusCode) -> None:
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code is not grpc.StatusCode.OK:
        span.set_status(Status(StatusCode.ERROR, code.name))
