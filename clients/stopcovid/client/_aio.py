"""asyncio clients: the generated grpc.aio stub's multicallables, each wrapped to apply the
default deadline, retry idempotent unary calls on UNAVAILABLE, and raise `StopCovidError`s."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator
from typing import Any, ClassVar, Self

import grpc
import grpc.aio
from google.protobuf import descriptor
from stopcovid.client._channel import aio_secure_channel
from stopcovid.client._closing import AsyncClosing
from stopcovid.client._methods import Method, Rpcs, methods_of, pause, should_retry
from stopcovid.client.config import ClientConfig
from stopcovid.client.errors import StopCovidError, from_rpc_error


class _UnaryCall:
    """An awaitable unary call that retries itself; other attributes are the current
    attempt's `grpc.aio.UnaryUnaryCall`."""

    def __init__(
        self, start: Callable[[float], Any], method: Method, config: ClientConfig, timeout: float
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._deadline = self._loop.time() + timeout
        self._start = start
        self._method = method
        self._config = config
        self._attempt = 1
        self._cancelled = False
        self._error: StopCovidError | None = None
        # Like grpc.aio, the call starts now, not when first awaited.
        self._call = start(timeout)

    def __await__(self) -> Generator[Any, None, Any]:
        return self._run().__await__()

    async def _run(self) -> Any:
        while self._error is None:
            try:
                return await self._call
            except grpc.RpcError as err:
                if should_retry(err, self._method, self._attempt, self._config.retry):
                    wait = pause(self._config.retry, self._attempt)
                    if self._loop.time() + wait < self._deadline:
                        await asyncio.sleep(wait)
                        if self._cancelled:
                            raise asyncio.CancelledError from err
                        self._attempt += 1
                        self._call = self._start(self._deadline - self._loop.time())
                        continue
                self._error = from_rpc_error(err)
                raise self._error from err
        raise self._error

    def cancel(self) -> bool:
        self._cancelled = True
        return bool(self._call.cancel())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)


class _StreamCall:
    """A streaming `grpc.aio` call whose errors, raised while reading, writing or awaiting
    the response, come out converted."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._responses: Any = None

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Any:
        if self._responses is None:
            self._responses = self._call.__aiter__()
        try:
            return await self._responses.__anext__()
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

    async def read(self) -> Any:
        try:
            return await self._call.read()
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

    async def write(self, request: Any) -> None:
        try:
            await self._call.write(request)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

    async def done_writing(self) -> None:
        try:
            await self._call.done_writing()
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

    def __await__(self) -> Generator[Any, None, Any]:
        return self._response().__await__()

    async def _response(self) -> Any:
        try:
            return await self._call
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)


class _MultiCallable:
    """Stands in for one generated grpc.aio multicallable (`stub.GetVenue` and the like)."""

    def __init__(self, inner: Any, method: Method, config: ClientConfig) -> None:
        self._inner = inner
        self._method = method
        self._config = config

    def __call__(
        self, request: Any = None, timeout: float | None = None, **options: Any
    ) -> _UnaryCall | _StreamCall:
        # Keyword options (metadata, credentials, wait_for_ready, compression) pass through.
        if self._method.unary:

            def start(remaining: float) -> Any:
                return self._inner(request, timeout=remaining, **options)

            deadline = self._config.timeout if timeout is None else timeout
            return _UnaryCall(start, self._method, self._config, deadline)
        if timeout is None:
            timeout = self._config.stream_timeout
        return _StreamCall(self._inner(request, timeout=timeout, **options))


class AsyncClient(AsyncClosing):
    """Base of the asyncio clients: owns a mutual-TLS channel and the RPCs over it.

    A subclass names its service and generated stub class in its bases
    (`class AsyncVenueClient(AsyncClient, service=..., stub=...)`) and declares `rpc`
    with the generated grpc.aio stub's type.
    """

    _spec: ClassVar[tuple[descriptor.ServiceDescriptor, Callable[[grpc.aio.Channel], object]]]

    rpc: object
    """The service's RPCs under their proto names, typed as the generated grpc.aio stub."""

    def __init_subclass__(
        cls,
        *,
        service: descriptor.ServiceDescriptor,
        stub: Callable[[grpc.aio.Channel], object],
    ) -> None:
        super().__init_subclass__()
        cls._spec = (service, stub)

    def __init__(self, config: ClientConfig) -> None:
        service, make_stub = self._spec
        self.config = config
        self.channel: grpc.aio.Channel = aio_secure_channel(config)
        stub = make_stub(self.channel)
        self.rpc = Rpcs(
            service.full_name,
            {m.name: _MultiCallable(getattr(stub, m.name), m, config) for m in methods_of(service)},
        )

    async def close(self, grace: float | None = None) -> None:
        """Closes the channel, letting calls in flight finish for `grace` seconds."""
        await self.channel.close(grace)
