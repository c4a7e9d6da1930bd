"""The platform's certificate hierarchy: an offline root, one issuing CA per
purpose, and the certificates they issue.

    root CA                 offline; path length 1; signs issuing CAs only
    +-- devices CA          held by the Venue servers; path length 0; client
    |     |                 authentication only; names permitted: only
    |     |                 O=<platform>, OU=ROLE_DEVICE
    |     +-- one certificate per scanner device (CN = device id)
    +-- staff CA            held by the ministry's PKI operators; path length 0;
    |     |                 client authentication only; names permitted:
    |     |                 O=<platform>, excluded: O=<platform>, OU=ROLE_DEVICE
    |     +-- officers' and front-ends' certificates (CN = principal name)
    +-- servers CA          held by the PKI operators; path length 0; server
          |                 authentication only
          +-- the gRPC servers' certificates (SAN = their host names)

Path length, key usage, extended key usage and name constraints are enforced by
the TLS library in the handshake, except on the root (BoringSSL, inside grpcio,
ignores a trust anchor's path length). The servers therefore also check every
chain themselves (services/kernel/auth.py): the leaf must be signed by one of the
issuing CAs they are configured with, and that CA's purpose, which `Purpose.of`
reads from its constraints, must issue the leaf's role. (A certificate policy
OID would say the purpose too, but an unregistered one means a 2.25.<UUID> arc,
which Go's X.509 parser, in grpcurl and Go clients, refuses.)

A client certificate's subject is, in this order:

    O=Stop COVID platform, OU=<role>, [organizationIdentifier=<organisation>], CN=<principal>

O is always the platform (the devices CA's name constraint is that prefix). The
organisation a principal acts for (a venue owner, a hospital's front-end) is
reserved for the X.520 organizationIdentifier attribute; nothing issues it yet.
Clients present their certificate followed by the issuing CA's (the `chain_pem`
of `Issued`); the servers and clients trust the root alone.
"""

from __future__ import annotations

import datetime as dt
import enum
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from stopcovid.common.v1 import auth_pb2

from services.kernel.atomic_files import write_private, write_public

ORGANIZATION = "Stop COVID platform"
ROOT_VALIDITY = dt.timedelta(days=15 * 365)
ISSUING_VALIDITY = dt.timedelta(days=5 * 365)
LEAF_VALIDITY = dt.timedelta(days=397)
_BACKDATE = dt.timedelta(minutes=5)  # tolerate clocks a little behind the issuer's

DEVICE_ROLE = "ROLE_DEVICE"
CLIENT_ROLES = frozenset(auth_pb2.Role.keys()) - {"ROLE_UNSPECIFIED"}

PRINCIPAL_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{0,62}$")
"""What a principal (CN) or organisation name may be: a device id, `moh-tracer-01`."""


