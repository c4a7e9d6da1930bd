"""The one server interceptor: authenticate, authorize, bind log context, end a
call whose certificate is revoked, and map every failure to a precise gRPC status
with a `google.rpc.Status` detail.

grpc.aio interceptors see only the method name and metadata, not the TLS peer,
so the checks run inside a wrapper around the method's handler, where the
servicer context (and with it the verified client certificate chain) is
available. Every call, health checks included, is authenticated (`Gate`): the
chain (auth.Issuers), the names, and the revocation list (revocation.py). A
refused certificate is audited. Streaming handlers are run in the writer form
(`_streamed`), so that a revocation can end any open call with its own status.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import asyncpg
import grpc
import structlog
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc._cython import cygrpc  # type: ignore[attr-defined]

from services.kernel import audit, auth, errors, validation
from services.kernel.handlers import WrappingInterceptor
from services.kernel.revocation import OpenCall, Revocations
from services.kernel.rpc import Context, Handler

log = structlog.get_logger()

# Health checks and reflection need an authenticated principal of any role: a
# probe's credential will do, and they reveal only SERVING and the API's shape.
ANY_ROLE_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

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
    # A statement that ran out of its statement_timeout: the database is too busy to
    # answer in time (seen under a flood of streams), which a retry may not find.
    asyncpg.exceptions.QueryCanceledError,
)


# What a write raises once the call has ended under it (its deadline passed, or the
# client went away) before gRPC marks the context done: seen when a StreamScans
# deadline expires while its settings are being written.
_CALL_ENDED = (cygrpc.ExecuteBatchError,)


def status_details(err: errors.DomainError) -> bytes:
    """Serialize `err` as a google.rpc.Status with ErrorInfo (and BadRequest for a field).
    Every part is bounded (errors.bounded), so no input can make an answer that a
    default client could not read."""
    status = status_pb2.Status(code=err.code.value[0], message=errors.bounded(err.message))
    info = any_pb2.Any()
    info.Pack(
        error_details_pb2.ErrorInfo(
            reason=err.reason, domain=errors.DOMAIN, metadata=errors.bounded_metadata(err.metadata)
        )
    )
    status.details.append(info)
    if err.field is not None:
        bad = any_pb2.Any()
        bad.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=errors.bounded(err.field, errors.MAX_FIELD_CHARS),
                        description=errors.bounded(err.message),
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


class ServerInterceptor(WrappingInterceptor):
    def __init__(self, role_table: Mapping[str, frozenset[str]], gate: Gate) -> None:
        self._roles = role_table
        self._gate = gate

    def wrap(self, handler: Handler, method: str) -> Handler:
        # A served method missing from the table allows nobody (check_role fails closed).
        any_role = method.startswith(ANY_ROLE_PREFIXES)
        return _wrap(handler, method, self._gate.calls(method, self._roles, any_role))


class Gate:
    """Authentication for every call: the chain check (auth.Issuers), the revocation
    list, and the audit of certificate refusals.

    A refusal of a certificate is audited at most once a minute per certificate,
    reason, method and server, so a client retrying in a loop cannot flood the
    audit log."""

    def __init__(self, issuers: auth.Issuers, revocations: Revocations, pool: asyncpg.Pool) -> None:
        self.issuers = issuers
        self.revocations = revocations
        self._pool = pool
        self._audited: dict[tuple[str, str, str], float] = {}

    def calls(self, method: str, roles: Mapping[str, frozenset[str]], any_role: bool) -> _Calls:
        return _Calls(self, method, roles, any_role)

    async def audit_refusal(self, method: str, err: errors.DomainError) -> None:
        holder = err.holder if isinstance(err, auth.CertificateRefused) else None
        if holder is None and err.reason == "CERTIFICATE_REVOKED":
            holder = auth.current_principal()
        if holder is None:
            return
        key = (holder.certificate_serial, err.reason, method)
        now = time.monotonic()
        if now - self._audited.get(key, -_AUDIT_EVERY_S) < _AUDIT_EVERY_S:
            return
        if len(self._audited) >= _AUDITED_MAX:
            self._audited.clear()
        self._audited[key] = now
        try:
            await audit.record_refusal(
                self._pool,
                method.lstrip("/"),
                "certificate",
                holder.certificate_serial,
                error_reason=err.reason,
                details=err.metadata,
                principal=holder,
            )
        except (*_DB_UNAVAILABLE, asyncpg.PostgresError) as exc:
            # The caller is refused all the same; only the record is missing.
            log.warning("refusal_not_audited", reason=err.reason, error_type=type(exc).__name__)


_AUDIT_EVERY_S = 60.0
_AUDITED_MAX = 4096


class _Calls:
    """What one method's wrapper needs: who may call it and how to refuse."""

    def __init__(
        self, gate: Gate, method: str, roles: Mapping[str, frozenset[str]], any_role: bool
    ) -> None:
        self.gate = gate
        self.method = method
        self._roles = roles
        self._any_role = any_role

    def authorize(self, context: Context) -> auth.Principal:
        principal = self.gate.issuers.principal(context.auth_context())
        # Bound before the role check so a refusal is logged with who was refused. Each
        # RPC runs in its own task, so these bindings (and the principal) end with it.
        structlog.contextvars.bind_contextvars(
            rpc=self.method, principal=principal.name, role=principal.role
        )
        auth.set_current_principal(principal)
        audit.serve(self.method)
        # Before the role: a revoked certificate authenticates nobody.
        refusal = self.gate.revocations.refusal(principal)
        if refusal is not None:
            raise refusal
        if not self._any_role:
            auth.check_role(self._roles, self.method, principal)
        return principal

    def watch(self, principal: auth.Principal) -> contextlib.AbstractContextManager[OpenCall]:
        return self.gate.revocations.watch(principal)

    async def fail(self, context: Context, exc: BaseException) -> None:
        if context.done() or isinstance(exc, _CALL_ENDED):
            # The call ended already (its deadline passed, the client cancelled or went
            # away) while the handler was still at work, which then fails writing to
            # it: nobody is there to answer, and it is not the server's fault.
            log.info("rpc_gone", rpc=self.method, error_type=type(exc).__name__)
            return
        err = _to_domain_error(exc)
        if isinstance(err, errors.Internal) and err is not exc:
            log.error(
                "rpc_internal_error",
                rpc=self.method,
                error_type=type(exc).__name__,
                exc_info=exc,
            )
        else:
            log.info("rpc_refused", rpc=self.method, code=err.code.name, reason=err.reason)
            if err.code is grpc.StatusCode.UNAUTHENTICATED:
                await self.gate.audit_refusal(self.method, err)
        await context.abort(
            err.code,
            errors.bounded(err.message),
            trailing_metadata=(("grpc-status-details-bin", status_details(err)),),
        )


