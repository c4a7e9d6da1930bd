"""The trace job: finds a case's contacts under its access grant and acts on them.
The worker pool schedules it (workers/traces.py); this is what a run does.

StartTrace (Exposure service) queues a `traces` row and sends NOTIFY
stopcovid_trace. A worker claims it (`TraceRunner.claim`: SKIP LOCKED, with a
lease it renews at each step, so a trace whose worker died is claimed again and
re-run from scratch), then `TraceRunner.run` takes it through its steps:

1. find_visits: checks the grant (`services.domain.exposure.grants.check`):
   revoked or expired -> the trace is cancelled, audited as denied; opens the
   case's person (case key) and finds the case's visits in the trace's window
   (`tracing.find_visits`);
2. find_contacts: searches the visits a chunk at a time
   (`tracing.find_overlaps`), reporting progress (visits_searched,
   contacts_found) and auditing each decryption of contacts, with the grant
   checked again before each chunk; and looks up which contacts are no longer
   enrolled (erased: nothing is kept about them) or are confirmed cases
   themselves (listed, but neither raised nor notified);
3. build_results: seals the rows to write under the case key, in a thread
   (trace_results.py);
4. store_results, in ONE transaction: replaces any rows a dead run left, stores
   the contacts (ListTraceContacts) and the check-ins used as case records,
   raises the contacts' risk levels (never lowering one; the risk NOTIFY
   trigger reaches every CheckIn server's cache within a second), queues one
   notification per contact per case (which wakes the outbox), marks the trace
   succeeded with what it skipped and audits it all. Either everything of the
   run is visible, or nothing.

A row of the store that can be nobody's (withdrawn, its day key gone, corrupt)
is skipped and counted, never fatal. A step that fails on the database rolls
back and hands the trace back for another run (counted; given up after
`max_attempts`). A step that fails otherwise (a case key destroyed with its
records, a bug) fails the trace, naming the step and the error's class, which
the log (`trace_failed`) says too. Nothing logged or written as an error message
holds personal data: ids of traces, cases and grants, counts, steps and error
types only.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import json
import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import structlog
from opentelemetry.trace import SpanKind

from services.domain.exposure import grants, tracing
from services.domain.exposure.records import TraceContactRow
from services.domain.exposure.trace_results import (
    CaseRecordRow,
    Contacts,
    NotificationRow,
    Results,
    RiskRow,
    Standing,
    build_results,
)
from services.kernel import audit, db, errors
from services.kernel import tracing as otel
from services.kernel.config import Settings
from services.kernel.db import TRANSIENT_ERRORS, error_fields
from services.kernel.keys import KeyStore, Sealed

log = structlog.get_logger()

Q = db.load_queries(Path(__file__).with_name("trace_job.sql"))
TRACE_CONTEXT = db.load_queries(Path(__file__).with_name("trace_context.sql"))
"""The OpenTelemetry context a trace was queued under (services/kernel/tracing.py)."""

VISIT_CHUNK = 8
"""Case visits searched per step: progress is reported (and the lease renewed)
after each chunk, and a revoked grant stops the trace between chunks."""

JOB = "trace"
ACTION_RUN = audit.worker_action(JOB, "run")
ACTION_DECRYPT_CASE = audit.worker_action(JOB, "decrypt_case")
ACTION_DECRYPT_CONTACTS = audit.worker_action(JOB, "decrypt_contacts")
ACTION_SET_RISK = audit.worker_action(JOB, "set_risk")

# How a run ended (TraceRunner.run).
SUCCEEDED, CANCELLED, FAILED = "succeeded", "cancelled", "failed"
INTERRUPTED = "interrupted"
"""The database failed mid-way: handed back for another run."""
STOPPED = "stopped"
"""No longer this worker's (cancelled meanwhile, or claimed again after the lease)."""

T = TypeVar("T")


class TraceStopped(Exception):
    """The trace is no longer this worker's: cancelled (grant revoked) or claimed
    again by another worker after the lease passed. The run just stops."""


class StepFailed(Exception):
    """A step of a run failed with `error` (chained as the cause): the trace fails
    naming the step and the error's class."""

    def __init__(self, step: str, error: BaseException) -> None:
        super().__init__(step, type(error).__name__)
        self.step = step
        self.error_type = type(error).__name__

    @property
    def message(self) -> str:
        return f"trace failed in step {self.step}: {self.error_type}"


