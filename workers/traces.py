"""The trace job: finds a case's contacts under its access grant and acts on them.

StartTrace (Exposure service) queues a `traces` row and sends NOTIFY
stopcovid_trace. A worker claims it (SKIP LOCKED, with a lease it renews at each
step, so a trace whose worker died is claimed again and re-run from scratch),
then, each step one call across the trio/asyncio bridge:

1. find_visits: checks the grant (`services.domain.exposure.grants.check`): revoked or
   expired -> the trace is cancelled, audited as denied; decrypts the case's
   person (case key) and finds the case's visits in the trace's window
   (`tracing.find_visits`);
2. find_contacts: searches the visits a chunk at a time
   (`tracing.find_overlaps`), reporting progress (visits_searched,
   contacts_found) and auditing each decryption of contacts, with the grant
   checked again before each chunk; and looks up which contacts are no longer
   enrolled (erased: nothing is kept about them) or are confirmed cases
   themselves (listed, but neither raised nor notified);
3. build_results: encrypts the rows to write under the case key, in a thread;
4. store_results, in ONE transaction: replaces any rows a dead run left, stores
   the contacts (ListTraceContacts) and the check-ins used as case records,
   raises the contacts' risk levels (never lowering one; the risk NOTIFY
   trigger reaches every CheckIn server's cache within a second), queues one
   notification per contact per case, marks the trace succeeded with what it
   skipped and audits it all. Either everything of the run is visible, or
   nothing.

A row of the store that can be nobody's (withdrawn, its day key gone, corrupt)
is skipped and counted, never fatal. A run that fails otherwise (a case key
destroyed with its records, a bug) is marked failed with the step and the
error's class, which the log says too. Nothing logged or written as an error
message holds personal data: ids of traces, cases and grants, counts, steps and
error types only.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import hmac
import json
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import structlog
import trio
import trio_asyncio

from services.domain.exposure import grants, tracing
from services.kernel import audit, channels, db, errors
from services.kernel.clock import CAMBODIA
from services.kernel.config import Settings
from services.kernel.keys import KeyStore
from workers import ingest

log = structlog.get_logger()

Q = db.load_queries(Path(__file__).with_name("exposure.sql"))

TRACE_CHANNEL = channels.TRACE
NOTIFY_CHANNEL = channels.OUTBOX

POLL_SECONDS = 1.0
"""How long an idle task waits for a NOTIFY before looking for work anyway."""

VISIT_CHUNK = 8
"""Case visits searched per step: progress is reported (and the lease renewed)
after each chunk, and a revoked grant stops the trace between chunks."""

LEVEL_NAMES = {tracing.LOW: "low", tracing.MEDIUM: "medium", tracing.HIGH: "high"}


LISTEN_ERRORS: tuple[type[BaseException], ...] = (*ingest.DB_ERRORS, trio.TooSlowError)

ACTION_RUN = "worker.trace.run"
ACTION_DECRYPT_CASE = "worker.trace.decrypt_case"
ACTION_DECRYPT_CONTACTS = "worker.trace.decrypt_contacts"
ACTION_SET_RISK = "worker.trace.set_risk"


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
    trace_id: uuid.UUID
    case_id: uuid.UUID
    grant_id: uuid.UUID
    window_start: dt.datetime
    window_end: dt.datetime
    attempt_count: int
    case_person_enc: bytes
    interrupted_step: str | None = None
    """Where an earlier run of it was interrupted by a database failure, if one was."""
    interrupted_error: str = ""

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> Claimed:
        return cls(
            row["trace_id"],
            row["case_id"],
            row["grant_id"],
            row["window_start"],
            row["window_end"],
            int(row["attempt_count"]),
            bytes(row["case_person_enc"]),
            row["failure_step"],
            row["failure_error"],
        )


@dataclass
class Contacts:
    """What the search of every chunk found: the overlaps, the rows skipped (by
    reason, each row once), and the found people's standing."""

    overlaps: list[tracing.Overlap] = field(default_factory=list)
    skipped: dict[str, set[tracing.RowId]] = field(
        default_factory=lambda: {reason: set() for reason in tracing.SKIP_REASONS}
    )
    erased: set[uuid.UUID] = field(default_factory=set)
    """No longer enrolled (withdrew, or the enrollment expired): nothing is kept."""
    confirmed: set[uuid.UUID] = field(default_factory=set)
    """Confirmed cases themselves: listed as contacts, neither raised nor notified."""

    def add(self, found: tracing.Found, standing: Sequence[asyncpg.Record]) -> None:
        self.overlaps.extend(found.overlaps)
        for reason, rows in found.skipped.items():
            self.skipped[reason] |= rows
        for row in standing:
            if row["erased"]:
                self.erased.add(row["person_id"])
            elif row["confirmed_case"]:
                self.confirmed.add(row["person_id"])

    def skipped_counts(self) -> dict[str, int]:
        return {reason: len(rows) for reason, rows in self.skipped.items()}