async def _revocable(call: OpenCall, work: Awaitable[Any]) -> Any:
    """Await `work` unless the certificate is revoked meanwhile: then the revocation
    cancelled this task, and the call ends with CERTIFICATE_REVOKED instead.

    A handler may swallow the cancellation (waiting for a child it cancelled) or
    turn it into an error of its own; the revocation wins either way."""
    try:
        result = await work
    except grpc.aio.AbortError:
        raise  # the handler ended the call itself; its status stands
    except BaseException:
        if call.refusal is None:
            raise
        if call.task.uncancel() > 0:
            raise  # also cancelled for another reason (the client went away)
        raise call.refusal from None
    if call.refusal is not None:
        call.task.uncancel()
        raise call.refusal
    return result


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
    validation.check_message(request)
    return request


async def _checked_stream(method: str, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if request is _MALFORMED:
            raise _malformed(method)
        validation.check_message(request)
        yield request


async def _streamed(inner: Any, request: Any, context: Context) -> None:
    """Run a streaming handler in the writer form: the wrapper's own task then does
    every write, so a revocation's cancellation lands where `_revocable` sees it."""
    if not inspect.isasyncgenfunction(inner):
        await inner(request, context)
        return
    async with contextlib.aclosing(inner(request, context)) as items:
        async for item in items:
            await context.write(item)


def _wrap(handler: Handler, method: str, calls: _Calls) -> Handler:
    behaviours: Any = handler  # the stubs type each behaviour narrowly; we pass all through
    deserializer = _tolerant(handler.request_deserializer)
    if handler.unary_unary or handler.stream_unary:
        inner: Any = behaviours.unary_unary or behaviours.stream_unary

        async def unary_response(request: Any, context: Context) -> Any:
            started = time.perf_counter()
            try:
                principal = calls.authorize(context)
                with calls.watch(principal) as call:
                    work = inner(_checked(method, request), context)
                    response = await _revocable(call, work)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await calls.fail(context, exc)
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

    async def stream_writer(request: Any, context: Context) -> None:
        try:
            principal = calls.authorize(context)
            with calls.watch(principal) as call:
                await _revocable(call, _streamed(inner_stream, _checked(method, request), context))
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await calls.fail(context, exc)

    made_stream: Handler = stream_factory(
        stream_writer,
        request_deserializer=deserializer,
        response_serializer=handler.response_serializer,
    )
    return made_stream
