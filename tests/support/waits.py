"""Waiting on something a test can observe, never for a fixed time: a condition
polled until it holds, and a bounded walk through a list RPC's pages."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar


def wait_for(predicate: Callable[[], bool], timeout: float = 60.0, what: str = "") -> None:
    """Poll `predicate` until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or 'a condition'}")
        time.sleep(0.05)


class Page(Protocol):
    @property
    def next_page_token(self) -> str: ...


P = TypeVar("P", bound=Page)

# More pages than any test lists: a token that never ends shows as this failure
# within seconds, not as the suite's 300 s timeout.
MAX_PAGES = 100


def every_page(fetch: Callable[[str], P], max_pages: int = MAX_PAGES) -> Iterator[P]:
    """Each page of a list RPC, `fetch(page_token)` from the empty token on, up to
    the one without a next token. Fails at once on a token seen before (the
    listing went round in a circle) and after `max_pages` pages."""
    token = ""
    seen: set[str] = set()
    for _ in range(max_pages):
        page = fetch(token)
        yield page
        token = page.next_page_token
        if not token:
            return
        if token in seen:
            raise AssertionError(f"page token {token!r} came back: the listing never ends")
        seen.add(token)
    raise AssertionError(f"the listing did not end within {max_pages} pages")
