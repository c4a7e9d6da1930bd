"""One-time codes that prove a person holds a phone number (EnrollPerson's two
steps, services/checkin/enrollment.py; table enrollment_challenges, migration
0016).

A code is 6 random digits. It is sent to the number and never stored: the
challenge row keeps HMAC(code key, verification id | phone blind index | code),
where the code key is derived from the blind-index key, so a stolen table (or
backup) names neither the code nor the number, and a hash of one challenge does
not verify another's code. Codes are compared in constant time.

The code goes straight from the CheckIn server to the configured SMS sender
(services/kernel/senders.py: the file sender by default, an HTTP gateway, or a custom
one), not through the notification outbox: a code is worth something for
minutes, the outbox retries for hours, and the front-end waiting with the person
needs to know now whether it left (UNAVAILABLE otherwise, the same for every
number). The verification id is the sender's message id, so a resend is
recognised.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import secrets
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio
from stopcovid.checkin.v1 import checkin_service_pb2 as pb

from services.domain.text import sms
from services.kernel import errors
from services.kernel.config import Settings
from services.kernel.db import load_queries
from services.kernel.senders import SendError, make_sender

Q = load_queries(Path(__file__).with_name("verification.sql"))

CODE_DIGITS = 6
CODE = re.compile(r"^[0-9]{6}$")
_CODE_KEY_LABEL = b"stopcovid enrollment code v1"


def new_code() -> str:
    return f"{secrets.randbelow(10**CODE_DIGITS):0{CODE_DIGITS}d}"


def code_key(blind_key: bytes) -> bytes:
    """The key codes are hashed under: derived, so it is not the blind index's."""
    return hmac.new(blind_key, _CODE_KEY_LABEL, hashlib.sha256).digest()


def code_hash(key: bytes, verification_id: uuid.UUID, phone_index: bytes, code: str) -> bytes:
    return hmac.new(
        key, verification_id.bytes + phone_index + code.encode(), hashlib.sha256
    ).digest()


def matches(
    key: bytes,
    verification_id: uuid.UUID,
    phone_index: bytes,
    code: str,
    *,
    stored_index: bytes,
    stored_hash: bytes,
) -> bool:
    """The code is the challenge's and the number is the one it was sent to, both
    compared in constant time (and both always compared)."""
    same_code = hmac.compare_digest(code_hash(key, verification_id, phone_index, code), stored_hash)
    same_number = hmac.compare_digest(phone_index, stored_index)
    return same_code & same_number


def text(code: str, ttl_s: float) -> str:
    """The SMS: Khmer first, then English (UCS-2 for both, since Khmer needs it)."""
    minutes = max(1, int(ttl_s // 60))
    km_minutes = str(minutes).translate(_KHMER_DIGITS)
    return (
        f"Stop COVID៖ លេខកូដរបស់អ្នកគឺ {code}។ ប្រើបានក្នុង {km_minutes} នាទី។ "
        "កុំប្រាប់នរណាម្នាក់។\n"
        f"Your Stop COVID code is {code}. It works for {minutes} minutes. Do not share it."
    )


_KHMER_DIGITS = str.maketrans("0123456789", "០១២៣៤៥៦៧៨៩")

MAX_SEGMENTS = 3
"""The code's SMS always fits this many UCS-2 segments (tests check every TTL)."""


def segments(ttl_s: float) -> int:
    return sms.size(text("0" * CODE_DIGITS, ttl_s)).segments


class CodeSender:
    """Sends codes through the platform's sender, from the CheckIn server's asyncio
    loop: the senders are trio code (they run in the workers), so each send runs
    them in a trio loop on a thread of its own."""

    def __init__(self, settings: Settings) -> None:
        self._sender = make_sender(settings)

    async def send(self, verification_id: uuid.UUID, phone: str, message: str) -> None:
        try:
            await asyncio.to_thread(trio.run, self._sender.send, verification_id, phone, message)
        except SendError:
            raise errors.Unavailable(
                "the SMS gateway did not accept the code; ask for a code again"
            ) from None


_SENT_CODE = re.compile(r"(?<![0-9])[0-9]{6}(?![0-9])")


def code_in_file(path: Path, verification_id: str) -> str | None:
    """The code the file sender wrote to `path` for `verification_id`, or None: how
    the dev stack (`up`, the simulator) and the tests read the codes a person would
    get by SMS. Only where the sender is the file sender, of course."""
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return None
    for raw in reversed(lines):
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if isinstance(line, dict) and line.get("notification_id") == verification_id:
            found = _SENT_CODE.search(str(line.get("text", "")))
            return found.group() if found else None
    return None


async def enroll_reading_codes(
    enroll: Callable[[pb.EnrollPersonRequest], Awaitable[pb.EnrollPersonResponse]],
    request: pb.EnrollPersonRequest,
    codes_file: Path,
) -> pb.EnrollPersonResponse:
    """EnrollPerson in its two steps, for the dev stack and synthetic people: the code
    is read from the file sender's `codes_file` (the server wrote it there before it
    answered). SystemExit when the code is not there (another sender, another file)."""
    answer = await enroll(request)
    if answer.state != pb.ENROLLMENT_STATE_CODE_SENT:
        return answer
    code = code_in_file(codes_file, answer.verification_id)
    if code is None:
        raise SystemExit(
            f"no enrollment code in {codes_file}: the CheckIn server must use the file "
            "sender (STOPCOVID_NOTIFY_SENDER=file) with this STOPCOVID_NOTIFY_FILE"
        )
    return await enroll(second_step(request, answer.verification_id, code))


def second_step(
    request: pb.EnrollPersonRequest, verification_id: str, code: str
) -> pb.EnrollPersonRequest:
    """The first step's request again, with the challenge and its code."""
    second = pb.EnrollPersonRequest()
    second.CopyFrom(request)
    second.verification_id = verification_id
    second.verification_code = code
    return second
