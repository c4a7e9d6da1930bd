"""The platform's own certificate authority.

Every principal (device, officer, front-end system) authenticates with a client
certificate issued here. The certificate carries the principal's name in the
subject common name and its role in the organizational unit; the servers trust
nothing else about a caller. Servers get certificates from the same CA, valid for
the host names they are reached by.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.kernel.atomic_files import write_private, write_public

ORGANIZATION = "Stop COVID platform"
CA_VALIDITY = dt.timedelta(days=3650)
LEAF_VALIDITY = dt.timedelta(days=397)


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, both PEM."""

    certificate_pem: bytes
    private_key_pem: bytes


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class CertificateAuthority:
    """Issues client and server certificates; holds the CA key in memory only."""

    def __init__(self, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.certificate = certificate
        self._key = key

    @classmethod
    def create(cls, name: str = "Stop COVID platform CA") -> CertificateAuthority:
        key = _new_key()
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                x509.NameAttribute(NameOID.COMMON_NAME, name),
            ]
        )
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def load(cls, directory: Path) -> CertificateAuthority:
        cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("the CA key must be an EC key")
        return cls(cert, key)

    @classmethod
    def load_or_create(cls, directory: Path) -> CertificateAuthority:
        if (directory / "ca.pem").exists():
            return cls.load(directory)
        ca = cls.create()
        write_private(directory / "ca.key", _key_pem(ca._key))
        write_public(directory / "ca.pem", ca.certificate_pem)
        return ca

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def _leaf(
        self,
        subject: x509.Name,
        public_key: ec.EllipticCurvePublicKey,
        usage: x509.ObjectIdentifier,
        sans: list[x509.GeneralName],
        validity: dt.timedelta,
    ) -> x509.Certificate:
        now = _now()
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), False
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(self._key, hashes.SHA256())

    def issue_client(
        self,
        principal: str,
        role: str,
        public_key: ec.EllipticCurvePublicKey | None = None,
        validity: dt.timedelta = LEAF_VALIDITY,
    ) -> Issued:
        """A client certificate for `principal` with `role` (a Role enum name).

        With `public_key` (from a device's signing request) no private key is made
        and the returned `private_key_pem` is empty.
        """
        key = None if public_key is not None else _new_key()
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                x509.NameAttribute(NameOID.COMMON_NAME, principal),
            ]
        )
        pub = public_key if public_key is not None else key.public_key()  # type: ignore[union-attr]
        cert = self._leaf(subject, pub, ExtendedKeyUsageOID.CLIENT_AUTH, [], validity)
        return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key) if key else b"")

    def issue_server(self, hosts: list[str], validity: dt.timedelta = LEAF_VALIDITY) -> Issued:
        """A server certificate valid for the given DNS names and IP addresses."""
        key = _new_key()
        sans: list[x509.GeneralName] = []
        for host in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                x509.NameAttribute(NameOID.COMMON_NAME, hosts[0]),
            ]
        )
        cert = self._leaf(
            subject, key.public_key(), ExtendedKeyUsageOID.SERVER_AUTH, sans, validity
        )
        return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def write_issued(directory: Path, name: str, issued: Issued) -> tuple[Path, Path]:
    """Store `<name>.key` and then `<name>.pem` in `directory`, each atomically;
    return their paths. The certificate last: its presence means both are there."""
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    write_private(key_path, issued.private_key_pem)
    write_public(cert_path, issued.certificate_pem)
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


def csr_public_key(pem: bytes) -> ec.EllipticCurvePublicKey:
    """The public key of a PEM certificate signing request, after checking it.

    The request's signature must verify with its own key: that proves the sender
    holds the private key, so nobody obtains a certificate for a key they do not
    control. Only EC keys on ACCEPTED_CURVES are taken. The request's subject and
    extensions are ignored on purpose: the CA alone decides the principal and role
    a certificate names.
    """
    if len(pem) > MAX_CSR_PEM_BYTES:
        raise CsrRefused(f"the signing request is larger than {MAX_CSR_PEM_BYTES} bytes")
    try:
        csr = x509.load_pem_x509_csr(pem)
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