@dataclass
class Results:
    """The rows one run writes, built (and encrypted) before its final transaction."""

    contacts: tuple[list[Any], ...] = field(default_factory=lambda: tuple([] for _ in range(13)))
    records: tuple[list[Any], ...] = field(default_factory=lambda: tuple([] for _ in range(7)))
    risk: tuple[list[Any], ...] = field(default_factory=lambda: tuple([] for _ in range(8)))
    notifications: tuple[list[Any], ...] = field(
        default_factory=lambda: tuple([] for _ in range(8))
    )
    level_counts: dict[str, int] = field(default_factory=dict)
    erased_contacts: int = 0
    case_contacts: int = 0

    @property
    def people(self) -> int:
        return len(self.risk[0])

    @property
    def contact_rows(self) -> int:
        return len(self.contacts[0])


def contact_ref(case_key: bytes, trace_id: uuid.UUID, person_id: uuid.UUID) -> str:
    """A contact's pseudonym, stable within one trace only (keyed by the case key,
    so it cannot be recomputed once the case is purged)."""
    message = b"contact-ref|" + trace_id.bytes + b"|" + person_id.bytes
    return hmac.new(case_key, message, hashlib.sha256).hexdigest()[:16]


def _best(overlaps: Sequence[tracing.Overlap]) -> dict[uuid.UUID, tracing.Overlap]:
    """Per person, the overlap that sets their level: the highest, then the longest,
    then the latest."""
    best: dict[uuid.UUID, tracing.Overlap] = {}
    for o in overlaps:
        found = best.get(o.person_id)
        if found is None or (o.level, o.overlap, o.exposure_time) > (
            found.level,
            found.overlap,
            found.exposure_time,
        ):
            best[o.person_id] = o
    return best


