"""The worker runtime's logic (workers/runtime/loop.py, wakeups.py) under trio's
virtual clock: the exact schedule of polls, wake-ups, backoff and periodic work,
and a stop that lets the batch in flight finish within its grace, then cancels it.

`MockClock(autojump_threshold=0)` jumps to the next deadline as soon as every
task waits, so each test runs in milliseconds and every time it asserts is
exact. The jobs are scripted stand-ins for the real ones (whose database work is
tested against Postgres in test_ingest.py, test_traces.py and
test_notifications.py); only the runtime is under test here.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing

from workers.runtime.loop import Backoff, ClaimLoop, Periodic, Shutdown
from workers.runtime.wakeups import Wakeup, Wakeups


def virtual(main: Callable[[], Awaitable[Any]]) -> Any:
    """Run `main` under a virtual clock that starts at 0."""
    return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def no_jitter() -> float:
    return 1.0


@dataclass
class Item:
    """One batch of a script: how long running it takes, and whether more waits."""

    run_s: float = 0.0
    more: bool = False


@dataclass
class Scripted:
    """A job whose claims follow `script`: an Item is a batch, an exception is
    raised by the claim, and an empty script means nothing is waiting. It records
    when it was claimed, ran and was cancelled; `during_claim` runs inside a claim
    (to play a notification arriving just then)."""

    script: list[Item | BaseException] = field(default_factory=list)
    poll_s: float = 1.0
    name: str = "scripted"
    claim_s: float = 0.0
    during_claim: Callable[[], None] | None = None
    claims: list[float] = field(default_factory=list)
    runs: list[tuple[float, float]] = field(default_factory=list)
    cancelled: list[float] = field(default_factory=list)

    async def claim(self) -> Item | None:
        self.claims.append(trio.current_time())
        await trio.sleep(self.claim_s)
        if self.during_claim is not None:
            self.during_claim()
        if not self.script:
            return None
        item = self.script.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    async def run(self, batch: Item) -> bool:
        start = trio.current_time()
        try:
            await trio.sleep(batch.run_s)
        except trio.Cancelled:
            self.cancelled.append(trio.current_time())
            raise
        self.runs.append((start, trio.current_time()))
        return batch.more


async def run_until(loop: ClaimLoop[Any], stop_at: float, *, tasks: int = 1) -> float:
    """Run `loop` (`tasks` of it) in its shutdown scope, stop it at `stop_at`, and
    return when every task ended."""
    with loop.shutdown.scope:
        async with trio.open_nursery() as nursery:
            for _ in range(tasks):
                await nursery.start(loop.run)
            await trio.sleep_until(stop_at)
            loop.shutdown.stop()
    return trio.current_time()


def test_backoff_doubles_up_to_its_cap_and_starts_over_after_a_reset() -> None:
    backoff = Backoff(first=0.2, cap=1.0, jitter=no_jitter)
    assert [backoff.next() for _ in range(5)] == pytest.approx([0.2, 0.4, 0.8, 1.0, 1.0])
    backoff.reset()
    assert backoff.next() == pytest.approx(0.2)


def test_backoff_jitter_keeps_each_delay_between_half_and_all_of_it() -> None:
    draws = random.Random(13)
    backoff = Backoff(first=1.0, cap=8.0, jitter=lambda: draws.uniform(0.5, 1.0))
    delays = [backoff.next() for _ in range(6)]
    for delay, full in zip(delays, [1.0, 2.0, 4.0, 8.0, 8.0, 8.0], strict=True):
        assert full / 2 <= delay <= full
    assert len(set(delays)) == 6  # jittered: no two retries at the same instant
    default = Backoff(first=1.0, cap=1.0)
    assert all(0.5 <= default.next() <= 1.0 for _ in range(200))


def test_an_idle_loop_looks_again_at_each_poll_interval() -> None:
    job = Scripted(poll_s=1.0)
    loop = ClaimLoop(job, Shutdown())

    ended = virtual(lambda: run_until(loop, 3.5))
    assert job.claims == [0.0, 1.0, 2.0, 3.0]
    assert ended == 3.5  # an idle loop stops at once
    assert (loop.counters["empty"], loop.counters["polled"], loop.counters["woken"]) == (4, 3, 0)


def test_a_wakeup_during_the_wait_ends_it_at_once() -> None:
    wakeup = Wakeup()
    job = Scripted(poll_s=10.0)
    loop = ClaimLoop(job, Shutdown(), wakeup=wakeup)

    async def main() -> None:
        with loop.shutdown.scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(loop.run)
                await trio.sleep(2.5)
                wakeup.notify(None, 0, "stopcovid_inbox", "")
                await trio.sleep(1)
                loop.shutdown.stop()

    virtual(main)
    assert job.claims == [0.0, 2.5]
    assert (loop.counters["woken"], loop.counters["polled"]) == (1, 0)
    assert wakeup.notifications == 1


def test_a_notification_that_arrives_while_claiming_is_not_lost() -> None:
    """The claim finds nothing, but a notification arrives before the loop waits:
    the loop claims again at once instead of sleeping through the poll."""
    wakeup = Wakeup()
    job = Scripted(poll_s=10.0, claim_s=0.25)
    job.during_claim = lambda: wakeup.wake() if len(job.claims) == 1 else None
    loop = ClaimLoop(job, Shutdown(), wakeup=wakeup)

    virtual(lambda: run_until(loop, 5.0))
    assert job.claims == [0.0, 0.25]


def test_a_full_batch_is_followed_by_the_next_claim_at_once() -> None:
    job = Scripted([Item(run_s=0.5, more=True), Item(run_s=0.5, more=True), Item(run_s=0.5)])
    loop = ClaimLoop(job, Shutdown())

    virtual(lambda: run_until(loop, 3.0))
    assert job.runs == [(0.0, 0.5), (0.5, 1.0), (1.0, 1.5)]
    assert job.claims == [0.0, 0.5, 1.0, 2.5]  # then idle: the next look is a poll later
    assert loop.counters["batches"] == 3


def test_transient_errors_back_off_exponentially_and_a_success_starts_over() -> None:
    script: list[Item | BaseException] = [
        ConnectionResetError(),
        TimeoutError(),
        ConnectionRefusedError(),
        Item(),
        OSError(),
    ]
    job = Scripted(script, poll_s=1.0)
    loop = ClaimLoop(job, Shutdown(), backoff=(0.2, 10.0), jitter=no_jitter)

    virtual(lambda: run_until(loop, 2.7))
    # Errors at 0, 0.2 and 0.6 back off 0.2, 0.4, 0.8; the batch at 1.4 resets the
    # backoff; nothing waits, so the poll comes at 2.4, which fails and backs off
    # 0.2 again (not 1.6).
    assert job.claims == pytest.approx([0.0, 0.2, 0.6, 1.4, 2.4, 2.6])
    assert (loop.counters["errors"], loop.counters["batches"]) == (4, 1)


def test_backoff_never_exceeds_its_cap() -> None:
    job = Scripted([OSError() for _ in range(6)], poll_s=100.0)
    loop = ClaimLoop(job, Shutdown(), backoff=(1.0, 3.0), jitter=no_jitter)

    virtual(lambda: run_until(loop, 20.0))
    gaps = [b - a for a, b in zip(job.claims, job.claims[1:], strict=False)]
    assert gaps == pytest.approx([1.0, 2.0, 3.0, 3.0, 3.0, 3.0])


def test_an_error_that_is_neither_transient_nor_a_tolerated_bug_ends_the_loop() -> None:
    job = Scripted([ValueError("a bug")])
    loop = ClaimLoop(job, Shutdown())
    with pytest.raises(ExceptionGroup) as raised:
        virtual(lambda: run_until(loop, 10.0))
    assert raised.group_contains(ValueError)
    assert job.claims == [0.0]

    tolerant = Scripted([ValueError("a bug"), Item()], poll_s=100.0)
    survives = ClaimLoop(tolerant, Shutdown(), bugs=(ValueError,), jitter=no_jitter)
    virtual(lambda: run_until(survives, 10.0))
    assert tolerant.claims == pytest.approx([0.0, 0.2])
    assert (survives.counters["bugs"], survives.counters["batches"]) == (1, 1)


def test_a_stop_lets_the_batch_in_flight_finish_within_its_grace() -> None:
    job = Scripted([Item(run_s=5.0, more=True), Item()])
    loop = ClaimLoop(job, Shutdown(grace_s=10.0))

    ended = virtual(lambda: run_until(loop, 1.0))
    assert job.runs == [(0.0, 5.0)]
    assert job.cancelled == []
    assert ended == 5.0
    assert job.claims == [0.0]  # "more" was waiting, but no batch starts after a stop
    assert loop.counters["cut_short"] == 0


def test_a_batch_that_outlasts_the_grace_is_cancelled_when_it_runs_out() -> None:
    job = Scripted([Item(run_s=30.0)])
    loop = ClaimLoop(job, Shutdown(grace_s=10.0))

    ended = virtual(lambda: run_until(loop, 1.0))
    assert job.runs == []
    assert job.cancelled == [11.0]
    assert ended == 11.0
    assert loop.counters["cut_short"] == 1


def test_a_stop_ends_every_task_of_a_loop_and_waits_only_for_batches_in_flight() -> None:
    # Two tasks: one runs a long batch, the other is idle (nothing else waits).
    job = Scripted([Item(run_s=4.0)], poll_s=100.0)
    loop = ClaimLoop(job, Shutdown(grace_s=10.0))

    ended = virtual(lambda: run_until(loop, 2.0, tasks=2))
    assert ended == 4.0
    assert job.runs == [(0.0, 4.0)]
    assert job.claims == [0.0, 0.0]


def test_a_stop_during_a_backoff_ends_it_at_once() -> None:
    job = Scripted([OSError()], poll_s=1.0)
    loop = ClaimLoop(job, Shutdown(), backoff=(60.0, 60.0), jitter=no_jitter)
    assert virtual(lambda: run_until(loop, 3.0)) == 3.0
    assert job.claims == [0.0]


def test_start_after_first_reports_started_once_the_first_claim_ended() -> None:
    job = Scripted([Item(run_s=2.0)], claim_s=1.0, poll_s=100.0)
    eager = Scripted([Item(run_s=2.0)], claim_s=1.0, poll_s=100.0)

    async def main() -> tuple[float, float]:
        shutdown = Shutdown()
        with shutdown.scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(ClaimLoop(eager, shutdown).run)
                at_once = trio.current_time()
                await nursery.start(ClaimLoop(job, shutdown, start_after_first=True).run)
                after_first = trio.current_time()
                shutdown.stop()
        return at_once, after_first

    assert virtual(main) == (0.0, 3.0)  # the claim (1 s) and its run (2 s)

    failing = Scripted([OSError()], poll_s=100.0)

    async def down() -> float:
        shutdown = Shutdown()
        with shutdown.scope:
            async with trio.open_nursery() as nursery:
                loop = ClaimLoop(failing, shutdown, backoff=(5.0, 5.0), start_after_first=True)
                await nursery.start(loop.run)
                started = trio.current_time()
                shutdown.stop()
        return started

    assert virtual(down) == 0.0  # a failed first attempt does not hold up the start


def test_periodic_work_runs_first_after_its_delay_then_each_interval_after_a_run() -> None:
    times: list[float] = []

    async def work() -> None:
        times.append(trio.current_time())
        await trio.sleep(10.0)  # the run's own length does not eat into the interval

    loop = ClaimLoop(Periodic("expiry_run", work, interval_s=3600.0, first_s=60.0), Shutdown())
    virtual(lambda: run_until(loop, 8000.0))
    assert times == [60.0, 3670.0, 7280.0]


def test_failed_periodic_work_stays_due_and_is_retried_after_a_backoff() -> None:
    times: list[float] = []
    failures = [OSError(), OSError()]

    async def work() -> None:
        times.append(trio.current_time())
        if failures:
            raise failures.pop(0)

    loop = ClaimLoop(
        Periodic("days_ahead", work, interval_s=60.0),
        Shutdown(),
        backoff=(1.0, 60.0),
        jitter=no_jitter,
    )
    virtual(lambda: run_until(loop, 100.0))
    assert times == [0.0, 1.0, 3.0, 63.0]
    assert loop.counters["errors"] == 2


def test_a_wakeup_taken_before_looking_is_set_by_the_next_notification() -> None:
    async def main() -> None:
        wakeup = Wakeup()
        taken = wakeup.current()
        wakeup.notify(None, 0, "stopcovid_trace", None)
        assert taken.is_set()
        assert not wakeup.current().is_set()  # the next wait needs the next notification

        wakeups = Wakeups(["stopcovid_inbox", "stopcovid_trace", "stopcovid_notify"])
        events = [wakeups[c].current() for c in wakeups.channels]
        wakeups.wake_all()
        assert all(e.is_set() for e in events)
        assert [wakeups[c].notifications for c in wakeups.channels] == [0, 0, 0]

    virtual(main)
