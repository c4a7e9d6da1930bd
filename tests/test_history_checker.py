"""The exactly-once checker finds each kind of violation it claims to (a checker that
cannot fail would prove nothing), and passes a consistent history."""

from __future__ import annotations

from tests.support.history import (
    ADMITTED,
    DUPLICATE,
    REJECTED,
    REUSED,
    Content,
    History,
    check,
)

A = Content("person-a", 1_000_000, 1)
B = Content("person-b", 1_000_000, 1)
A_OTHER_DAY = Content("person-a", 1_000_000 + 86_400_000_000, 1)


def history(*answers: tuple[int, Content, str, str]) -> History:
    h = History()
    for sequence, content, outcome, reason in answers:
        h.send("d1", sequence, content)
        h.answer("d1", sequence, content, outcome=outcome, reason=reason, via="stream-1")
    return h


def test_a_consistent_history_passes() -> None:
    h = history(
        (1, A, ADMITTED, ""),
        (1, A, DUPLICATE, ""),
        (1, B, REJECTED, REUSED),
        (2, B, ADMITTED, ""),
    )
    h.send("d1", 3, A)  # sent, never answered, not stored: allowed
    h.send("d1", 4, A)  # sent, never answered, stored: allowed
    assert check(h, [(("d1", 1), A), (("d1", 2), B), (("d1", 4), A)]) == []


def test_an_acked_scan_that_is_lost() -> None:
    assert check(history((1, A, ADMITTED, "")), []) != []


def test_two_contents_acked_under_one_number() -> None:
    # Stream 2 stored A under 1; stream 1 then acked B under 1: one of them is lost.
    h = history((1, A, ADMITTED, ""), (1, B, ADMITTED, ""))
    assert check(h, [(("d1", 1), A)]) != []


def test_a_number_stored_twice_on_two_days() -> None:
    h = history((1, A, ADMITTED, ""), (1, A_OTHER_DAY, ADMITTED, ""))
    assert check(h, [(("d1", 1), A), (("d1", 1), A_OTHER_DAY)]) != []


def test_something_stored_that_was_never_sent() -> None:
    h = history((1, A, ADMITTED, ""))
    assert check(h, [(("d1", 1), A), (("d1", 2), B)]) != []
    assert check(history((1, A, DUPLICATE, "")), [(("d1", 1), B)]) != []


def test_duplicate_for_other_content_and_reuse_for_the_same() -> None:
    assert check(history((1, B, DUPLICATE, "")), [(("d1", 1), A)]) != []
    assert check(history((1, A, REJECTED, REUSED)), [(("d1", 1), A)]) != []
    assert check(history((1, A, REJECTED, REUSED)), []) != []


def test_an_unexpected_rejection() -> None:
    h = history((1, A, REJECTED, "MALFORMED_SCAN"))
    assert check(h, []) != []