def build_results(
    keystore: KeyStore,
    trace: Claimed,
    case_person: uuid.UUID,
    visits: Sequence[tracing.Stay],
    contacts: Contacts,
    *,
    risk_expiry: dt.timedelta,
) -> Results:
    """Every row of the run, person ids encrypted under the case key with the
    associated data the Exposure service expects. Erased people are left out;
    confirmed cases are listed but get no risk row, no notification and no
    count. CPU work: runs in a thread."""
    key = keystore.case_key(trace.case_id)
    out = Results()
    overlaps = [o for o in contacts.overlaps if o.person_id not in contacts.erased]
    out.erased_contacts = len({o.person_id for o in contacts.overlaps} & contacts.erased)
    refs: dict[uuid.UUID, str] = {}
    indexes: dict[uuid.UUID, bytes] = {}

    def ref(person: uuid.UUID) -> str:
        if person not in refs:
            refs[person] = contact_ref(key.key, trace.trace_id, person)
        return refs[person]

    def index(person: uuid.UUID) -> bytes:
        if person not in indexes:
            indexes[person] = keystore.person_index(person.bytes)
        return indexes[person]

    ordered = sorted(
        overlaps,
        key=lambda o: (
            -o.level,
            o.case_visit.start,
            o.contact_stay.start,
            ref(o.person_id),
            str(o.contact_stay.venue_id),
        ),
    )
    contact_aad = b"contact|" + trace.trace_id.bytes
    for number, o in enumerate(ordered, start=1):
        row = (
            number,
            ref(o.person_id),
            o.level,
            o.contact_stay.venue_id,
            o.case_visit.start,
            o.case_visit.end,
            o.contact_stay.start,
            o.contact_stay.end,
            o.overlap,
            o.case_visit.end_estimated or o.contact_stay.end_estimated,
            o.rule[:200],
            index(o.person_id),
            key.encrypt(o.person_id.bytes, contact_aad),
        )
        for column, value in zip(out.contacts, row, strict=True):
            column.append(value)

    # The check-ins used: all of the case's visits, and each contact's stays that
    # overlapped. A scan used by two overlaps is kept once.
    record_aad = b"record|" + trace.trace_id.bytes
    seen: set[tuple[Any, ...]] = set()

    def record(subject: str, person: uuid.UUID, scan: tracing.Scan) -> None:
        ref_value = ref(person) if subject == "contact" else ""
        identity = (subject, ref_value, scan.day, scan.venue_id, scan.device_id, scan.sequence,
                    scan.scan_time, scan.direction)  # fmt: skip
        if identity in seen:
            return
        seen.add(identity)
        values = (
            subject,
            ref_value,
            scan.venue_id,
            scan.scan_time,
            scan.direction,
            index(person),
            key.encrypt(person.bytes, record_aad),
        )
        for column, value in zip(out.records, values, strict=True):
            column.append(value)

    for visit in visits:
        for scan in visit.scans:
            record("case", case_person, scan)
    for o in ordered:
        for scan in o.contact_stay.scans:
            record("contact", o.person_id, scan)

    best = _best(overlaps)
    out.case_contacts = len(best.keys() & contacts.confirmed)
    counts: Counter[str] = Counter()
    for person in sorted(best.keys() - contacts.confirmed, key=lambda p: p.bytes):
        o = best[person]
        level = LEVEL_NAMES[o.level]
        counts[level] += 1
        exposure = o.exposure_time
        risk_row = (
            person,
            level,
            exposure,
            exposure + risk_expiry,
            o.contact_stay.venue_id,
            o.contact_stay.venue_name,
            o.overlap,
            o.rule[:200],
        )
        for column, value in zip(out.risk, risk_row, strict=True):
            column.append(value)
        notification_id = uuid.uuid4()
        note_row = (
            notification_id,
            index(person),
            key.encrypt(person.bytes, b"notification|" + notification_id.bytes),
            ref(person),
            level,
            o.contact_stay.venue_id,
            exposure.astimezone(CAMBODIA).date(),
            person,
        )
        for column, value in zip(out.notifications, note_row, strict=True):
            column.append(value)
    out.level_counts = {name: counts.get(name, 0) for name in ("high", "medium", "low")}
    return out


def _refusal_message(exc: errors.PermissionDenied) -> str:
    return {
        "GRANT_REVOKED": "cancelled: the access grant was revoked",
        "GRANT_EXPIRED": "cancelled: the access grant expired",
    }.get(exc.reason, "cancelled: no active access grant covers the case")