class Purpose(enum.Enum):
    """What an issuing CA is for: its extended key usage and name constraints say
    it, and the servers' chain check maps it to the roles it may issue."""

    DEVICES = "devices"
    STAFF = "staff"
    SERVERS = "servers"

    @property
    def stem(self) -> str:
        """File name stem of this CA's certificate and key: `devices-ca`."""
        return f"{self.value}-ca"

    def may_issue(self, role: str) -> bool:
        """Whether a client certificate of `role` from a CA of this purpose is valid."""
        if self is Purpose.DEVICES:
            return role == DEVICE_ROLE
        if self is Purpose.STAFF:
            return role in CLIENT_ROLES and role != DEVICE_ROLE
        return False

    @property
    def usage(self) -> x509.ObjectIdentifier:
        """The one extended key usage of this CA and of what it issues."""
        if self is Purpose.SERVERS:
            return ExtendedKeyUsageOID.SERVER_AUTH
        return ExtendedKeyUsageOID.CLIENT_AUTH

    @property
    def name_constraints(self) -> x509.NameConstraints | None:
        platform = x509.DirectoryName(_name((NameOID.ORGANIZATION_NAME, ORGANIZATION)))
        devices = x509.DirectoryName(
            _name(
                (NameOID.ORGANIZATION_NAME, ORGANIZATION),
                (NameOID.ORGANIZATIONAL_UNIT_NAME, DEVICE_ROLE),
            )
        )
        if self is Purpose.DEVICES:
            return x509.NameConstraints(permitted_subtrees=[devices], excluded_subtrees=None)
        if self is Purpose.STAFF:
            return x509.NameConstraints(permitted_subtrees=[platform], excluded_subtrees=[devices])
        return None

    @classmethod
    def of(cls, certificate: x509.Certificate) -> Purpose | None:
        """The purpose of an issuing CA made by `Authority.create_issuing`, exactly:
        None for a root, a leaf, or any CA of another profile."""
        extensions = certificate.extensions
        try:
            basic = extensions.get_extension_for_class(x509.BasicConstraints).value
            usage = list(extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        except x509.ExtensionNotFound:
            return None
        if not basic.ca or basic.path_length != 0 or certificate.issuer == certificate.subject:
            return None
        try:
            constraints: x509.NameConstraints | None = extensions.get_extension_for_class(
                x509.NameConstraints
            ).value
        except x509.ExtensionNotFound:
            constraints = None
        for purpose in cls:
            if usage == [purpose.usage] and constraints == purpose.name_constraints:
                return purpose
        return None


class PkiError(ValueError):
    """A certificate that must not be made, or CA material that cannot be used. The
    message says which and why, for an operator."""


class KeyEncrypted(PkiError):
    """A CA key is encrypted and no (or the wrong) passphrase was given."""


@dataclass(frozen=True)
class Issued:
    """A certificate, the chain a client or server presents, and the private key."""

    certificate_pem: bytes
    """The certificate alone."""
    chain_pem: bytes
    """The certificate followed by its issuing CA's: what a TLS peer presents."""
    private_key_pem: bytes
    """PEM PKCS#8; empty when the certificate was issued for someone else's key."""

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.certificate_pem)

    @property
    def serial(self) -> str:
        return serial_text(self.certificate)


def serial_text(certificate: x509.Certificate) -> str:
    """A serial number as the platform writes it everywhere: lowercase hex."""
    return f"{certificate.serial_number:x}"


def pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey, passphrase: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _name(*attributes: tuple[x509.ObjectIdentifier, str]) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in attributes])


def client_subject(principal: str, role: str, organization: str | None = None) -> x509.Name:
    """The subject of a client certificate, in the order the module docstring gives."""
    attributes = [
        (NameOID.ORGANIZATION_NAME, ORGANIZATION),
        (NameOID.ORGANIZATIONAL_UNIT_NAME, role),
    ]
    if organization is not None:
        attributes.append((NameOID.ORGANIZATION_IDENTIFIER, organization))
    attributes.append((NameOID.COMMON_NAME, principal))
    return _name(*attributes)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """A CA signs certificates (and would sign CRLs); a leaf signs TLS handshakes."""
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


