"""Who is calling, and may they call this RPC.

The transport is mutual TLS: the servers require a client certificate signed by
the platform CA, so a caller without one is refused during the TLS handshake and
never reaches a handler. Here we read the principal and role from the verified
certificate and check the role against the RPC's `allowed_roles` option, which
is declared in the protos and is the single source of the RPC -> roles table.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID
from google.protobuf import descriptor as _descriptor
from stopcovid.common.v1 import auth_pb2

from services.kernel import errors

ROLE_NAMES = frozenset(auth_pb2.Role.keys()) - {"ROLE_UNSPECIFIED"}


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: a name from the certificate and its role (enum name)."""

    name: str
    role: str
    certificate_serial: str


_current: contextvars.ContextVar[Principal] = contextvars.ContextVar("principal")


def current_principal() -> Principal:
    """The principal of the RPC being served. Set by the interceptor for every call."""
    return _current.get()


def set_current_principal(principal: Principal) -> contextvars.Token[Principal]:
    return _current.set(principal)


@functools.lru_cache(maxsize=4096)
def principal_from_pem(pem: bytes) -> Principal:
    """Read the principal from a certificate the TLS layer has already verified.

    Cached by certificate: the same few thousand devices call all day.
    """
    cert = x509.load_pem_x509_certificate(pem)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    units = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if len(names) != 1 or len(units) != 1:
        raise errors.Unauthenticated(
            "the client certificate does not name exactly one principal and one role",
            reason="UNAUTHENTICATED",
        )
    role = str(units[0].value)
    if role not in ROLE_NAMES:
        raise errors.Unauthenticated(
            "the client certificate carries no known role", reason="UNAUTHENTICATED"
        )
    try:
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is None or x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH not in usage:
        raise errors.Unauthenticated(
            "the certificate is not a client certificate", reason="UNAUTHENTICATED"
        )
    return Principal(
        name=str(names[0].value), role=role, certificate_serial=f"{cert.serial_number:x}"
    )


def principal_from_auth_context(auth_context: Mapping[str, Iterable[bytes]]) -> Principal:
    pems = list(auth_context.get("x509_pem_cert", ()))
    if not pems:
        raise errors.Unauthenticated(
            "a client certificate from the platform CA is required", reason="UNAUTHENTICATED"
        )
    return principal_from_pem(pems[0])


def role_table(
    services: Iterable[_descriptor.ServiceDescriptor],
) -> dict[str, frozenset[str]]:
    """Map each full method path (`/pkg.Service/Method`) to the role names allowed."""
    table: dict[str, frozenset[str]] = {}
    for service in services:
        for method in service.methods:
            roles = method.GetOptions().Extensions[auth_pb2.allowed_roles]
            table[f"/{service.full_name}/{method.name}"] = frozenset(
                auth_pb2.Role.Name(r) for r in roles
            )
    return table


def check_role(table: Mapping[str, frozenset[str]], method: str, principal: Principal) -> None:
    allowed = table.get(method, frozenset())
    if principal.role not in allowed:
        # Fail closed: an RPC without the option allows nobody.
        raise errors.PermissionDenied(
            f"role {principal.role} may not call {method.rsplit('/', 1)[-1]}",
            metadata={"role": principal.role},
        )
