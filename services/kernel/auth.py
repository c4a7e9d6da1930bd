"""Who is calling, and may they call this RPC.

The transport is mutual TLS: the servers require a client certificate that chains
to the platform's root, so a caller without one is refused in the handshake and
never reaches a handler. The TLS library checks path lengths, key usages and name
constraints of the issuing CAs, but not the root's path length, and it accepts
any CA the root ever signed. So `Issuers` checks every chain again: the leaf must
be signed directly by one of the issuing CAs this server is configured with, the
peer may present nothing else but that CA (and the root), and the CA's purpose
must issue the leaf's role (services/kernel/pki.py). Then the principal and role
are read from the leaf's subject, whose every attribute must be free of control
characters, and the role is checked against the RPC's `allowed_roles` option,
declared in the protos: the single source of the RPC -> roles table.
"""

from __future__ import annotations

import contextvars
import dataclasses
import hashlib
import unicodedata
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from google.protobuf import descriptor as _descriptor
from stopcovid.common.v1 import auth_pb2

from services.kernel import errors, pki

ROLE_NAMES = pki.CLIENT_ROLES
UNKNOWN_ROLE = "ROLE_UNSPECIFIED"

# Subject attributes a client certificate may carry, and how many of each.
_ATTRIBUTES = {
    NameOID.ORGANIZATION_NAME: (1, 1),
    NameOID.ORGANIZATIONAL_UNIT_NAME: (1, 1),
    NameOID.ORGANIZATION_IDENTIFIER: (0, 1),
    NameOID.COMMON_NAME: (1, 1),
}
_SHORT = {
    NameOID.ORGANIZATION_NAME: "O",
    NameOID.ORGANIZATIONAL_UNIT_NAME: "OU",
    NameOID.ORGANIZATION_IDENTIFIER: "organizationIdentifier",
    NameOID.COMMON_NAME: "CN",
}
_SAFE_NAME_CHARS = 200


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: a name from the certificate and its role (enum name)."""

    name: str
    role: str
    certificate_serial: str
    organization: str = ""
    """The certificate's organizationIdentifier (pki.py); empty until organisations
    are issued."""
    issuer_serial: str = ""
    """The serial of the issuing CA's certificate, which can be revoked as well."""


_current: contextvars.ContextVar[Principal] = contextvars.ContextVar("principal")


def current_principal() -> Principal:
    """The principal of the RPC being served. Set by the interceptor for every call."""
    return _current.get()


def set_current_principal(principal: Principal) -> contextvars.Token[Principal]:
    return _current.set(principal)


