"""The exactly-once checker: a record of every scan sent and every answer, and the
checks a store must pass against it (in the style of Jepsen's checkers).

The driver (tests/test_history.py) records what it sends (`History.sent`) and
every result it receives (`History.answer`); at the end the store is read and
`check` lists every violation of the guarantee stated in the check-in proto:

- every (device, sequence) is stored at most once;
- nothing is stored that was not sent, with exactly the content sent;
- an ADMITTED or DENIED answer means that scan is stored, with that content;
- DUPLICATE only when the stored scan has the content of the request answered;
- SEQUENCE_REUSED only when a scan with other content is stored under the number;
- no other rejection (the driver sends nothing else that could be rejected).

Answers are judged against the final store, which is what a device relies on:
an ack is a promise about what will be stored, whatever dies afterwards.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

ADMITTED, DENIED, DUPLICATE, REJECTED = "ADMITTED", "DENIED", "DUPLICATE", "REJECTED"
REUSED = "SEQUENCE_REUSED"


@dataclass(frozen=True, slots=True)
class Content:
    """What makes a scan the same scan: the person, the scan time, the direction."""

    person: str
    scan_us: int
    direction: int


Key = tuple[str, int]
"""(device id, sequence number)."""


@dataclass(frozen=True, slots=True)
class Answer:
    device: str
    sequence: int
    content: Content
    outcome: str
    reason: str
    via: str
    """Which call answered: a stream's id or "unary", for the failure report."""


@dataclass
class History:
    sent: dict[Key, set[Content]] = field(default_factory=lambda: collections.defaultdict(set))
    answers: list[Answer] = field(default_factory=list)
    events: collections.Counter[str] = field(default_factory=collections.Counter)

    def send(self, device: str, sequence: int, content: Content) -> None:
        self.sent[(device, sequence)].add(content)
        self.events["scans_sent"] += 1

    def answer(
        self, device: str, sequence: int, content: Content, *, outcome: str, reason: str, via: str
    ) -> None:
        self.answers.append(Answer(device, sequence, content, outcome, reason, via))
        self.events[f"answer_{reason if outcome == REJECTED else outcome}"] += 1


def check(history: History, stored: Iterable[tuple[Key, Content]]) -> list[str]:
    """Every violation of the exactly-once guarantee, as readable lines (empty: none)."""
    rows: dict[Key, list[Content]] = collections.defaultdict(list)
    for key, content in stored:
        rows[key].append(content)
    problems: list[str] = []
    for key, contents in rows.items():
        if len(contents) > 1:
            problems.append(f"{key} stored {len(contents)} times: {contents}")
        for content in contents:
            if content not in history.sent.get(key, ()):
                problems.append(f"{key} stored {content}, which was never sent under it")
    for a in history.answers:
        key = (a.device, a.sequence)
        there = rows.get(key, [])
        if a.outcome in (ADMITTED, DENIED, DUPLICATE):
            if there != [a.content]:
                problems.append(
                    f"{key} answered {a.outcome} via {a.via} for {a.content}, stored: {there}"
                )
        elif a.outcome == REJECTED and a.reason == REUSED:
            if not there or a.content in there:
                problems.append(
                    f"{key} answered SEQUENCE_REUSED via {a.via} for {a.content}, stored: {there}"
                )
        else:
            problems.append(f"{key} answered {a.outcome}/{a.reason} via {a.via}: not expected")
    return problems


def acked_keys(history: History) -> set[Key]:
    """The (device, sequence) pairs some answer said are stored."""
    return {
        (a.device, a.sequence)
        for a in history.answers
        if a.outcome in (ADMITTED, DENIED, DUPLICATE)
    }


def summary(history: History, stored: Mapping[str, int]) -> str:
    figures = dict(sorted(history.events.items())) | dict(stored)
    return ", ".join(f"{name} {value:,}" for name, value in figures.items())
