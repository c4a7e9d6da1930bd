"""Personal QR tokens and signed venue codes.

Personal tokens are checked at the door on every scan, so they use symmetric
cryptography only (an Ed25519 verify costs ~140 us here; this costs a few):
AES-SIV (RFC 5297), a deterministic authenticated encryption whose S2V tag is a
CMAC over the header and the person id. The tag is the token's MAC, as an HMAC
would be, and the id is also hidden, so a venue that scans a rotating token
cannot link it to the same person's code of another window.

    S1.<kid>.<base64url(SIV(person_id; ad = "S1.<kid>"))>              static card
    R1.<kid>.<base64url(window u32 || SIV(person_id; ad = "R1.<kid>", window))>

A rotating token is valid in its time window and one window either side (clock
drift, a code shown just before it changed), judged by the scan time, and only if
the server received the scan within an allowance for offline buffering after the
window ended (`PersonalTokens.fresh`): the device's clock alone would let a
photographed code be replayed for days by back-dating the scan.

Base64 is decoded strictly, so every token has exactly one spelling.

Venue codes are printed once and verified only at self check-in, so they are
signed with Ed25519 and can be checked with a public key:

    V1.<kid>.<base64url(venue_id 16 bytes || signature 64 bytes)>
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import struct
import uuid
from dataclasses import dataclass
from enum import Enum

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

MAX_TOKEN_CHARS = 256
MAX_VENUE_CODE_CHARS = 1024


class TokenProblem(Enum):
    """Why a token was refused; names match ScanRejectReason without its prefix."""

    # ruff: noqa: S105 (reason names, not secrets)

    MALFORMED_TOKEN = "MALFORMED_TOKEN"
    BAD_TOKEN_SIGNATURE = "BAD_TOKEN_SIGNATURE"
    UNKNOWN_KEY_ID = "UNKNOWN_KEY_ID"
    TOKEN_EXPIRED = "TOKEN_EXPIRED"
    PERSON_NOT_ENROLLED = "PERSON_NOT_ENROLLED"
    MALFORMED_VENUE_CODE = "MALFORMED_VENUE_CODE"
    BAD_VENUE_SIGNATURE = "BAD_VENUE_SIGNATURE"


class TokenRefused(Exception):
    def __init__(self, problem: TokenProblem) -> None:
        super().__init__(problem.value)
        self.problem = problem


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


_B64_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def _unb64(text: str, problem: TokenProblem = TokenProblem.MALFORMED_TOKEN) -> bytes:
    """Strict unpadded base64url: one spelling per byte string.

    The lenient decoder accepts junk characters, padding and nonzero unused bits,
    so one token would have unlimited spellings, each a new entry in any cache
    keyed by the text. Here anything but the canonical form is refused: the
    alphabet only, no padding, and the text must be what encoding gives back."""
    if not _B64_ALPHABET.issuperset(text) or len(text) % 4 == 1:
        raise TokenRefused(problem)
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise TokenRefused(problem) from None
    if _b64(raw) != text:
        raise TokenRefused(problem)
    return raw


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    person_id: uuid.UUID
    key_id: str
    window: int | None
    """The rotating token's time window; None for a static token."""


