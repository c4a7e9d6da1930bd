"""The one exception hierarchy the clients raise: a class per gRPC status code.

Every failed call surfaces as a `StopCovidError` subclass carrying the server's
`google.rpc.Status` details unpacked (the `ErrorInfo` reason, domain and metadata, and
any `BadRequest` field violations). The original `grpc.RpcError` stays reachable as
`__cause__` for debugging, but callers never need to catch it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

__all__ = [
    "Aborted",
    "AlreadyExists",
    "Cancelled",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "StopCovidError",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "from_rpc_error",
]

_DETAILS_KEY = "grpc-status-details-bin"


class StopCovidError(Exception):
    """A call to a Stop COVID service failed with a non-OK status."""

    code: grpc.StatusCode
    """The gRPC status code."""
    message: str
    """The server's status message (never contains request contents)."""
    reason: str | None
    """The `ErrorInfo` reason in UPPER_SNAKE, e.g. "ROLE_NOT_ALLOWED", if the server sent one."""
    domain: str | None
    """The `ErrorInfo` domain, e.g. "stopcovid.gov.kh", if the server sent one."""
    metadata: dict[str, str]
    """The `ErrorInfo` metadata (empty without one)."""
    field_violations: list[tuple[str, str]]
    """(field, description) pairs from a `BadRequest` detail (empty without one)."""
    status: status_pb2.Status | None
    """The whole `google.rpc.Status`, for details beyond the ones unpacked above."""

    status_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str | None = None,
        domain: str | None = None,
        metadata: dict[str, str] | None = None,
        field_violations: Iterable[tuple[str, str]] = (),
        status: status_pb2.Status | None = None,
    ) -> None:
        super().__init__(message)
        self.code = self.status_code if code is None else code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.metadata = dict(metadata or {})
        self.field_violations = list(field_violations)
        self.status = status

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.message}"
        if self.reason:
            text += f" [{self.reason}]"
        if self.field_violations:
            text += " (" + "; ".join(f"{f}: {d}" for f, d in self.field_violations) + ")"
        return text

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, reason={self.reason!r})"


class Cancelled(StopCovidError):
    status_code = grpc.StatusCode.CANCELLED


class Unknown(StopCovidError):
    status_code = grpc.StatusCode.UNKNOWN


class InvalidArgument(StopCovidError):
    status_code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(StopCovidError):
    status_code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(StopCovidError):
    status_code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(StopCovidError):
    status_code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(StopCovidError):
    status_code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(StopCovidError):
    status_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(StopCovidError):
    status_code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(StopCovidError):
    status_code = grpc.StatusCode.ABORTED


class OutOfRange(StopCovidError):
    status_code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(StopCovidError):
    status_code = grpc.StatusCode.UNIMPLEMENTED


class Internal(StopCovidError):
    status_code = grpc.StatusCode.INTERNAL


class Unavailable(StopCovidError):
    status_code = grpc.StatusCode.UNAVAILABLE


class DataLoss(StopCovidError):
    status_code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(StopCovidError):
    status_code = grpc.StatusCode.UNAUTHENTICATED


_BY_CODE: dict[grpc.StatusCode, type[StopCovidError]] = {
    cls.status_code: cls
    for cls in (
        Cancelled,
        Unknown,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        OutOfRange,
        Unimplemented,
        Internal,
        Unavailable,
        DataLoss,
        Unauthenticated,
    )
}


def _status_of(err: grpc.RpcError) -> status_pb2.Status | None:
    """The `google.rpc.Status` the server attached to a failed call, if any."""
    if isinstance(err, grpc.aio.AioRpcError):
        # grpc_status's helper for grpc.aio awaits a live call; the error already holds
        # its trailers.
        for key, value in err.trailing_metadata() or ():
            if key == _DETAILS_KEY and isinstance(value, bytes):
                status = status_pb2.Status()
                status.ParseFromString(value)
                return status
        return None
    if isinstance(err, grpc.Call):
        try:
            found: status_pb2.Status | None = rpc_status.from_call(err)
        except ValueError:
            # The details disagree with the call's own code or message: trust neither.
            return None
        return found
    return None


def from_rpc_error(err: grpc.RpcError) -> StopCovidError:
    """The `StopCovidError` subclass for a failed call, with its details unpacked.

    Raise the result `from err` so the original stays in the cause chain.
    """
    code = _code_of(err)
    message = _details_of(err)
    status = _status_of(err)
    reason: str | None = None
    domain: str | None = None
    metadata: dict[str, str] = {}
    violations: list[tuple[str, str]] = []
    if status is not None:
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            bad_request = error_details_pb2.BadRequest()
            if reason is None and detail.Unpack(info):
                reason = info.reason or None
                domain = info.domain or None
                metadata = dict(info.metadata)
            elif detail.Unpack(bad_request):
                violations.extend((v.field, v.description) for v in bad_request.field_violations)
        message = message or status.message
    cls = _BY_CODE.get(code, Unknown)
    return cls(
        message,
        code=code,
        reason=reason,
        domain=domain,
        metadata=metadata,
        field_violations=violations,
        status=status,
    )


def _code_of(err: grpc.RpcError) -> grpc.StatusCode:
    code = getattr(err, "code", None)
    value = code() if callable(code) else None
    return value if isinstance(value, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def _details_of(err: grpc.RpcError) -> str:
    details = getattr(err, "details", None)
    value = details() if callable(details) else None
    return value if isinstance(value, str) else ""
