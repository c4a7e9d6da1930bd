"""Certificates the platform's CAs would never issue, signed with their keys as an
attacker holding a key could: for the tests that the servers refuse them."""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.kernel import pki


def subject(
    cn: str, role: str = "ROLE_AUDITOR", *extra: tuple[x509.ObjectIdentifier, str]
) -> x509.Name:
    """O=<platform>, OU=role, any extra attributes, CN=cn: each its own RDN."""
    attributes = [
        (NameOID.ORGANIZATION_NAME, pki.ORGANIZATION),
        (NameOID.ORGANIZATIONAL_UNIT_NAME, role),
        *extra,
        (NameOID.COMMON_NAME, cn),
    ]
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in attributes])


def leaf(
    issuer: pki.Authority,
    name: x509.Name,
    *,
    sans: list[x509.GeneralName] | None = None,
    usage: x509.ObjectIdentifier = ExtendedKeyUsageOID.CLIENT_AUTH,
    chain: tuple[pki.Authority, ...] = (),
) -> pki.Issued:
    """A client certificate with `name`, signed by `issuer`'s key whatever its
    purpose; `chain` are the CAs presented after `issuer` (default: none but it).
    Its alternative name is `name` again, as the platform's (`sans=[]`: none)."""
    key = ec.generate_private_key(ec.SECP256R1())
    if sans is None:
        sans = [x509.DirectoryName(name)]
    builder = (
        issuer._builder(name, key.public_key(), dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(issuer.private_key, hashes.SHA384())
    presented = pki.pem(cert) + issuer.certificate_pem + b"".join(c.certificate_pem for c in chain)
    return pki.Issued(pki.pem(cert), presented, pki.key_pem(key))


def sub_ca(
    issuer: pki.Authority, cn: str = "Rogue sub-CA", path_length: int | None = None
) -> pki.Authority:
    """A CA certificate signed with `issuer`'s key: what someone holding that key
    could make. No purpose policy, so the servers' chain check cannot take it for one
    of theirs even if it were presented alone."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, pki.ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )
    cert = (
        issuer._builder(name, key.public_key(), dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(issuer.private_key, hashes.SHA384())
    )
    return pki.Authority(cert, key)