class PersonalTokens:
    """Issues and verifies personal tokens with the key store's token keys."""

    def __init__(self, current_kid: str, keys: dict[str, bytes], window_s: int) -> None:
        if current_kid not in keys:
            raise ValueError(f"current token key {current_kid!r} is not among the keys")
        self.current_kid = current_kid
        self.window_s = window_s
        self._siv = {kid: AESSIV(key) for kid, key in keys.items()}

    def window_of(self, at: dt.datetime) -> int:
        return self.window_at(at.timestamp())

    def window_at(self, epoch_s: float) -> int:
        return int(epoch_s // self.window_s)

    def in_window(self, window: int, epoch_s: float) -> bool:
        """Whether a rotating token of `window` is valid at `epoch_s` (one window of grace
        either side)."""
        return abs(window - self.window_at(epoch_s)) <= 1

    def fresh(self, window: int, scan_s: float, receipt_s: float, offline_s: float) -> bool:
        """Whether a rotating token of `window` may be taken for a scan made at `scan_s`
        (the device's clock) and received at `receipt_s` (the server's clock).

        The device's clock alone cannot be trusted: a photographed code replayed
        days later with a back-dated scan time would pass. So the token's window
        must hold the scan time (one window of grace either side) and must also
        have ended no more than `offline_s` before the server received the scan
        (the allowance for scans a device buffered while offline), and not lie
        more than one window ahead of the server's clock."""
        if not self.in_window(window, scan_s):
            return False
        now = self.window_at(receipt_s)
        return window - now <= 1 and (now - window - 1) * self.window_s <= offline_s

    def window_bounds(self, window: int) -> tuple[dt.datetime, dt.datetime]:
        start = dt.datetime.fromtimestamp(window * self.window_s, dt.UTC)
        return start, start + dt.timedelta(seconds=self.window_s)

    def issue_static(self, person_id: uuid.UUID) -> str:
        header = f"S1.{self.current_kid}"
        sealed = self._siv[self.current_kid].encrypt(person_id.bytes, [header.encode()])
        return f"{header}.{_b64(sealed)}"

    def issue_rotating(self, person_id: uuid.UUID, window: int) -> str:
        header = f"R1.{self.current_kid}"
        w = struct.pack(">I", window)
        sealed = self._siv[self.current_kid].encrypt(person_id.bytes, [header.encode(), w])
        return f"{header}.{_b64(w + sealed)}"

    def identify(self, token: str) -> VerifiedToken:
        """The person a genuine token names, whatever its time window; raises
        TokenRefused. Rotating tokens still need `fresh` before they are taken."""
        if not token or len(token) > MAX_TOKEN_CHARS or not token.isascii():
            raise TokenRefused(TokenProblem.MALFORMED_TOKEN)
        parts = token.split(".")
        if len(parts) != 3 or parts[0] not in ("S1", "R1") or not parts[1]:
            raise TokenRefused(TokenProblem.MALFORMED_TOKEN)
        form, kid, body = parts
        raw = _unb64(body)
        siv = self._siv.get(kid)
        rotating = form == "R1"
        if rotating:
            if len(raw) != 4 + 32:
                raise TokenRefused(TokenProblem.MALFORMED_TOKEN)
            w, sealed = raw[:4], raw[4:]
            ad = [f"{form}.{kid}".encode(), w]
        else:
            if len(raw) != 32:
                raise TokenRefused(TokenProblem.MALFORMED_TOKEN)
            sealed, ad = raw, [f"{form}.{kid}".encode()]
        if siv is None:
            raise TokenRefused(TokenProblem.UNKNOWN_KEY_ID)
        try:
            person = siv.decrypt(sealed, ad)
        except InvalidTag:
            raise TokenRefused(TokenProblem.BAD_TOKEN_SIGNATURE) from None
        window = struct.unpack(">I", w)[0] if rotating else None
        return VerifiedToken(uuid.UUID(bytes=person), kid, window)

    def verify(self, token: str, at_epoch_s: float) -> VerifiedToken:
        """The person a token names if it is valid at `at_epoch_s` (a time the caller
        trusts: the server's clock); raises TokenRefused."""
        verified = self.identify(token)
        if verified.window is not None and not self.in_window(verified.window, at_epoch_s):
            raise TokenRefused(TokenProblem.TOKEN_EXPIRED)
        return verified


class VenueCodes:
    """Signs venue codes (Venue service) and verifies them (CheckIn service)."""

    def __init__(
        self,
        public_keys: dict[str, Ed25519PublicKey],
        signing: tuple[str, Ed25519PrivateKey] | None = None,
    ) -> None:
        self._public = public_keys
        self._signing = signing

    @staticmethod
    def _message(kid: str, venue_id: uuid.UUID) -> bytes:
        return f"V1.{kid}.".encode() + venue_id.bytes

    def sign(self, venue_id: uuid.UUID) -> tuple[str, str]:
        """(payload, key id) of a venue's code."""
        if self._signing is None:
            raise RuntimeError("this process holds no venue signing key")
        kid, key = self._signing
        signature = key.sign(self._message(kid, venue_id))
        return f"V1.{kid}.{_b64(venue_id.bytes + signature)}", kid

    def verify(self, code: str) -> uuid.UUID:
        malformed = TokenRefused(TokenProblem.MALFORMED_VENUE_CODE)
        if not code or len(code) > MAX_VENUE_CODE_CHARS or not code.isascii():
            raise malformed
        parts = code.split(".")
        if len(parts) != 3 or parts[0] != "V1" or not parts[1]:
            raise malformed
        _, kid, body = parts
        raw = _unb64(body, TokenProblem.MALFORMED_VENUE_CODE)
        if len(raw) != 16 + 64:
            raise malformed
        venue_id = uuid.UUID(bytes=raw[:16])
        key = self._public.get(kid)
        if key is None:
            raise TokenRefused(TokenProblem.BAD_VENUE_SIGNATURE)
        try:
            key.verify(raw[16:], self._message(kid, venue_id))
        except InvalidSignature:
            raise TokenRefused(TokenProblem.BAD_VENUE_SIGNATURE) from None
        return venue_id