class Authority:
    """A CA certificate and its private key: the root, or an issuing CA.

    The root signs issuing CAs and nothing else; an issuing CA signs only the
    certificates of its purpose. Keys stay in memory; `save` writes them owner-only.
    """

    def __init__(self, certificate: x509.Certificate, private_key: ec.EllipticCurvePrivateKey):
        basic = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
        if not basic.ca:
            raise PkiError("the certificate is not a CA certificate")
        if certificate.public_key() != private_key.public_key():
            raise PkiError("the CA key does not belong to the CA certificate")
        self.certificate = certificate
        self.private_key = private_key
        self.purpose = Purpose.of(certificate)
        self.is_root = certificate.issuer == certificate.subject and self.purpose is None

    # -- making and keeping CAs ------------------------------------------------

    @classmethod
    def create_root(cls, name: str = "Stop COVID root CA") -> Authority:
        key = ec.generate_private_key(ec.SECP384R1())
        subject = _name((NameOID.ORGANIZATION_NAME, ORGANIZATION), (NameOID.COMMON_NAME, name))
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + ROOT_VALIDITY)
            # One issuing CA below, never more: the servers enforce it themselves,
            # since the TLS library ignores a root's path length.
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA384())
        )
        return cls(cert, key)

    def create_issuing(
        self, purpose: Purpose, validity: dt.timedelta = ISSUING_VALIDITY
    ) -> Authority:
        """A new issuing CA of `purpose`, signed by this root."""
        if not self.is_root:
            raise PkiError("only the root CA signs issuing CAs")
        key = ec.generate_private_key(ec.SECP384R1())
        generation = x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest[:2].hex()
        subject = _name(
            (NameOID.ORGANIZATION_NAME, ORGANIZATION),
            (NameOID.COMMON_NAME, f"Stop COVID {purpose.value} CA {generation}"),
        )
        builder = self._builder(subject, key.public_key(), validity).add_extension(
            x509.BasicConstraints(ca=True, path_length=0), critical=True
        )
        builder = (
            builder.add_extension(_key_usage(ca=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([purpose.usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        )
        constraints = purpose.name_constraints
        if constraints is not None:
            # Enforced by the TLS library against every leaf: a devices CA key,
            # even stolen from a Venue server, cannot sign another role's subject,
            # nor the staff CA's a device's.
            builder = builder.add_extension(constraints, critical=True)
        return Authority(builder.sign(self.private_key, hashes.SHA384()), key)

    @classmethod
    def load(cls, cert_path: Path, key_path: Path, passphrase: bytes | None = None) -> Authority:
        """Read a CA from its PEM files. Raises OSError for a missing file and
        PkiError for unusable content (an encrypted key without its passphrase)."""
        cert_bytes, key_bytes = cert_path.read_bytes(), key_path.read_bytes()
        try:
            cert = x509.load_pem_x509_certificate(cert_bytes)
            key = serialization.load_pem_private_key(key_bytes, passphrase)
        except TypeError:
            raise KeyEncrypted(f"{key_path.name} is encrypted: its passphrase is needed") from None
        except ValueError as exc:
            if passphrase is not None and b"ENCRYPTED" in key_bytes:
                raise KeyEncrypted(f"the passphrase of {key_path.name} is wrong") from None
            raise PkiError(f"{cert_path.name} or {key_path.name} cannot be read: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError(f"{key_path.name} is not an EC key")
        return cls(cert, key)

    def save(self, directory: Path, stem: str, passphrase: bytes | None = None) -> Path:
        """Write `<stem>.pem` and `<stem>.key` (owner-only); refuse to overwrite a key."""
        key_path = directory / f"{stem}.key"
        if key_path.exists():
            raise PkiError(f"{key_path} exists; a CA key is never overwritten")
        write_private(key_path, key_pem(self.private_key, passphrase))
        write_public(directory / f"{stem}.pem", self.certificate_pem)
        return key_path

    @property
    def certificate_pem(self) -> bytes:
        return pem(self.certificate)

    @property
    def not_valid_after(self) -> dt.datetime:
        return self.certificate.not_valid_after_utc

    # -- issuing ---------------------------------------------------------------

    def _builder(
        self, subject: x509.Name, public_key: ec.EllipticCurvePublicKey, validity: dt.timedelta
    ) -> x509.CertificateBuilder:
        now = _now()
        # Never beyond the issuer: a certificate that outlives its CA stops verifying.
        not_after = min(now + validity, self.not_valid_after)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(not_after)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.private_key.public_key()),
                False,
            )
        )

    def _leaf(
        self,
        subject: x509.Name,
        public_key: ec.EllipticCurvePublicKey,
        sans: list[x509.GeneralName],
        validity: dt.timedelta,
    ) -> x509.Certificate:
        assert self.purpose is not None
        builder = (
            self._builder(subject, public_key, validity)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([self.purpose.usage]), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(self.private_key, hashes.SHA384())

    def _issued(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None) -> Issued:
        leaf = pem(cert)
        return Issued(leaf, leaf + self.certificate_pem, key_pem(key) if key else b"")

    def issue_client(
        self,
        principal: str,
        role: str,
        public_key: ec.EllipticCurvePublicKey | None = None,
        validity: dt.timedelta = LEAF_VALIDITY,
        organization: str | None = None,
    ) -> Issued:
        """A client certificate for `principal` with `role` (a Role enum name).

        With `public_key` (from a signing request) no private key is made and the
        returned `private_key_pem` is empty. Refused unless this CA's purpose issues
        `role`, and unless the names are plain (PRINCIPAL_NAME)."""
        if self.purpose is None or not self.purpose.may_issue(role):
            raise PkiError(f"the {self._label} does not issue {role} certificates")
        for value in (principal, organization):
            if value is not None and not PRINCIPAL_NAME.match(value):
                raise PkiError("names must be 1-63 lowercase letters, digits, '.' or '-'")
        key = None if public_key is not None else ec.generate_private_key(ec.SECP256R1())
        subject_key = public_key if public_key is not None else key.public_key()  # type: ignore[union-attr]
        subject = client_subject(principal, role, organization)
        # Under a name constraint the TLS library wants a subject alternative name
        # on the leaf (else it would read the CN as a host name); the subject again,
        # which the constraint then checks a second time, is the honest one.
        cert = self._leaf(subject, subject_key, [x509.DirectoryName(subject)], validity)
        return self._issued(cert, key)

    def issue_server(self, hosts: list[str], validity: dt.timedelta = LEAF_VALIDITY) -> Issued:
        """A server certificate valid for the given DNS names and IP addresses."""
        if self.purpose is not Purpose.SERVERS:
            raise PkiError(f"the {self._label} does not issue server certificates")
        if not hosts:
            raise PkiError("a server certificate needs at least one host name")
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = []
        for host in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        subject = _name((NameOID.ORGANIZATION_NAME, ORGANIZATION), (NameOID.COMMON_NAME, hosts[0]))
        return self._issued(self._leaf(subject, key.public_key(), sans, validity), key)

    def renew(
        self,
        old: x509.Certificate,
        public_key: ec.EllipticCurvePublicKey | None = None,
        validity: dt.timedelta = LEAF_VALIDITY,
    ) -> Issued:
        """A new certificate with `old`'s subject and names, a new serial and (unless
        `public_key` is given) a new key. The caller checks `old` is still good."""
        if self.purpose is Purpose.SERVERS:
            sans = old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            hosts = [str(n.value) for n in sans]
            return self.issue_server(hosts, validity)
        role, principal, organization = _client_names(old)
        return self.issue_client(principal, role, public_key, validity, organization)

    @property
    def _label(self) -> str:
        return "root CA" if self.purpose is None else f"{self.purpose.value} CA"


def _client_names(cert: x509.Certificate) -> tuple[str, str, str | None]:
    def one(oid: x509.ObjectIdentifier) -> str | None:
        values = cert.subject.get_attributes_for_oid(oid)
        return str(values[0].value) if len(values) == 1 else None

    role, principal = one(NameOID.ORGANIZATIONAL_UNIT_NAME), one(NameOID.COMMON_NAME)
    if role is None or principal is None:
        raise PkiError("the certificate names no single principal and role")
    return role, principal, one(NameOID.ORGANIZATION_IDENTIFIER)


def load_certificates(data: bytes) -> list[x509.Certificate]:
    """Every certificate of a PEM bundle, in order."""
    return x509.load_pem_x509_certificates(data) if data.strip() else []


def write_issued(directory: Path, name: str, issued: Issued) -> tuple[Path, Path]:
    """Store `<name>.key` and then `<name>.pem` (the chain a peer presents) in
    `directory`, each atomically; return their paths. The certificate last: its
    presence means both are there."""
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    directory.mkdir(parents=True, exist_ok=True)
    write_private(key_path, issued.private_key_pem)
    write_public(cert_path, issued.chain_pem)
    return cert_path, key_path


# -- device signing requests ---------------------------------------------------

MAX_CSR_PEM_BYTES = 16 * 1024
"""A P-384 request with a long subject is under 1 KiB; anything far bigger is not one."""

ACCEPTED_CSR_CURVES: tuple[type[ec.EllipticCurve], ...] = (ec.SECP256R1, ec.SECP384R1)
"""Curves a device key may use: what every TLS stack the devices run supports, and
what `issue_client` signs for."""


class CsrRefused(ValueError):
    """A certificate signing request that cannot be used. The message says why and
    contains nothing from the request itself."""


def csr_public_key(data: bytes) -> ec.EllipticCurvePublicKey:
    """The public key of a PEM certificate signing request, after checking it.

    The request's signature must verify with its own key: that proves the sender
    holds the private key, so nobody obtains a certificate for a key they do not
    control. Only EC keys on ACCEPTED_CURVES are taken. The request's subject and
    extensions are ignored on purpose: the CA alone decides the principal and role
    a certificate names.
    """
    if len(data) > MAX_CSR_PEM_BYTES:
        raise CsrRefused(f"the signing request is larger than {MAX_CSR_PEM_BYTES} bytes")
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError:
        raise CsrRefused("not a PEM certificate signing request") from None
    try:
        key = csr.public_key()
        signed = csr.is_signature_valid
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise CsrRefused("the signing request uses an unsupported key or signature") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(
        key.curve, ACCEPTED_CSR_CURVES
    ):
        raise CsrRefused("the signing request's key must be an EC key on P-256 or P-384")
    if not signed:
        raise CsrRefused("the signing request's signature does not verify with its key")
    return key
