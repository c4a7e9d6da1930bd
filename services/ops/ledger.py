"""The record of the certificates the PKI operators issued: one PEM file per
certificate, named by its serial, in `<CA directory>/issued/` (as OpenSSL's
`newcerts`). `stopcovid certs list` and `renew` read it; revocations are kept in
the database instead, where every server sees them.

Device certificates are not here: the Venue servers issue them, and the devices
table records each device's current serial.
"""

from __future__ import annotations

from pathlib import Path

from cryptography import x509

from services.kernel import pki


def _directory(ca_dir: Path) -> Path:
    return ca_dir / "issued"


def record(ca_dir: Path, issued: pki.Issued) -> Path:
    """Keep `issued`'s certificate (never its key)."""
    directory = _directory(ca_dir)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / f"{issued.serial}.pem"
    path.write_bytes(issued.certificate_pem)
    return path


def find(ca_dir: Path, serial: str) -> x509.Certificate | None:
    path = _directory(ca_dir) / f"{serial}.pem"
    if not path.is_file():
        return None
    return x509.load_pem_x509_certificate(path.read_bytes())


def every(ca_dir: Path) -> list[x509.Certificate]:
    """Every certificate recorded, oldest first."""
    directory = _directory(ca_dir)
    if not directory.is_dir():
        return []
    found = [x509.load_pem_x509_certificate(p.read_bytes()) for p in directory.glob("*.pem")]
    return sorted(found, key=lambda c: (c.not_valid_before_utc, c.serial_number))
