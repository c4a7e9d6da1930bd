"""The one server interceptor: authenticate, authorize, bind log context, and map
every failure to a precise gRPC status with a `google.rpc.Status` detail.

grpc.aio interceptors see only the method name and metadata, not the TLS peer,
so the checks run inside a wrapper around the method's handler, where the
servicer context (and with it the verified client certificate) is available.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import asyncpg
import grpc
import structlog
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from services.kernel import audit, auth, errors
from services.kernel.rpc import Context, Handler

log = structlog.get_logger()

# The health service needs no role, only the platform certificate that the TLS
# handshake already demanded, so any probe credential will do; it reveals nothing
# but SERVING / NOT_SERVING.
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
# Reflection needs an authenticated principal of any role.
ANY_ROLE_PREFIXES = ("/grpc.reflection.",)

# The database went away under the call (restart, failover, a killed backend, too
# many connections): the caller may retry, so this is UNAVAILABLE, never INTERNAL.
_DB_UNAVAILABLE = (
    OSError,
    asyncpg.exceptions.PostgresConnectionError,  # SQLSTATE class 08
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.InterfaceError,
    # A backend killed while the connection was idle can leave asyncpg's protocol
    # in a state it reports this way; the pool then discards the connection.
    asyncpg.exceptions.InternalClientError,
)


def status_details(err: errors.DomainError) -> bytes:
    """Serialize `err` as a google.rpc.Status with ErrorInfo (and BadRequest for a field)."""
    status = status_pb2.Status(code=err.code.value[0], message=err.message)
    info = any_pb2.Any()
    info.Pack(
        error_details_pb2.ErrorInfo(reason=err.reason, domain=errors.DOMAIN, metadata=err.metadata)
    )
    status.details.append(info)
    if err.field is not None:
        bad = any_pb2.Any()
        bad.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=err.field, description=err.message
                    )
                ]
            )
        )
        status.details.append(bad)
    data: bytes = status.SerializeToString()
    return data


def _to_domain_error(exc: BaseException) -> errors.DomainError:
    if isinstance(exc, errors.DomainError):
        return exc
    if isinstance(exc, NotImplementedError):
        return errors.Unimplemented("this RPC is not served by this release yet")
    if isinstance(exc, _DB_UNAVAILABLE):
        return errors.Unavailable("the database is unavailable; retry later")
    return errors.Internal("internal error; see the server log")


class ServerInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, role_table: Mapping[str, frozenset[str]]) -> None:
        self._roles = role_table

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        # A served method missing from the table allows nobody (check_role fails closed).
        return _wrap(handler, method, self._roles, method.startswith(ANY_ROLE_PREFIXES))


def _authorize(
    context: Context,
    method: str,
    roles: Mapping[str, frozenset[str]],
    any_role: bool,
) -> auth.Principal:
    principal = auth.principal_from_auth_context(context.auth_context())
    # Bound before the role check so a refusal is logged with who was refused. Each
    # RPC runs in its own task, so these bindings (and the principal) end with it.
    structlog.contextvars.bind_contextvars(
        rpc=method, principal=principal.name, role=principal.role
    )
    if not any_role:
        auth.check_role(roles, method, principal)
    auth.set_current_principal(principal)
    audit.serve(method)
    return principal


async def _fail(context: Context, method: str, exc: BaseException) -> None:
    err = _to_domain_error(exc)
    if isinstance(err, errors.Internal) and err is not exc:
        log.error("rpc_internal_error", rpc=method, error_type=type(exc).__name__, exc_info=exc)
    else:
        log.info("rpc_refused", rpc=method, code=err.code.name, reason=err.reason)
    await context.abort(
        err.code,
        err.message,
        trailing_metadata=(("grpc-status-details-bin", status_details(err)),),
    )


class _Malformed:
    """Stands in for a request message whose bytes do not parse."""

    __slots__ = ()


_MALFORMED = _Malformed()


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """gRPC answers a request it cannot parse with a bare INTERNAL; parse here instead,
    so the handler can refuse it with INVALID_ARGUMENT after authentication."""
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # DecodeError, and whatever a hostile payload provokes
            return _MALFORMED

    return deserialize


def _malformed(method: str) -> errors.InvalidArgument:
    return errors.InvalidArgument(
        f"the request is not a valid {method.rsplit('/', 1)[-1]} request message",
        metadata={"method": method},
    )


def _checked(method: str, request: Any) -> Any:
    if request is _MALFORMED:
        raise _malformed(method)
    if isinstance(request, AsyncIterator):
        return _checked_stream(method, request)
    return request


async def _checked_stream(method: str, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if request is _MALFORMED:
            raise _malformed(method)
        yield request


def _wrap(
    handler: Handler,
    method: str,
    roles: Mapping[str, frozenset[str]],
    any_role: bool,
) -> Handler:
    behaviours: Any = handler  # the stubs type each behaviour narrowly; we pass all through
    deserializer = _tolerant(handler.request_deserializer)
    if handler.unary_unary or handler.stream_unary:
        inner: Any = behaviours.unary_unary or behaviours.stream_unary

        async def unary_response(request: Any, context: Context) -> Any:
            started = time.perf_counter()
            try:
                _authorize(context, method, roles, any_role)
                response = await inner(_checked(method, request), context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _fail(context, method, exc)
                raise  # unreachable: abort raises
            log.debug("rpc_ok", rpc=method, ms=round((time.perf_counter() - started) * 1e3, 2))
            return response

        factory: Any = (
            grpc.unary_unary_rpc_method_handler
            if handler.unary_unary
            else grpc.stream_unary_rpc_method_handler
        )
        made: Handler = factory(
            unary_response,
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )
        return made

    inner_stream: Any = behaviours.unary_stream or behaviours.stream_stream
    stream_factory: Any = (
        grpc.unary_stream_rpc_method_handler
        if handler.unary_stream
        else grpc.stream_stream_rpc_method_handler
    )
    if inspect.isasyncgenfunction(inner_stream):

        async def stream_response(request: Any, context: Context) -> AsyncIterator[Any]:
            try:
                _authorize(context, method, roles, any_role)
                async for item in inner_stream(_checked(method, request), context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _fail(context, method, exc)

        wrapped: Callable[..., Any] = stream_response
    else:

        async def stream_writer(request: Any, context: Context) -> None:
            try:
                _authorize(context, method, roles, any_role)
                await inner_stream(_checked(method, request), context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _fail(context, method, exc)

        wrapped = stream_writer
    made_stream: Handler = stream_factory(
        wrapped,
        request_deserializer=deserializer,
        response_serializer=handler.response_serializer,
    )
    return made_stream
