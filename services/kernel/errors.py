"""The one domain exception hierarchy. Services raise these; the interceptor maps
each to its gRPC status with a `google.rpc.Status` carrying an `ErrorInfo`.

Messages are for operators and must never contain personal data (no phone
numbers, tokens or person ids), because they travel back to callers and into logs.
"""

from __future__ import annotations

import grpc

DOMAIN = "stopcovid.gov.kh"

# What one refusal may carry back: the status message, each metadata entry and the
# field name. An answer is sent twice (the status message, and again inside the
# status details), and a default client reads at most 8 KB of metadata.
MAX_MESSAGE_CHARS = 512
MAX_FIELD_CHARS = 200
MAX_METADATA_ENTRIES = 8
MAX_METADATA_CHARS = 128


def bounded(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`text`, cut to `limit` characters with a mark where it was cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def bounded_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """ErrorInfo metadata of bounded size: a few entries, each key and value cut."""
    return {
        bounded(key, MAX_METADATA_CHARS): bounded(value, MAX_METADATA_CHARS)
        for key, value in list(metadata.items())[:MAX_METADATA_ENTRIES]
    }


class DomainError(Exception):
    """Base: a refusal with a status code, a stable reason and a safe message."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    reason: str = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: dict[str, str] | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata = dict(metadata or {})
        self.field = field
        if field is not None:
            self.metadata.setdefault("field", field)


class InvalidArgument(DomainError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"


class NotFound(DomainError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"


class AlreadyExists(DomainError):
    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "ALREADY_EXISTS"


class Unauthenticated(DomainError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class PermissionDenied(DomainError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "ROLE_NOT_ALLOWED"


class FailedPrecondition(DomainError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


class Aborted(DomainError):
    code = grpc.StatusCode.ABORTED
    reason = "ETAG_MISMATCH"


class ResourceExhausted(DomainError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "RATE_LIMITED"


class Unimplemented(DomainError):
    code = grpc.StatusCode.UNIMPLEMENTED
    reason = "NOT_IMPLEMENTED"


class Unavailable(DomainError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "BACKEND_UNAVAILABLE"


class Internal(DomainError):
    code = grpc.StatusCode.INTERNAL
    reason = "INTERNAL"
