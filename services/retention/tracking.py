"""A grievance's tracking id and secret.

The tracking id is short ("G-7K3M-Q9XD") and read over the phone: its alphabet has
no 0/O, 1/I/L or U, and letter case does not matter. The secret is derived,
HMAC(blind-index key, "grievance-secret|" + grievance id), from the random
grievance id with a key kept outside the database, and only its SHA-256 is
stored: a database dump cannot answer GetGrievanceStatus, and a FileGrievance
retried with the same request_id can hand the same secret back without it being
stored anywhere. A wrong secret answers NOT_FOUND exactly like an unknown id
(compared in constant time).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import uuid

from services.kernel import errors

ALPHABET = "23456789ABCDEFGHJKMNPQRSTVWXYZ"
_TRACKING = re.compile(rf"^G-[{ALPHABET}]{{4}}-[{ALPHABET}]{{4}}$")
_NOTHING = bytes(32)


def new_tracking_id() -> str:
    chars = [secrets.choice(ALPHABET) for _ in range(8)]
    return f"G-{''.join(chars[:4])}-{''.join(chars[4:])}"


def not_found() -> errors.NotFound:
    """The one answer for an unknown id, a malformed one and a wrong secret."""
    return errors.NotFound("no grievance with this tracking id", metadata={"resource": "grievance"})


def cleaned(value: str, field: str = "tracking_id") -> str | None:
    """The id as stored (upper case, no blanks); None when it is malformed, so
    cannot exist. INVALID_ARGUMENT when it is empty."""
    found = value.strip().upper()
    if not found:
        raise errors.InvalidArgument(f"{field} is required", field=field)
    return found if _TRACKING.match(found) else None


def tracking_id(value: str, field: str = "tracking_id") -> str:
    """A well-formed tracking id; a malformed one answers NOT_FOUND like an unknown one."""
    found = cleaned(value, field)
    if found is None:
        raise not_found()
    return found


def secret_of(blind_index_key: bytes, grievance_id: uuid.UUID) -> str:
    """The complainant's secret of a grievance (hex, 36 characters)."""
    mac = hmac.new(blind_index_key, b"grievance-secret|" + grievance_id.bytes, hashlib.sha256)
    return mac.digest()[:18].hex()


def secret_hash(secret: str) -> bytes:
    """What is stored of a secret."""
    return hashlib.sha256(secret.encode()).digest()


def check_secret(given: str, stored: bytes | None) -> None:
    """NOT_FOUND unless `given` is the secret whose hash is `stored` (None: no such
    grievance). Compared in constant time, and compared even for an unknown id,
    so neither the answer nor its timing tells an unknown id from a wrong secret."""
    matches = hmac.compare_digest(secret_hash(given), stored if stored is not None else _NOTHING)
    if not matches or stored is None:
        raise not_found()
