"""The claim-run-back-off loop every job of the worker pool runs in, and how the
pool stops.

A job (`Job`) says how to claim a batch and how to run it; a `ClaimLoop` does
the rest, the same for every job:

- it claims a batch; when none is waiting it waits for the job's wake-up (a
  NOTIFY, see wakeups.py) or, at the latest, the job's poll interval
  (`Job.poll_s`: the fallback for a notification lost while nobody listened, and
  how work that falls due by time is noticed);
- it runs the batch; the job says whether more may be waiting, and then the loop
  claims again at once;
- on an error of `errors` (by default services.kernel.db.TRANSIENT_ERRORS) it
  logs `<job>_failed` with the error's type and SQLSTATE, never its text, backs
  off (`Backoff`: exponential with jitter, so workers that lost the database
  together do not all return at the same instant) and tries again; an error of
  `bugs` (none by default) is logged `<job>_error` and backed off from too;
  anything else ends the process, as a bug should;
- it counts what it did (`ClaimLoop.counters`, by `Count`), and its batches and
  errors by job in the process's metrics (services/kernel/metrics.py).

Every task has an owner: the nursery of the process (workers/pool.py), inside
one `Shutdown` cancel scope. `Shutdown.stop()` cancels that scope: idle loops end
at once; a batch in flight runs in a shielded scope of its own, which the stop
gives `grace_s` seconds (finishing a batch is cheaper for everyone than rolling
it back) before cancelling it too. What cancelling means is the job's: a
statement rolls back, a trace is handed back, a message is sent again after its
lease.

`Periodic` makes work that is due on a schedule (expiry, the days ahead, the
heartbeat) a job of the same loop: claiming finds it due or not.

Plain trio: no database here, so all of it runs under trio's virtual clock in
tests (tests/test_worker_runtime.py).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import KW_ONLY, dataclass, field
from typing import Generic, Literal, Protocol, TypeVar

import structlog
import trio

from services.kernel import metrics
from services.kernel.db import TRANSIENT_ERRORS, error_fields
from workers.runtime.wakeups import Wakeup

log = structlog.get_logger()

POLL_SECONDS = 1.0
"""How long an idle claim loop waits for a wake-up before looking anyway."""

STOP_GRACE_SECONDS = 10.0
"""How long a batch in flight at a stop may finish before it is cancelled.
Statements are bounded by the pool's statement_timeout anyway."""

B = TypeVar("B")


def _jitter() -> float:
    return random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not a secret


class Backoff:
    """Exponential backoff with jitter: `first`, doubling up to `cap`, each delay
    scaled by `jitter()` (between 0.5 and 1 by default)."""

    def __init__(
        self, first: float = 0.2, cap: float = 10.0, jitter: Callable[[], float] = _jitter
    ) -> None:
        self.first = first
        self.cap = cap
        self._jitter = jitter
        self._next = first

    def next(self) -> float:
        delay = self._next
        self._next = min(self.cap, self._next * 2)
        return delay * self._jitter()

    def reset(self) -> None:
        self._next = self.first


class Job(Protocol[B]):
    """What a ClaimLoop runs: how to claim a batch (B) and how to run it."""

    @property
    def name(self) -> str:
        """Names the job in the loop's log events (`<name>_failed`, `<name>_error`)."""
        ...

    @property
    def poll_s(self) -> float:
        """How long an idle loop waits for a wake-up before claiming anyway (read
        before each wait, so a schedule can say how long until it is due)."""
        ...

    async def claim(self) -> B | None:
        """A batch, or None when nothing is waiting."""
        ...

    async def run(self, batch: B) -> bool:
        """Run a claimed batch; True when more may be waiting (claim again at once)."""
        ...


Count = Literal["batches", "empty", "woken", "polled", "errors", "bugs", "cut_short"]
"""What a claim loop counts (`ClaimLoop.counters`, counts only: logged as they are):
claims that found a batch (and ran it) and claims that found nothing; idle waits
that a wake-up ended and those the poll interval ended; errors of `errors`
(transient) and of `bugs` backed off from; batches a stop cancelled when their
grace ran out."""