@dataclass(frozen=True)
class Claimed:
    """A trace this worker claimed (query claim_trace)."""

    trace_id: uuid.UUID
    case_id: uuid.UUID
    grant_id: uuid.UUID
    window_start: dt.datetime
    window_end: dt.datetime
    attempt_count: int
    case_person_enc: bytes
    """Sealed.CASE_PERSON, bound to the case."""
    failure_step: str | None
    """Where an earlier run was interrupted by a database failure, if one was."""
    failure_error: str

    @property
    def log_fields(self) -> dict[str, Any]:
        return {"trace_id": str(self.trace_id), "attempt": self.attempt_count}


@dataclass(frozen=True)
class TraceEnd:
    """How a trace this worker holds ends (query end_trace)."""

    state: str
    error_message: str = ""
    level_counts: str = "{}"
    """JSON: people raised by level."""
    skipped_rows: str | None = None
    """JSON: store rows skipped by reason."""
    erased_contacts: int | None = None
    case_contacts: int | None = None


@dataclass(frozen=True)
class Ended:
    """How a run ended, and how many people it queued a notification for."""

    outcome: str
    notified: int = 0


def _refusal_message(exc: errors.PermissionDenied) -> str:
    return {
        "GRANT_REVOKED": "cancelled: the access grant was revoked",
        "GRANT_EXPIRED": "cancelled: the access grant expired",
    }.get(exc.reason, "cancelled: no active access grant covers the case")


async def _step(step: str, work: Awaitable[T]) -> T:
    """Await one step; any error but TraceStopped comes out as StepFailed."""
    try:
        return await work
    except TraceStopped:
        raise
    except Exception as exc:
        raise StepFailed(step, exc) from exc


