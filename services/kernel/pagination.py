"""Opaque page tokens for keyset pagination.

A token encodes the last row's sort key and a fingerprint of the query's filters,
so a token reused with other filters is refused instead of silently skipping rows.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from services.kernel import errors

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def page_size(requested: int) -> int:
    if requested < 0 or requested > MAX_PAGE_SIZE:
        raise errors.InvalidArgument(
            f"page_size must be between 0 and {MAX_PAGE_SIZE}", field="page_size"
        )
    return requested or DEFAULT_PAGE_SIZE


def _fingerprint(filters: dict[str, Any]) -> str:
    raw = json.dumps(filters, sort_keys=True, default=str).encode()
    return hashlib.sha256(raw).hexdigest()[:16]


def encode(key: list[Any], filters: dict[str, Any]) -> str:
    body = json.dumps({"k": key, "f": _fingerprint(filters)}, default=str).encode()
    return base64.urlsafe_b64encode(body).decode().rstrip("=")


def invalid_token() -> errors.InvalidArgument:
    return errors.InvalidArgument(
        "page_token is not valid for this query", reason="INVALID_PAGE_TOKEN", field="page_token"
    )


def decode(token: str, filters: dict[str, Any]) -> list[Any] | None:
    """The sort key after which the page starts; None for the first page."""
    if not token:
        return None
    invalid = invalid_token()
    if len(token) > 1024:
        raise invalid
    try:
        body = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except ValueError:
        raise invalid from None
    if (
        not isinstance(body, dict)
        or body.get("f") != _fingerprint(filters)
        or not isinstance(body.get("k"), list)
    ):
        raise invalid
    key: list[Any] = body["k"]
    return key


def time_and_key(token: str, filters: dict[str, Any]) -> tuple[dt.datetime | None, str | None]:
    """The (time, key) after which a page ordered by a time and a tie-breaking key
    starts; (None, None) for the first page.

    The token is checked, not trusted: its fingerprint is only a hash of the
    filters, so a caller can forge one holding anything, which must be refused as
    INVALID_PAGE_TOKEN rather than fail inside the query."""
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