class TraceRunner:
    """The trace tasks of one worker process."""

    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        keystore: KeyStore,
        worker_id: str,
        notify_wakeup: ingest.InboxWakeup | None = None,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.keystore = keystore
        self.worker_id = worker_id
        self.rules = tracing.RiskRules.from_settings(settings)
        self.lease = float(settings.trace_lease_s)
        self.wakeup = ingest.InboxWakeup()
        self.notify_wakeup = notify_wakeup
        self.finished: Counter[str] = Counter()

    # -- steps (each runs on the asyncio side: one bridge crossing) --------------

    async def _claim(self) -> Claimed | None:
        row = await self.pool.fetchrow(Q["claim_trace"], self.lease, self.worker_id)
        return None if row is None else Claimed.from_row(row)

    async def _cancel(self, conn: db.Conn, t: Claimed, exc: errors.PermissionDenied) -> None:
        """End the trace as cancelled (its grant is no longer active), audited."""
        await conn.fetchrow(
            Q["end_trace"],
            t.trace_id,
            self.worker_id,
            "cancelled",
            _refusal_message(exc),
            "{}",
            None,
            None,
            None,
        )
        await audit.record(
            conn,
            ACTION_RUN,
            "trace",
            str(t.trace_id),
            {"attempt": t.attempt_count},
            case_id=t.case_id,
            grant_id=t.grant_id,
            outcome="denied",
            error_reason=exc.reason,
            principal=audit.WORKER,
        )

    async def _progress(
        self, conn: db.Conn, t: Claimed, found: int, searched: int, contacts: int
    ) -> None:
        row = await conn.fetchrow(
            Q["trace_progress"], t.trace_id, self.worker_id, self.lease, found, searched, contacts
        )
        if row is None:
            raise TraceStopped

    async def _prepare(self, t: Claimed) -> tuple[uuid.UUID, list[tracing.Stay]] | None:
        """Grant check, the case's person, its visits. None: cancelled."""
        async with self.pool.acquire() as conn, conn.transaction():
            try:
                await grants.check(conn, t.grant_id, t.case_id)
            except errors.PermissionDenied as exc:
                await self._cancel(conn, t, exc)
                return None
            key = self.keystore.case_key(t.case_id)
            person = uuid.UUID(bytes=key.decrypt(t.case_person_enc, b"case|" + t.case_id.bytes))
            visits = await tracing.find_visits(
                conn, self.keystore, person, t.window_start, t.window_end, rules=self.rules
            )
            await self._progress(conn, t, len(visits), 0, 0)
            await audit.record(
                conn,
                ACTION_DECRYPT_CASE,
                "trace",
                str(t.trace_id),
                {"visits_found": len(visits)},
                case_id=t.case_id,
                grant_id=t.grant_id,
                principal=audit.WORKER,
            )
        return person, visits

    async def _search(
        self,
        t: Claimed,
        person: uuid.UUID,
        chunk: Sequence[tracing.Stay],
        progress: tuple[int, int, int],
    ) -> tuple[tracing.Found, list[asyncpg.Record]] | None:
        """One chunk of visits: the overlaps, the standing of the people found
        (enrolled? a confirmed case?), progress, and the audit of the rows
        decrypted. `progress`: (visits found, visits searched, contacts found)
        before this chunk. None: cancelled."""
        found, searched, contacts = progress
        async with self.pool.acquire() as conn, conn.transaction():
            try:
                await grants.check(conn, t.grant_id, t.case_id)
            except errors.PermissionDenied as exc:
                await self._cancel(conn, t, exc)
                return None
            result = await tracing.find_overlaps(conn, self.keystore, chunk, person, self.rules)
            people = list({o.person_id for o in result.overlaps})
            standing = list(await conn.fetch(Q["contact_standing"], people)) if people else []
            await self._progress(
                conn, t, found, searched + len(chunk), contacts + len(result.overlaps)
            )
            await audit.record(
                conn,
                ACTION_DECRYPT_CONTACTS,
                "trace",
                str(t.trace_id),
                {
                    "visits_searched": len(chunk),
                    "overlaps": len(result.overlaps),
                    "people": len(people),
                    "rows_decrypted": result.rows_decrypted,
                    "day_boundaries_linked": result.links,
                    "rows_skipped": result.skipped_counts(),
                },
                case_id=t.case_id,
                grant_id=t.grant_id,
                principal=audit.WORKER,
            )
        return result, standing

    async def _finish(self, t: Claimed, visits: int, contacts: Contacts, results: Results) -> bool:
        """The run's one final transaction. False: cancelled."""
        async with self.pool.acquire() as conn, conn.transaction():
            if await conn.fetchrow(Q["lock_own_trace"], t.trace_id, self.worker_id) is None:
                raise TraceStopped
            try:
                await grants.check(conn, t.grant_id, t.case_id)
            except errors.PermissionDenied as exc:
                await self._cancel(conn, t, exc)
                return False
            await conn.execute(Q["delete_trace_contacts"], t.trace_id)
            await conn.execute(Q["delete_case_records"], t.trace_id)
            if results.contact_rows:
                await conn.execute(
                    Q["insert_trace_contacts"], t.trace_id, t.case_id, *results.contacts
                )
            if results.records[0]:
                await conn.execute(
                    Q["insert_case_records"], t.case_id, t.trace_id, *results.records
                )
            changed = await conn.fetch(Q["raise_risk"], *results.risk)
            queued = db.one(
                await conn.fetchrow(
                    Q["queue_notifications"],
                    t.trace_id,
                    t.grant_id,
                    t.case_id,
                    *results.notifications,
                )
            )["queued"]
            await self._progress(conn, t, visits, visits, results.contact_rows)
            skipped = contacts.skipped_counts()
            await conn.fetchrow(
                Q["end_trace"],
                t.trace_id,
                self.worker_id,
                "succeeded",
                "",
                json.dumps(results.level_counts, sort_keys=True),
                json.dumps(skipped, sort_keys=True),
                results.erased_contacts,
                results.case_contacts,
            )
            await audit.record(
                conn,
                ACTION_SET_RISK,
                "trace",
                str(t.trace_id),
                {"people": results.people, "risk_changed": len(changed), **results.level_counts},
                case_id=t.case_id,
                grant_id=t.grant_id,
                principal=audit.WORKER,
            )
            await audit.record(
                conn,
                ACTION_RUN,
                "trace",
                str(t.trace_id),
                {
                    "attempt": t.attempt_count,
                    "visits_found": visits,
                    "contacts_found": results.contact_rows,
                    "case_records": len(results.records[0]),
                    "notifications_queued": int(queued),
                    "level_counts": results.level_counts,
                    "rows_skipped": skipped,
                    "erased_contacts": results.erased_contacts,
                    "case_contacts": results.case_contacts,
                },
                case_id=t.case_id,
                grant_id=t.grant_id,
                principal=audit.WORKER,
            )
        return True

    async def _fail(self, t: Claimed, message: str, step: str | None, error_type: str) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            ended = await conn.fetchrow(Q["fail_trace"], t.trace_id, message, step, error_type)
            if ended is not None:
                await audit.record(
                    conn,
                    ACTION_RUN,
                    "trace",
                    str(t.trace_id),
                    {"attempt": t.attempt_count, "step": step or "", "error_type": error_type},
                    case_id=t.case_id,
                    grant_id=t.grant_id,
                    outcome="failed",
                    error_reason="INTERNAL",
                    principal=audit.WORKER,
                )

    async def _requeue(self, t: Claimed, step: str | None = None, error_type: str = "") -> None:
        """Hand the trace back; `step` and `error_type` say what interrupted it."""
        await self.pool.execute(Q["requeue_trace"], t.trace_id, self.worker_id, step, error_type)

    # -- one trace ---------------------------------------------------------------

    async def _bridge(self, fn: Any, *args: Any) -> Any:
        return await trio_asyncio.aio_as_trio(fn)(*args)

    async def _step(self, step: str, fn: Any, *args: Any) -> Any:
        """Run one step's function on the asyncio side; any error comes out as
        StepFailed naming the step."""
        try:
            return await self._bridge(fn, *args)
        except TraceStopped:
            raise
        except Exception as exc:
            raise StepFailed(step, exc) from exc

    async def run(self, t: Claimed) -> str:
        """Run one claimed trace to its end; returns how it ended. Raises
        StepFailed when a step fails."""
        if t.attempt_count > self.settings.trace_max_attempts:
            message = f"gave up after {t.attempt_count - 1} interrupted runs"
            if t.interrupted_step:
                message += f"; the last in step {t.interrupted_step}: {t.interrupted_error}"
            await self._bridge(self._fail, t, message, t.interrupted_step, t.interrupted_error)
            return "failed"
        prepared = await self._step(tracing.FIND_VISITS, self._prepare, t)
        if prepared is None:
            return "cancelled"
        person, visits = prepared
        contacts = Contacts()
        for start in range(0, len(visits), VISIT_CHUNK):
            chunk = visits[start : start + VISIT_CHUNK]
            progress = (len(visits), start, len(contacts.overlaps))
            searched = await self._step(
                tracing.FIND_CONTACTS, self._search, t, person, chunk, progress
            )
            if searched is None:
                return "cancelled"
            contacts.add(*searched)
        expiry = dt.timedelta(days=self.settings.risk_expiry_days)
        build = functools.partial(
            build_results, self.keystore, t, person, visits, contacts, risk_expiry=expiry
        )
        try:
            results = await trio.to_thread.run_sync(build)
        except Exception as exc:
            raise StepFailed(tracing.BUILD_RESULTS, exc) from exc
        done = await self._step(
            tracing.STORE_RESULTS, self._finish, t, len(visits), contacts, results
        )
        if not done:
            return "cancelled"
        log.info(
            "trace_results",
            trace_id=str(t.trace_id),
            contacts=results.contact_rows,
            people=results.people,
            erased_contacts=results.erased_contacts,
            case_contacts=results.case_contacts,
            **{f"skipped_{reason}": n for reason, n in contacts.skipped_counts().items()},
        )
        if self.notify_wakeup is not None and results.people:
            self.notify_wakeup.wake()
        return "succeeded"

    async def run_once(self) -> bool:
        """Claim and run one trace; False when none was waiting."""
        t: Claimed | None = await self._bridge(self._claim)
        if t is None:
            return False
        fields = {"trace_id": str(t.trace_id), "attempt": t.attempt_count}
        log.info("trace_started", **fields)
        try:
            outcome = await self.run(t)
        except TraceStopped:
            outcome = "stopped"
        except trio.Cancelled:
            # Stopping: hand the trace back at once rather than after the lease.
            with trio.move_on_after(5) as scope:
                scope.shield = True
                try:
                    await self._bridge(self._requeue, t)
                except ingest.DB_ERRORS as exc:
                    log.warning("trace_requeue_failed", **ingest.error_fields(exc))
            raise
        except StepFailed as failed:
            cause = failed.__cause__
            assert cause is not None
            if isinstance(cause, ingest.DB_ERRORS):
                # The database failed mid-way: the run rolled back. Hand the trace
                # back for another run (counted; given up after
                # trace_max_attempts); if even that fails, the lease expires and it
                # is claimed again.
                log.warning(
                    "trace_interrupted", **fields, step=failed.step, **ingest.error_fields(cause)
                )
                try:
                    await self._bridge(self._requeue, t, failed.step, failed.error_type)
                except ingest.DB_ERRORS as again:
                    log.warning("trace_requeue_failed", **ingest.error_fields(again))
                outcome = "interrupted"
            else:
                # A case key destroyed (case purged), or a bug: running it again
                # would fail the same way. The worker carries on.
                log.error("trace_failed", **fields, step=failed.step, error_type=failed.error_type)
                await self._bridge(self._fail, t, failed.message, failed.step, failed.error_type)
                outcome = "failed"
        self.finished[outcome] += 1
        log.info("trace_finished", **fields, outcome=outcome)
        return True

    # -- tasks -----------------------------------------------------------------

    async def trace_task(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run traces as they come: woken by NOTIFY, with a poll as fallback."""
        backoff = ingest.Backoff()
        task_status.started()
        while True:
            wake = self.wakeup.current()
            try:
                handled = await self.run_once()
            except ingest.DB_ERRORS as exc:
                log.warning("trace_claim_failed", **ingest.error_fields(exc))
                await trio.sleep(backoff.next())
                continue
            backoff.reset()
            if handled:
                await trio.lowlevel.checkpoint()
                continue
            with trio.move_on_after(POLL_SECONDS):
                await wake.wait()


async def listen_task(
    settings: Settings,
    wakeups: dict[str, ingest.InboxWakeup],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """LISTEN on `wakeups`' channels on a dedicated connection and wake each
    channel's tasks on a notification; replaced when it dies, as the ingest
    listener is (the tasks' poll covers the gap)."""
    backoff = ingest.Backoff(first=0.5)
    started = False
    args = db.connect_args(settings, db.SERVICE_ROLES["worker"]).kwargs()
    while True:
        conn: asyncpg.Connection | None = None
        try:
            conn = await trio_asyncio.aio_as_trio(asyncpg.connect)(
                **args,
                timeout=10,
                server_settings={"application_name": "stopcovid_worker_exposure_listen"},
            )
            lost = trio.Event()
            conn.add_termination_listener(lambda _conn, event=lost: event.set())
            for channel, wakeup in wakeups.items():
                await trio_asyncio.aio_as_trio(conn.add_listener)(channel, wakeup.notify)
            for wakeup in wakeups.values():
                wakeup.wake()  # work that arrived while nobody listened
            backoff.reset()
            if not started:
                started = True
                task_status.started()
            while not conn.is_closed():
                with trio.move_on_after(ingest.LISTEN_CHECK_SECONDS):
                    await lost.wait()
                with trio.fail_after(ingest.LISTEN_CHECK_SECONDS):
                    await trio_asyncio.aio_as_trio(conn.execute)("SELECT 1")
            log.warning("exposure_listen_lost")
        except LISTEN_ERRORS as exc:
            log.warning("exposure_listen_failed", **ingest.error_fields(exc))
        finally:
            if conn is not None:
                await ingest._close_quietly(conn)
        if not started:
            started = True
            task_status.started()
        await trio.sleep(backoff.next())