class CertificateRefused(errors.Unauthenticated):
    """A client certificate the TLS layer accepted and the platform does not.

    `holder` names the certificate for the audit record: its role when known, its
    serial, and its common name with every control character escaped (a NUL cannot
    be stored, and a newline or an escape sequence must not reach a log)."""

    def __init__(
        self,
        message: str,
        *,
        reason: str,
        holder: Principal,
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.holder = holder


def printable(value: str) -> str:
    """`value` with control and format characters (and backslashes) escaped, cut to
    a length that fits any log line or audit column."""
    out = []
    for char in value:
        if char == "\\" or unicodedata.category(char).startswith("C"):
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(char)
    return "".join(out)[:_SAFE_NAME_CHARS]


def _has_control(value: str) -> bool:
    # Cc (NUL, newline, ESC), Cf (bidi overrides, zero-width), Cs, Co, Cn.
    return any(unicodedata.category(char).startswith("C") for char in value)


def _holder(cert: x509.Certificate) -> Principal:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    units = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    role = str(units[0].value) if len(units) == 1 else ""
    return Principal(
        name=printable(str(names[0].value)) if names else "",
        role=role if role in ROLE_NAMES else UNKNOWN_ROLE,
        certificate_serial=pki.serial_text(cert),
    )


def principal_of(cert: x509.Certificate) -> Principal:
    """Read the principal from a certificate's subject, refusing any name that is
    not in the platform's format. Checks nothing about who issued it."""
    holder = _holder(cert)
    for rdn in cert.subject.rdns:
        attribute = next(iter(rdn))
        if len(rdn) != 1 or attribute.oid not in _ATTRIBUTES:
            raise CertificateRefused(
                "the client certificate's subject has an attribute the platform does not issue",
                reason="CERTIFICATE_NAME_INVALID",
                holder=holder,
                metadata={"attribute": attribute.oid.dotted_string},
            )
        if _has_control(str(attribute.value)):
            raise CertificateRefused(
                "a name in the client certificate holds a control character",
                reason="CERTIFICATE_NAME_INVALID",
                holder=holder,
                metadata={"attribute": _SHORT[attribute.oid]},
            )
    for oid, (low, high) in _ATTRIBUTES.items():
        count = len(cert.subject.get_attributes_for_oid(oid))
        if not low <= count <= high:
            raise CertificateRefused(
                "the client certificate does not name exactly one principal and one role",
                reason="UNAUTHENTICATED",
                holder=holder,
                metadata={"attribute": _SHORT[oid]},
            )
    values = {attribute.oid: str(attribute.value) for rdn in cert.subject.rdns for attribute in rdn}
    if values[NameOID.ORGANIZATION_NAME] != pki.ORGANIZATION:
        raise CertificateRefused(
            "the client certificate does not name the platform as its organization",
            reason="CERTIFICATE_NAME_INVALID",
            holder=holder,
            metadata={"attribute": "O"},
        )
    role = values[NameOID.ORGANIZATIONAL_UNIT_NAME]
    if role not in ROLE_NAMES:
        raise CertificateRefused(
            "the client certificate carries no known role", reason="UNAUTHENTICATED", holder=holder
        )
    for oid in (NameOID.COMMON_NAME, NameOID.ORGANIZATION_IDENTIFIER):
        if oid in values and not pki.PRINCIPAL_NAME.match(values[oid]):
            raise CertificateRefused(
                "a name in the client certificate is not a plain name"
                " (1-63 lowercase letters, digits, '.' or '-')",
                reason="CERTIFICATE_NAME_INVALID",
                holder=holder,
                metadata={"attribute": _SHORT[oid]},
            )
    try:
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is None or x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH not in usage:
        raise CertificateRefused(
            "the certificate is not a client certificate", reason="UNAUTHENTICATED", holder=holder
        )
    return Principal(
        name=values[NameOID.COMMON_NAME],
        role=role,
        certificate_serial=holder.certificate_serial,
        organization=values.get(NameOID.ORGANIZATION_IDENTIFIER, ""),
    )


def principal_from_pem(data: bytes) -> Principal:
    """The principal named by the first certificate of a PEM file (see principal_of)."""
    return principal_of(x509.load_pem_x509_certificate(data))


VERDICTS_KEPT = 20_000
"""Chain verdicts an Issuers keeps (each a digest and a Principal, under 1 KB)."""


class Issuers:
    """The issuing CAs whose client certificates a server accepts, and the check of
    each peer's chain against them.

    Several CAs of one purpose may be trusted at once: while an issuing CA is
    rotated, certificates of the old and the new one both work (docs/pki.md)."""

    def __init__(self, root: x509.Certificate, issuing: Iterable[x509.Certificate]) -> None:
        self.root = root
        self._root_der = root.public_bytes(serialization.Encoding.DER)
        self._by_der: dict[bytes, tuple[x509.Certificate, pki.Purpose]] = {}
        for ca in issuing:
            purpose = pki.Purpose.of(ca)
            if purpose is None or purpose is pki.Purpose.SERVERS:
                raise pki.PkiError(f"{ca.subject.rfc4514_string()} issues no client certificates")
            try:
                ca.verify_directly_issued_by(root)
            except (ValueError, TypeError, InvalidSignature):
                raise pki.PkiError(
                    f"{ca.subject.rfc4514_string()} is not signed by the root CA"
                ) from None
            self._by_der[ca.public_bytes(serialization.Encoding.DER)] = (ca, purpose)
        if not self._by_der:
            raise pki.PkiError("no issuing CA of client certificates is configured")
        # Every device reconnects (connection age, network changes) all day: the
        # verdict of a chain is kept by the digest of what the peer presented (its
        # certificate and chain, whole), for a fleet's worth of certificates. A
        # refusal is never kept; revocation is checked on every call, after this.
        self._verdicts: OrderedDict[bytes, Principal] = OrderedDict()

    @classmethod
    def from_files(cls, root_path: Path, issuers_path: Path) -> Issuers:
        root = x509.load_pem_x509_certificate(root_path.read_bytes())
        return cls(root, pki.load_certificates(issuers_path.read_bytes()))

    @property
    def certificates(self) -> list[x509.Certificate]:
        return [ca for ca, _ in self._by_der.values()]

    def principal(self, auth_context: Mapping[str, Iterable[bytes]]) -> Principal:
        """The principal of a call, from the peer's certificate and chain as the TLS
        layer verified and grpc exposes them."""
        leaves = list(auth_context.get("x509_pem_cert", ()))
        if not leaves:
            raise errors.Unauthenticated(
                "a client certificate from the platform's PKI is required",
                reason="UNAUTHENTICATED",
            )
        leaf_pem = leaves[0]
        chain_pem = b"".join(auth_context.get("x509_pem_cert_chain", ()))
        key = hashlib.sha256(b"%d:%b%b" % (len(leaf_pem), leaf_pem, chain_pem)).digest()
        verdicts = self._verdicts
        principal = verdicts.get(key)
        if principal is not None:
            verdicts.move_to_end(key)
            return principal
        principal = self._check(leaf_pem, chain_pem)
        verdicts[key] = principal
        if len(verdicts) > VERDICTS_KEPT:
            verdicts.popitem(last=False)
        return principal

    def _check(self, leaf_pem: bytes, chain_pem: bytes) -> Principal:
        leaf = x509.load_pem_x509_certificate(leaf_pem)
        holder = _holder(leaf)
        leaf_der = leaf.public_bytes(serialization.Encoding.DER)
        chain = [
            c.public_bytes(serialization.Encoding.DER) for c in pki.load_certificates(chain_pem)
        ]
        presented = [der for der in chain if der not in (leaf_der, self._root_der)]
        found = self._by_der.get(presented[0]) if len(presented) == 1 else None
        if found is None:
            raise CertificateRefused(
                "the client certificate must be issued directly by one of the platform's "
                "issuing CAs, and presented with that CA's certificate alone",
                reason="CERTIFICATE_CHAIN_INVALID",
                holder=holder,
                metadata={"certificate_serial": holder.certificate_serial},
            )
        ca, purpose = found
        try:
            leaf.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            raise CertificateRefused(
                "the client certificate is not signed by the issuing CA it was presented with",
                reason="CERTIFICATE_CHAIN_INVALID",
                holder=holder,
                metadata={"certificate_serial": holder.certificate_serial},
            ) from None
        principal = principal_of(leaf)
        if not purpose.may_issue(principal.role):
            raise CertificateRefused(
                f"the {purpose.value} CA does not issue {principal.role} certificates",
                reason="CERTIFICATE_WRONG_ISSUER",
                holder=holder,
                metadata={"issuer_purpose": purpose.value, "role": principal.role},
            )
        return dataclasses.replace(principal, issuer_serial=pki.serial_text(ca))


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
