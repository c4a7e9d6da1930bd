"""Opaque, authenticated page tokens for keyset pagination.

A token holds the last row's sort key, sealed (AES-256-GCM) under the
installation's page-token key (`server/page-tokens` in the key store, shared by
every server, so any instance takes another's token). The sealed data is bound to
the RPC being served, its filters and the calling principal: a token is opaque, no
caller can forge or alter one, and a token reused with other filters, by another
principal or on another RPC does not open and is refused (INVALID_PAGE_TOKEN)
instead of skipping rows or reading another caller's listing.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import os
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from services.kernel import audit, auth, errors

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_TOKEN_CHARS = 1024
_NONCE = 12


class _Key:
    # Until the server sets the installation's key (server.start_server), a key of
    # this process only: tokens then open only where they were made.
    sealer = AESGCM(AESGCM.generate_key(bit_length=256))


def use_key(key: bytes) -> None:
    """Seal and open page tokens with `key` (32 bytes) from now on."""
    _Key.sealer = AESGCM(key)


def page_size(requested: int) -> int:
    if requested < 0 or requested > MAX_PAGE_SIZE:
        raise errors.InvalidArgument(
            f"page_size must be between 0 and {MAX_PAGE_SIZE}", field="page_size"
        )
    return requested or DEFAULT_PAGE_SIZE


def _bound_to(filters: dict[str, Any]) -> bytes:
    """What a token is bound to: the RPC served, the caller and the filters."""
    try:
        method = audit.rpc_action()
    except RuntimeError:
        method = ""
    try:
        who = auth.current_principal()
        caller = [who.name, who.role, who.organization]
    except LookupError:
        caller = []
    return json.dumps([method, caller, filters], sort_keys=True, default=str).encode()


def encode(key: list[Any], filters: dict[str, Any]) -> str:
    nonce = os.urandom(_NONCE)
    body = json.dumps(key, default=str).encode()
    sealed = nonce + _Key.sealer.encrypt(nonce, body, _bound_to(filters))
    return base64.urlsafe_b64encode(sealed).decode().rstrip("=")


def invalid_token() -> errors.InvalidArgument:
    return errors.InvalidArgument(
        "page_token is not valid for this query", reason="INVALID_PAGE_TOKEN", field="page_token"
    )


def decode(token: str, filters: dict[str, Any]) -> list[Any] | None:
    """The sort key after which the page starts; None for the first page."""
    if not token:
        return None
    invalid = invalid_token()
    if len(token) > MAX_TOKEN_CHARS or not token.isascii():
        raise invalid
    try:
        sealed = base64.b64decode(token + "=" * (-len(token) % 4), b"-_", validate=True)
        body = json.loads(_Key.sealer.decrypt(sealed[:_NONCE], sealed[_NONCE:], _bound_to(filters)))
    except (binascii.Error, ValueError, InvalidTag):
        raise invalid from None
    if not isinstance(body, list):
        raise invalid
    return body


def time_and_key(token: str, filters: dict[str, Any]) -> tuple[dt.datetime | None, str | None]:
    """The (time, key) after which a page ordered by a time and a tie-breaking key
    starts; (None, None) for the first page.

    The key is checked even though only a server can seal one: a token sealed by
    an older release may hold another shape, which is INVALID_PAGE_TOKEN, never a
    failure inside the query."""
    after = decode(token, filters)
    if after is None:
        return None, None
    try:
        if len(after) != 2 or not all(isinstance(part, str) for part in after):
            raise ValueError("a page key is two strings")
        time = dt.datetime.fromisoformat(after[0])
        if time.tzinfo is None:
            raise ValueError("a page key's time carries its zone")
    except ValueError:
        raise invalid_token() from None
    return time, after[1]


def int_key(token: str, filters: dict[str, Any]) -> int | None:
    """The integer after which a page ordered by one integer starts; None for the
    first page. Checked like time_and_key: anything else is INVALID_PAGE_TOKEN."""
    after = decode(token, filters)
    if after is None:
        return None
    if len(after) != 1 or not isinstance(after[0], int) or isinstance(after[0], bool):
        raise invalid_token()
    key: int = after[0]
    return key


def time_and_id(token: str, filters: dict[str, Any]) -> tuple[dt.datetime | None, uuid.UUID | None]:
    """time_and_key for pages whose tie-breaker is a UUID."""
    time, key = time_and_key(token, filters)
    if key is None:
        return time, None
    try:
        return time, uuid.UUID(key)
    except ValueError:
        raise invalid_token() from None


def page(
    rows: Sequence[Any], size: int, filters: dict[str, Any], key: Callable[[Any], list[Any]]
) -> tuple[list[Any], str]:
    """A page from a fetch of up to size + 1 rows: the first `size`, and the token of
    the next page (made from the last row's `key`), or "" when this is the last."""
    if len(rows) <= size:
        return list(rows), ""
    kept = list(rows[:size])
    return kept, encode(key(kept[-1]), filters)


def time_id_key(time_column: str, id_column: str) -> Callable[[Any], list[Any]]:
    """The page key of rows ordered by a time and a tie-breaking id."""
    return lambda row: [row[time_column].isoformat(), str(row[id_column])]