@dataclass(frozen=True)
class TraceRunner:
    """The trace runs of one worker: asyncio, each run one call (one crossing of
    the workers' bridge)."""

    pool: asyncpg.Pool
    keystore: KeyStore
    worker_id: str
    _: KW_ONLY
    rules: tracing.RiskRules
    lease_s: float
    """How long a claim, and each report of progress, holds the trace."""
    max_attempts: int
    """Runs of one trace before it is given up."""
    risk_expiry: dt.timedelta
    """How long a raised risk level lasts after the exposure."""

    @classmethod
    def from_settings(
        cls, pool: asyncpg.Pool, keystore: KeyStore, worker_id: str, settings: Settings
    ) -> TraceRunner:
        return cls(
            pool,
            keystore,
            worker_id,
            rules=tracing.RiskRules.from_settings(settings),
            lease_s=float(settings.trace_lease_s),
            max_attempts=settings.trace_max_attempts,
            risk_expiry=dt.timedelta(days=settings.risk_expiry_days),
        )

    # -- claiming and handing back -------------------------------------------------

    async def claim(self) -> Claimed | None:
        """The oldest trace waiting (queued, or running past its lease), now this
        worker's; None when none is."""
        row = await self.pool.fetchrow(Q["claim_trace"], self.lease_s, self.worker_id)
        return None if row is None else db.record(Claimed, row)

    async def requeue(self, t: Claimed, step: str | None = None, error_type: str = "") -> None:
        """Hand the trace back; `step` and `error_type` say what interrupted it."""
        await self.pool.execute(Q["requeue_trace"], t.trace_id, self.worker_id, step, error_type)

    # -- a run -----------------------------------------------------------------------

    async def run(self, t: Claimed) -> Ended:
        """Run a claimed trace to its end (see the module docstring). Database
        errors outside the steps (failing the trace) propagate. With tracing on,
        the run is a span in the trace of the StartTrace call that queued it."""
        if not otel.enabled:
            return await self._run_to_end(t)
        carried = await self.pool.fetchval(TRACE_CONTEXT["trace_context"], t.trace_id)
        with otel.tracer().start_as_current_span(
            "exposure.trace_run",
            context=otel.context_of(carried),
            kind=SpanKind.CONSUMER,
            attributes={"stopcovid.attempt": t.attempt_count},
        ) as span:
            ended = await self._run_to_end(t)
            span.set_attribute("stopcovid.outcome", ended.outcome)
            return ended

    async def _run_to_end(self, t: Claimed) -> Ended:
        log.info("trace_started", **t.log_fields)
        try:
            ended = await self._run(t)
        except TraceStopped:
            ended = Ended(STOPPED)
        except StepFailed as failed:
            cause = failed.__cause__
            if isinstance(cause, TRANSIENT_ERRORS):
                # The run rolled back. If even handing it back fails, the lease
                # expires and it is claimed again.
                log.warning(
                    "trace_interrupted", **t.log_fields, step=failed.step, **error_fields(cause)
                )
                try:
                    await self.requeue(t, failed.step, failed.error_type)
                except TRANSIENT_ERRORS as again:
                    log.warning("trace_requeue_failed", **error_fields(again))
                ended = Ended(INTERRUPTED)
            else:
                # A case key destroyed (case purged), or a bug: running it again
                # would fail the same way.
                log.error(
                    "trace_failed", **t.log_fields, step=failed.step, error_type=failed.error_type
                )
                await self._fail(t, failed.message, failed.step, failed.error_type)
                ended = Ended(FAILED)
        log.info("trace_finished", **t.log_fields, outcome=ended.outcome)
        return ended

    async def _run(self, t: Claimed) -> Ended:
        if t.attempt_count > self.max_attempts:
            message = f"gave up after {t.attempt_count - 1} interrupted runs"
            if t.failure_step:
                message += f"; the last in step {t.failure_step}: {t.failure_error}"
            await self._fail(t, message, t.failure_step, t.failure_error)
            return Ended(FAILED)
        prepared = await _step(tracing.FIND_VISITS, self._prepare(t))
        if prepared is None:
            return Ended(CANCELLED)
        person, visits = prepared
        contacts = Contacts()
        for start in range(0, len(visits), VISIT_CHUNK):
            chunk = visits[start : start + VISIT_CHUNK]
            progress = (len(visits), start, len(contacts.overlaps))
            searched = await _step(tracing.FIND_CONTACTS, self._search(t, person, chunk, progress))
            if searched is None:
                return Ended(CANCELLED)
            contacts.add(*searched)
        build = functools.partial(
            build_results,
            self.keystore,
            visits,
            contacts,
            case_id=t.case_id,
            trace_id=t.trace_id,
            case_person=person,
            risk_expiry=self.risk_expiry,
        )
        results = await _step(tracing.BUILD_RESULTS, asyncio.to_thread(build))
        done = await _step(tracing.STORE_RESULTS, self._finish(t, len(visits), contacts, results))
        if not done:
            return Ended(CANCELLED)
        log.info(
            "trace_results",
            trace_id=str(t.trace_id),
            contacts=len(results.contacts),
            people=results.people,
            erased_contacts=results.erased_contacts,
            case_contacts=results.case_contacts,
            **{f"skipped_{reason}": n for reason, n in contacts.skipped_counts().items()},
        )
        return Ended(SUCCEEDED, results.people)

    # -- the steps' transactions ------------------------------------------------------

    async def _audit(
        self, conn: db.Conn, t: Claimed, action: str, details: dict[str, Any], **extra: Any
    ) -> None:
        await audit.record(
            conn,
            action,
            "trace",
            str(t.trace_id),
            details,
            case_id=t.case_id,
            grant_id=t.grant_id,
            principal=audit.WORKER,
            **extra,
        )

    async def _end(self, conn: db.Conn, t: Claimed, end: TraceEnd) -> None:
        await conn.fetchrow(
            Q["end_trace"],
            t.trace_id,
            self.worker_id,
            end.state,
            end.error_message,
            end.level_counts,
            end.skipped_rows,
            end.erased_contacts,
            end.case_contacts,
        )

    async def _granted(self, conn: db.Conn, t: Claimed) -> bool:
        """Whether the trace's grant is still active; if not, the trace ends as
        cancelled, audited as denied."""
        try:
            await grants.check(conn, t.grant_id, t.case_id)
        except errors.PermissionDenied as exc:
            await self._end(conn, t, TraceEnd(CANCELLED, _refusal_message(exc)))
            await self._audit(
                conn,
                t,
                ACTION_RUN,
                {"attempt": t.attempt_count},
                outcome="denied",
                error_reason=exc.reason,
            )
            return False
        return True

    async def _progress(
        self, conn: db.Conn, t: Claimed, found: int, searched: int, contacts: int
    ) -> None:
        """Report progress and renew the lease; TraceStopped when it is not ours."""
        row = await conn.fetchrow(
            Q["trace_progress"], t.trace_id, self.worker_id, self.lease_s, found, searched, contacts
        )
        if row is None:
            raise TraceStopped

    async def _prepare(self, t: Claimed) -> tuple[uuid.UUID, list[tracing.Stay]] | None:
        """Grant check, the case's person, its visits. None: cancelled."""
        async with self.pool.acquire() as conn, conn.transaction():
            if not await self._granted(conn, t):
                return None
            key = self.keystore.case_key(t.case_id)
            person = uuid.UUID(bytes=Sealed.CASE_PERSON.open(key, t.case_id, t.case_person_enc))
            search = tracing.CaseSearch(person, t.window_start, t.window_end, self.rules)
            visits = await tracing.find_visits(conn, self.keystore, search)
            await self._progress(conn, t, len(visits), 0, 0)
            await self._audit(conn, t, ACTION_DECRYPT_CASE, {"visits_found": len(visits)})
        return person, visits

    async def _search(
        self,
        t: Claimed,
        person: uuid.UUID,
        chunk: Sequence[tracing.Stay],
        progress: tuple[int, int, int],
    ) -> tuple[tracing.Found, list[Standing]] | None:
        """One chunk of visits: the overlaps, the standing of the people found,
        progress, and the audit of the rows decrypted. `progress`: (visits found,
        visits searched, contacts found) before this chunk. None: cancelled."""
        found, searched, contacts = progress
        async with self.pool.acquire() as conn, conn.transaction():
            if not await self._granted(conn, t):
                return None
            result = await tracing.find_overlaps(conn, self.keystore, chunk, person, self.rules)
            people = list({o.person_id for o in result.overlaps})
            rows = await conn.fetch(Q["contact_standing"], people) if people else []
            standing = [db.record(Standing, r) for r in rows]
            await self._progress(
                conn, t, found, searched + len(chunk), contacts + len(result.overlaps)
            )
            await self._audit(
                conn,
                t,
                ACTION_DECRYPT_CONTACTS,
                {
                    "visits_searched": len(chunk),
                    "overlaps": len(result.overlaps),
                    "people": len(people),
                    "rows_decrypted": result.rows_decrypted,
                    "day_boundaries_linked": result.links,
                    "rows_skipped": result.skipped_counts(),
                },
            )
        return result, standing

    async def _finish(self, t: Claimed, visits: int, contacts: Contacts, results: Results) -> bool:
        """The run's one final transaction. False: cancelled."""
        async with self.pool.acquire() as conn, conn.transaction():
            if await conn.fetchrow(Q["lock_own_trace"], t.trace_id, self.worker_id) is None:
                raise TraceStopped
            if not await self._granted(conn, t):
                return False
            await conn.execute(Q["delete_trace_contacts"], t.trace_id)
            await conn.execute(Q["delete_case_records"], t.trace_id)
            if results.contacts:
                await conn.execute(
                    Q["insert_trace_contacts"],
                    t.trace_id,
                    t.case_id,
                    *db.columns(TraceContactRow, results.contacts),
                )
            if results.records:
                await conn.execute(
                    Q["insert_case_records"],
                    t.case_id,
                    t.trace_id,
                    *db.columns(CaseRecordRow, results.records),
                )
            changed = await conn.fetch(Q["raise_risk"], *db.columns(RiskRow, results.risk))
            queued = db.one(
                await conn.fetchrow(
                    Q["queue_notifications"],
                    t.trace_id,
                    t.grant_id,
                    t.case_id,
                    *db.columns(NotificationRow, results.notifications),
                )
            )["queued"]
            await self._progress(conn, t, visits, visits, len(results.contacts))
            skipped = contacts.skipped_counts()
            await self._end(
                conn,
                t,
                TraceEnd(
                    SUCCEEDED,
                    level_counts=json.dumps(results.level_counts, sort_keys=True),
                    skipped_rows=json.dumps(skipped, sort_keys=True),
                    erased_contacts=results.erased_contacts,
                    case_contacts=results.case_contacts,
                ),
            )
            await self._audit(
                conn,
                t,
                ACTION_SET_RISK,
                {"people": results.people, "risk_changed": len(changed), **results.level_counts},
            )
            await self._audit(
                conn,
                t,
                ACTION_RUN,
                {
                    "attempt": t.attempt_count,
                    "visits_found": visits,
                    "contacts_found": len(results.contacts),
                    "case_records": len(results.records),
                    "notifications_queued": int(queued),
                    "level_counts": results.level_counts,
                    "rows_skipped": skipped,
                    "erased_contacts": results.erased_contacts,
                    "case_contacts": results.case_contacts,
                },
            )
        return True

    async def _fail(self, t: Claimed, message: str, step: str | None, error_type: str) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            ended = await conn.fetchrow(Q["fail_trace"], t.trace_id, message, step, error_type)
            if ended is not None:
                await self._audit(
                    conn,
                    t,
                    ACTION_RUN,
                    {"attempt": t.attempt_count, "step": step or "", "error_type": error_type},
                    outcome=FAILED,
                    error_reason="INTERNAL",
                )
