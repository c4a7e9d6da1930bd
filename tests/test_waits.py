"""The test suite's waits (tests/support/waits.py) fail clearly instead of hanging:
a listing that never ends, or a condition that never holds."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from tests.support.waits import every_page, wait_for


@dataclass
class Page:
    items: list[int]
    next_page_token: str


def test_every_page_walks_to_the_page_without_a_next_token() -> None:
    book = {"": Page([1, 2], "b"), "b": Page([3, 4], "c"), "c": Page([5], "")}
    assert [i for page in every_page(book.__getitem__) for i in page.items] == [1, 2, 3, 4, 5]


def test_a_token_that_comes_back_fails_at_once() -> None:
    book = {"": Page([1], "a"), "a": Page([2], "b"), "b": Page([3], "a")}
    with pytest.raises(AssertionError, match="came back"):
        list(every_page(book.__getitem__))


def test_a_listing_that_never_ends_fails_after_the_bound() -> None:
    fetched: list[str] = []

    def endless(token: str) -> Page:
        fetched.append(token)
        return Page([], f"t{len(fetched)}")

    with pytest.raises(AssertionError, match="within 5 pages"):
        list(every_page(endless, max_pages=5))
    assert len(fetched) == 5


def test_wait_for_names_what_never_happened() -> None:
    with pytest.raises(AssertionError, match="the moon to turn blue"):
        wait_for(lambda: False, timeout=0.1, what="the moon to turn blue")
