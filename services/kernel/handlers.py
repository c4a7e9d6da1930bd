"""Wrapping an RPC handler, as each of the server's own interceptors does (metrics,
tracing, authentication): the interceptor's shape, the behaviour a handler serves
with, a handler of the same kind around a new behaviour, and running a behaviour
either way a streaming one may be written.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from services.kernel.rpc import Context, Handler


class WrappingInterceptor(grpc.aio.ServerInterceptor):
    """An interceptor that serves each method through `wrap(handler, method)`."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(details)
        if handler is None:
            return None
        return self.wrap(handler, details.method)

    def wrap(self, handler: Handler, method: str) -> Handler:
        raise NotImplementedError


def behaviour(handler: Handler) -> Any:
    """The function that serves `handler`'s calls, whatever its kind."""
    behaviours: Any = handler  # the stubs type each behaviour narrowly
    return (
        behaviours.unary_unary
        or behaviours.stream_unary
        or behaviours.unary_stream
        or behaviours.stream_stream
    )


def rewrapped(handler: Handler, run: Callable[[Any, Context], Awaitable[Any]]) -> Handler:
    """A handler of `handler`'s kind and (de)serializers that serves calls with `run`."""
    factory: Any
    if handler.unary_unary:
        factory = grpc.unary_unary_rpc_method_handler
    elif handler.stream_unary:
        factory = grpc.stream_unary_rpc_method_handler
    elif handler.unary_stream:
        factory = grpc.unary_stream_rpc_method_handler
    else:
        factory = grpc.stream_stream_rpc_method_handler
    made: Handler = factory(
        run,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
    return made


async def serve(inner: Any, request: Any, context: Any, *, writes_items: bool) -> Any:
    """Run the behaviour `inner`; with `writes_items` (an async generator serving a
    stream) in the writer form, each item it yields passing `context.write`."""
    if writes_items:
        async for item in inner(request, context):
            await context.write(item)
        return None
    return await inner(request, context)