class Shutdown:
    """How a worker process stops: `scope` is the one cancel scope over all its
    tasks (the process enters it around its nursery), and every batch in flight
    runs in a shielded scope of its own (`in_flight`) that `stop` gives `grace_s`
    seconds before it is cancelled too."""

    def __init__(self, grace_s: float = STOP_GRACE_SECONDS) -> None:
        self.grace_s = grace_s
        self.scope = trio.CancelScope()
        self._in_flight: set[trio.CancelScope] = set()

    @contextmanager
    def in_flight(self) -> Iterator[trio.CancelScope]:
        """A batch: shielded from the stop until its grace runs out. Enter only
        right after a checkpoint that would have raised had the stop begun (the
        loop's `checkpoint_if_cancelled`), so no batch starts after the stop."""
        with trio.CancelScope(shield=True) as scope:
            self._in_flight.add(scope)
            try:
                yield scope
            finally:
                self._in_flight.discard(scope)

    def stop(self) -> None:
        """Cancel every task; batches in flight get `grace_s` seconds first."""
        deadline = trio.current_time() + self.grace_s
        for scope in self._in_flight:
            scope.deadline = min(scope.deadline, deadline)
        self.scope.cancel()


@dataclass(eq=False)
class ClaimLoop(Generic[B]):
    """Runs `job` as described in the module docstring. Start `run` in a nursery
    inside `shutdown.scope`, as many times as the job should have tasks: they
    share the job, the wake-up and the counters; each has its own backoff."""

    job: Job[B]
    shutdown: Shutdown
    _: KW_ONLY
    wakeup: Wakeup | None = None
    backoff: tuple[float, float] = (0.2, 10.0)
    """The first delay after an error, and the longest."""
    errors: tuple[type[BaseException], ...] = TRANSIENT_ERRORS
    bugs: tuple[type[BaseException], ...] = ()
    start_after_first: bool = False
    """Report started only once the first claim ended (ran, found nothing or
    failed), so what depends on it finds its work done when the database is up,
    and starts anyway when it is not."""
    jitter: Callable[[], float] = _jitter
    counters: Counter[Count] = field(default_factory=Counter)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        backoff = Backoff(*self.backoff, jitter=self.jitter)
        pending_start = self.start_after_first
        if not pending_start:
            task_status.started()
        while True:
            wake = None if self.wakeup is None else self.wakeup.current()
            delay: float | None = None
            more = False
            try:
                more = await self._one()
            except self.errors as exc:
                self.counters["errors"] += 1
                metrics.JOB_ERRORS.labels(worker_job=self.job.name, kind="transient").inc()
                delay = backoff.next()
                log.warning(
                    f"{self.job.name}_failed", retry_in_s=round(delay, 3), **error_fields(exc)
                )
            except self.bugs as exc:
                self.counters["bugs"] += 1
                metrics.JOB_ERRORS.labels(worker_job=self.job.name, kind="bug").inc()
                delay = backoff.next()
                log.error(
                    f"{self.job.name}_error",
                    retry_in_s=round(delay, 3),
                    error_type=type(exc).__name__,
                )
            else:
                backoff.reset()
            if pending_start:
                pending_start = False
                task_status.started()
            if delay is not None:
                await trio.sleep(delay)
            elif more:
                await trio.lowlevel.checkpoint()  # a stop gets in between batches
            else:
                await self._idle(wake)

    async def _one(self) -> bool:
        """Claim and run one batch, shielded from a stop for its grace. True when
        more may be waiting."""
        await trio.lowlevel.checkpoint_if_cancelled()
        with self.shutdown.in_flight():
            batch = await self.job.claim()
            if batch is None:
                self.counters["empty"] += 1
                return False
            self.counters["batches"] += 1
            metrics.JOB_BATCHES.labels(worker_job=self.job.name).inc()
            return await self.job.run(batch)
        self.counters["cut_short"] += 1  # reached only when the grace ran out
        return False

    async def _idle(self, wake: trio.Event | None) -> None:
        with trio.move_on_after(self.job.poll_s) as waited:
            if wake is None:
                await trio.sleep_forever()
            else:
                await wake.wait()
        if waited.cancelled_caught:
            self.counters["polled"] += 1
        else:
            self.counters["woken"] += 1


class Periodic:
    """Work due every `interval_s` seconds, the first time `first_s` after its loop
    starts, as a job of a ClaimLoop: a claim finds it due or not, `poll_s` says how
    long until it is, and a run does the work and counts the next interval from
    its end. A run that fails stays due, so the loop's backoff says when it is
    tried again."""

    def __init__(
        self,
        name: str,
        work: Callable[[], Awaitable[object]],
        *,
        interval_s: float,
        first_s: float = 0.0,
    ) -> None:
        self.name = name
        self._work = work
        self.interval_s = interval_s
        self.first_s = first_s
        self._due: float | None = None

    @property
    def poll_s(self) -> float:
        return 0.0 if self._due is None else max(0.0, self._due - trio.current_time())

    async def claim(self) -> Literal[True] | None:
        now = trio.current_time()
        if self._due is None:
            self._due = now + self.first_s
        return True if now >= self._due else None

    async def run(self, batch: Literal[True]) -> bool:
        await self._work()
        self._due = trio.current_time() + self.interval_s
        return False
