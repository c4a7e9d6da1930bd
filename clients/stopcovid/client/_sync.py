"""Blocking clients: the generated stub's multicallables, each wrapped to apply the default
deadline, retry idempotent unary calls on UNAVAILABLE, and raise `StopCovidError`s."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, ClassVar, Self, cast

import grpc
from google.protobuf import descriptor
from stopcovid.client._channel import secure_channel
from stopcovid.client._closing import Closing
from stopcovid.client._methods import Method, Rpcs, methods_of, pause, should_retry
from stopcovid.client.config import ClientConfig
from stopcovid.client.errors import from_rpc_error


class _Call:
    """A call object (future, response stream, or both) whose errors come out converted."""

    def __init__(self, call: Any) -> None:
        self._call = call

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> Any:
        try:
            return next(self._call)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

    def result(self, timeout: float | None = None) -> Any:
        try:
            return self._call.result(timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err

    def exception(self, timeout: float | None = None) -> BaseException | None:
        found = self._call.exception(timeout)
        if isinstance(found, grpc.RpcError):
            return from_rpc_error(found)
        return cast(BaseException | None, found)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)


class _MultiCallable:
    """Stands in for one generated multicallable (`stub.GetVenue` and the like)."""

    def __init__(self, inner: Any, method: Method, config: ClientConfig) -> None:
        self._inner = inner
        self._method = method
        self._config = config

    # Keyword options (metadata, credentials, wait_for_ready, compression) pass through.

    def __call__(self, request: Any, timeout: float | None = None, **options: Any) -> Any:
        if self._method.server_streaming:
            try:
                return _Call(self._inner(request, timeout=self._stream_timeout(timeout), **options))
            except grpc.RpcError as err:
                raise from_rpc_error(err) from err
        return self._invoke(self._inner, request, timeout, options)

    def with_call(
        self, request: Any, timeout: float | None = None, **options: Any
    ) -> tuple[Any, Any]:
        response, call = self._invoke(self._inner.with_call, request, timeout, options)
        return response, call

    def future(self, request: Any, timeout: float | None = None, **options: Any) -> _Call:
        """Starts the call without blocking; not retried, since nobody waits to retry it."""
        if timeout is None:
            streaming = self._method.client_streaming
            timeout = self._config.stream_timeout if streaming else self._config.timeout
        return _Call(self._inner.future(request, timeout=timeout, **options))

    def _stream_timeout(self, timeout: float | None) -> float | None:
        return self._config.stream_timeout if timeout is None else timeout

    def _invoke(
        self, fn: Callable[..., Any], request: Any, timeout: float | None, options: dict[str, Any]
    ) -> Any:
        if self._method.client_streaming:
            # A request stream cannot be replayed, so it is never retried.
            try:
                return fn(request, timeout=self._stream_timeout(timeout), **options)
            except grpc.RpcError as err:
                raise from_rpc_error(err) from err
        deadline = time.monotonic() + (self._config.timeout if timeout is None else timeout)
        attempt = 1
        while True:
            try:
                return fn(request, timeout=max(0.0, deadline - time.monotonic()), **options)
            except grpc.RpcError as err:
                if should_retry(err, self._method, attempt, self._config.retry):
                    wait = pause(self._config.retry, attempt)
                    if time.monotonic() + wait < deadline:
                        time.sleep(wait)
                        attempt += 1
                        continue
                raise from_rpc_error(err) from err


class SyncClient(Closing):
    """Base of the blocking clients: owns a mutual-TLS channel and the RPCs over it.

    A subclass names its service and generated stub class in its bases
    (`class VenueClient(SyncClient, service=..., stub=...)`) and declares `rpc` with the
    generated stub's type.
    """

    _spec: ClassVar[tuple[descriptor.ServiceDescriptor, Callable[[grpc.Channel], object]]]

    rpc: object
    """The service's RPCs under their proto names, typed as the generated stub."""

    def __init_subclass__(
        cls,
        *,
        service: descriptor.ServiceDescriptor,
        stub: Callable[[grpc.Channel], object],
    ) -> None:
        super().__init_subclass__()
        cls._spec = (service, stub)

    def __init__(self, config: ClientConfig) -> None:
        service, make_stub = self._spec
        self.config = config
        self.channel: grpc.Channel = secure_channel(config)
        stub = make_stub(self.channel)
        self.rpc = Rpcs(
            service.full_name,
            {m.name: _MultiCallable(getattr(stub, m.name), m, config) for m in methods_of(service)},
        )

    def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        self.channel.close()
