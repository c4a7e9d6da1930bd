"""CheckInService: enrollment, personal tokens, and the check-in hot path.

A device's stream works like this (DESIGN.md, "The path of a scan"):

    reader task            per batch: decide every scan in memory (scans.py),
                           then hand the stored rows to the group committer
    commit tasks           wait for the group commit (commit.py), then queue the ack
    the handler itself     writes acks as they become durable, in that order

A batch is acknowledged only after its rows are committed, and after every
earlier batch of the stream was acknowledged: an ack says everything before it
is durable too, so a DUPLICATE answer never refers to a scan still in flight.
The reader refuses a device that keeps more than the window of batches
unacknowledged, and when the workers fall behind (inbox lag), commits are
delayed before they start, so acks slow, the device's window fills and it stops
sending: memory stays bounded by streams x window x batch size.

A device has one writer at a time, cluster-wide (migration 0006): opening a
stream, or a unary CheckIn, takes the device's next epoch, and the stream that
held the previous one ends with ABORTED (STREAM_SUPERSEDED) on whichever server
it is; its rows can no longer be committed (commit.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import structlog
from google.protobuf import duration_pb2
from stopcovid.checkin.v1 import checkin_service_pb2 as pb
from stopcovid.checkin.v1 import checkin_service_pb2_grpc as pb_grpc

from services.checkin.admission import Admission
from services.checkin.caches import Caches, DeviceInfo
from services.checkin.commit import CommitFailed, GroupCommitter, Superseded
from services.checkin.scans import (
    DIRECTIONS,
    ENTRY,
    EXIT,
    REASONS,
    Decider,
    Entries,
    Ledger,
    Scan,
    datetime_to_us,
    us_to_datetime,
)
from services.domain.checkins.inbox import COLUMNS as INBOX_COLUMNS
from services.domain.people import enrollment
from services.domain.people.tokens import PersonalTokens, TokenRefused, VenueCodes
from services.kernel import audit, errors, validation
from services.kernel.auth import current_principal
from services.kernel.config import Settings
from services.kernel.db import TRANSIENT_ERRORS, load_queries, one
from services.kernel.keys import open_keystore
from services.kernel.rpc import Context, timestamp

log = structlog.get_logger()

Q = load_queries(Path(__file__).with_name("queries.sql"))

_LANGUAGE = re.compile(r"^[A-Za-z]{2,8}(-[A-Za-z0-9]{1,8})*$")
_MAX_WINDOWS = 96
_LAG_POLL_S = 0.5
_ACTIVITY_FLUSH_S = 60.0  # how often people seen are recorded as active


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def device_revoked() -> errors.PermissionDenied:
    return errors.PermissionDenied(
        "this device is not registered or was revoked", reason="DEVICE_REVOKED"
    )


def stream_superseded() -> errors.Aborted:
    return errors.Aborted(
        "another stream or CheckIn call of this device took over; this stream ends "
        "(its unacknowledged scans were not stored by it: resend them on the new stream)",
        reason="STREAM_SUPERSEDED",
    )


_DIRECTION_OF = {"entry": ENTRY, "exit": EXIT}


def fingerprints(rows: list[asyncpg.Record]) -> list[tuple[int, int]]:
    """(sequence, Ledger fingerprint) of stored or inbox rows (query stored_scans)."""
    return [
        (
            row["sequence"],
            Ledger.fingerprint(
                datetime_to_us(row["scan_time"]),
                _DIRECTION_OF[row["direction"]],
                bytes(row["person_ref"]),
            ),
        )
        for row in rows
    ]


_WAKE = object()
"""Queued when a commit task ends, so the stream's writer loop re-checks its end."""


class _End:
    """Queued by the reader when it stops; carries why (None: the device closed)."""

    __slots__ = ("error",)

    def __init__(self, error: errors.DomainError | None) -> None:
        self.error = error


class _Stream:
    """One open StreamScans call: the device's writer while its epoch is current."""

    def __init__(self, device: DeviceInfo, window: int, epoch: int, ledger: Ledger) -> None:
        self.device = device
        self.window = window
        self.epoch = epoch
        self.ledger = ledger
        self.in_flight = 0
        self.queue: asyncio.Queue[pb.StreamScansResponse | _End | CommitFailed | object] = (
            asyncio.Queue()
        )
        self.reader: asyncio.Task[None] | None = None
        self.end_error: errors.DomainError | None = None
        self.hint_quiet_until = 0.0
        self.hinted = False  # a window-halving hint is in force at the device
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        done.set_result(True)
        self.last_acked: asyncio.Future[bool] = done
        """Resolves when the latest batch so far is acknowledged (True) or never will be."""

    def end(self, error: errors.DomainError) -> None:
        """Stop reading; acknowledge what is committing; then end with `error`."""
        if self.end_error is None:
            self.end_error = error
        if self.reader is not None:
            self.reader.cancel()


class CheckInService(pb_grpc.CheckInServiceServicer):
    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        self._pool = pool
        self._settings = settings
        self._keys = open_keystore(settings.keystore_dir, settings.secrets_dir)
        current, token_keys = self._keys.token_keys()
        self._tokens = PersonalTokens(current, token_keys, settings.token_window_s)
        self._venue_codes = VenueCodes(self._keys.venue_public_keys())
        self._blind_key = self._keys.blind_index_key()
        self.caches = Caches(pool, settings)
        self.caches.on_device_change = self._device_changed
        self.caches.on_stream_change = self._supersede
        self.caches.watched_devices = lambda: list(self._streams)
        self.committer = GroupCommitter(
            pool, settings.commit_interval_ms / 1000, settings.commit_max_rows
        )
        self.decider = Decider(settings, self._tokens, self._keys, self.caches)
        self._streams: dict[uuid.UUID, set[_Stream]] = {}
        self.admission = Admission(settings.inbox_lag_limit)
        self._lag_task: asyncio.Task[None] | None = None
        self._activity_task: asyncio.Task[None] | None = None
        self._draining = False
        self._idle = asyncio.Event()  # set while no stream is open
        self._idle.set()

    # -- lifecycle (called by services.kernel.server) ----------------------------

    async def start(self) -> None:
        await self.caches.start()
        await self.committer.start()
        self._lag_task = asyncio.create_task(self._watch_lag(), name="inbox-lag")
        self._activity_task = asyncio.create_task(self._flush_activity(), name="activity")

    async def drain(self, grace: float) -> None:
        """End every stream: acknowledge what is committing, then UNAVAILABLE."""
        self._draining = True
        for streams in self._streams.values():
            for stream in streams:
                stream.end(errors.Unavailable("the server is shutting down; reconnect"))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace)

    async def close(self) -> None:
        for task in (self._lag_task, self._activity_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self._touch_active()
        await self.committer.close()
        await self.caches.close()

    async def _watch_lag(self) -> None:
        while True:
            try:
                row = await self._pool.fetchrow(Q["inbox_state"])
                low, high = (row["low"], row["high"]) if row else (None, None)
                lag = 0 if low is None or high is None else high - low + 1
                self.admission.observe(lag, low)
            except TRANSIENT_ERRORS as exc:
                log.warning("inbox_lag_unknown", error_type=type(exc).__name__)
            await asyncio.sleep(_LAG_POLL_S)

    async def _flush_activity(self) -> None:
        while True:
            await asyncio.sleep(_ACTIVITY_FLUSH_S)
            await self._touch_active()

    async def _touch_active(self) -> None:
        """Record who was active (inactive enrollments expire by it); best effort:
        a lost flush only makes an enrollment look older by up to a flush interval."""
        people, self.decider.active = self.decider.active, set()
        if not people:
            return
        try:
            await self._pool.execute(Q["touch_people"], [uuid.UUID(bytes=p) for p in people])
        except TRANSIENT_ERRORS as exc:
            self.decider.active |= people
            log.warning("activity_flush_failed", error_type=type(exc).__name__)

    def _supersede(self, device_id: uuid.UUID, epoch: int) -> None:
        """End this server's streams of the device that hold an epoch below `epoch`."""
        for stream in list(self._streams.get(device_id, ())):
            if stream.epoch < epoch:
                stream.end(stream_superseded())

    def _device_changed(self, device_id: uuid.UUID) -> None:
        streams = self._streams.get(device_id)
        if not streams:
            return
        current = self.caches.device_now(device_id)
        for stream in list(streams):
            if (
                current is None
                or not current.active
                or current.certificate_serial != stream.device.certificate_serial
            ):
                stream.end(device_revoked())

    async def _device_of_caller(self) -> DeviceInfo:
        principal = current_principal()
        try:
            device_id = uuid.UUID(principal.name)
        except ValueError:
            raise device_revoked() from None
        device = await self.caches.device(device_id)
        # A re-issued certificate replaces the old one: only the current serial counts.
        if device is None or not device.active:
            raise device_revoked()
        if device.certificate_serial != principal.certificate_serial:
            raise device_revoked()
        return device

    # -- StreamScans -----------------------------------------------------------

    # Acks are written with context.write; the generated base declares an iterator.
    async def StreamScans(  # type: ignore[override]
        self, request_iterator: AsyncIterator[pb.StreamScansRequest], context: Context
    ) -> None:
        if self._draining:
            raise errors.Unavailable("the server is shutting down; reconnect")
        device = await self._device_of_caller()
        venue = await self.caches.venue(device.venue_id)
        epoch = int(await self._pool.fetchval(Q["take_device"], device.device_id))
        self._supersede(device.device_id, epoch)
        water = one(await self._pool.fetchrow(Q["device_high_water"], device.device_id))
        high_water = int(water["high_water"] or 0)
        settings = self._settings
        stream = _Stream(
            device,
            settings.max_in_flight_batches,
            epoch,
            Ledger(high_water, int(water["retired_through"])),
        )
        self._streams.setdefault(device.device_id, set()).add(stream)
        self._idle.clear()
        log.info("stream_opened", venue_known=venue is not None)
        try:
            await context.write(
                pb.StreamScansResponse(
                    settings=pb.StreamSettings(
                        device_id=str(device.device_id),
                        venue_id=str(device.venue_id),
                        last_stored_sequence=high_water,
                        max_scans_per_batch=settings.max_scans_per_batch,
                        max_in_flight_batches=settings.max_in_flight_batches,
                        max_scan_age=_duration(settings.max_scan_age_s),
                        max_clock_skew=_duration(settings.max_clock_skew_s),
                        server_time=timestamp(us_to_datetime(int(time.time() * 1e6))),
                    )
                )
            )
            await self._run_stream(stream, request_iterator, context)
        finally:
            streams = self._streams.get(device.device_id)
            if streams is not None:
                streams.discard(stream)
                if not streams:
                    del self._streams[device.device_id]
            if not self._streams:
                self._idle.set()

    async def _run_stream(
        self,
        stream: _Stream,
        requests: AsyncIterator[pb.StreamScansRequest],
        context: Context,
    ) -> None:
        commits: set[asyncio.Task[None]] = set()
        stream.reader = asyncio.create_task(self._read(stream, requests, commits))
        reader_done = False
        try:
            while not (reader_done and not commits and stream.queue.empty()):
                item = await stream.queue.get()
                if isinstance(item, _End):
                    reader_done = True
                    continue
                if isinstance(item, CommitFailed):
                    stream.end(
                        errors.Unavailable("the database is unavailable; resend unacked scans")
                    )
                    continue
                if not isinstance(item, pb.StreamScansResponse):  # _WAKE
                    continue
                if item.WhichOneof("kind") == "ack":
                    # Before the write: a device may send its next batch the moment
                    # the ack reaches it, and must find the window open.
                    stream.in_flight -= 1
                    if stream.hinted and not self.admission.lagging:
                        stream.hinted = False
                        await context.write(self._flow_hint(stream, restore=True))
                await context.write(item)
        finally:
            stream.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stream.reader
        if stream.end_error is not None:
            raise stream.end_error

    @staticmethod
    def _commit_done(
        stream: _Stream, commits: set[asyncio.Task[None]], task: asyncio.Task[None]
    ) -> None:
        """A commit task ended (acked, failed, or superseded: not every end queues
        something), so the writer loop must look again at whether it is done."""
        commits.discard(task)
        stream.queue.put_nowait(_WAKE)

    def _flow_hint(
        self, stream: _Stream, wait_s: float = 0.0, restore: bool = False
    ) -> pb.StreamScansResponse:
        """Halve the device's window while the inbox lags; `restore` gives the whole
        window back (and no wait) once it no longer does."""
        return pb.StreamScansResponse(
            flow_control=pb.FlowControlHint(
                retry_after=_duration(0 if restore else wait_s),
                max_in_flight_batches=stream.window if restore else max(1, stream.window // 2),
            )
        )

    async def _read(
        self,
        stream: _Stream,
        requests: AsyncIterator[pb.StreamScansRequest],
        commits: set[asyncio.Task[None]],
    ) -> None:
        max_scans = self._settings.max_scans_per_batch
        try:
            async for request in requests:
                if not request.HasField("batch"):
                    raise errors.InvalidArgument("each message must carry a batch", field="batch")
                batch = request.batch
                if not 1 <= len(batch.batch_id) <= 64:
                    raise errors.InvalidArgument(
                        "batch_id must be 1 to 64 characters", field="batch.batch_id"
                    )
                if not 1 <= len(batch.scans) <= max_scans:
                    raise errors.InvalidArgument(
                        f"a batch must carry 1 to {max_scans} scans",
                        field="scans",
                        metadata={"max_scans_per_batch": str(max_scans)},
                    )
                if stream.in_flight >= stream.window:
                    raise errors.ResourceExhausted(
                        f"more than {stream.window} batches are unacknowledged; wait for acks",
                        metadata={"max_in_flight_batches": str(stream.window)},
                    )
                stream.in_flight += 1
                scans = [Scan.from_proto(s) for s in batch.scans]
                ledger = stream.ledger
                lookup = ledger.needs_lookup(scans)
                if lookup:
                    found = await self._pool.fetch(
                        Q["stored_scans"], stream.device.device_id, lookup
                    )
                    ledger.recalled(fingerprints(found))
                venue = await self.caches.venue(stream.device.venue_id)
                results, rows, entries = self.decider.decide(
                    scans, venue, stream.device.device_id, ledger
                )
                ack = pb.StreamScansResponse(
                    ack=pb.ScanBatchAck(
                        batch_id=batch.batch_id,
                        highest_sequence=max(s.sequence for s in scans),
                        results=results,
                    )
                )
                previous, mine = stream.last_acked, asyncio.get_running_loop().create_future()
                stream.last_acked = mine
                task = asyncio.create_task(
                    self._commit_then_ack(
                        stream, rows=rows, ack=ack, entries=entries, previous=previous, mine=mine
                    )
                )
                commits.add(task)
                task.add_done_callback(functools.partial(self._commit_done, stream, commits))
        except errors.DomainError as err:
            stream.end_error = stream.end_error or err
        except asyncio.CancelledError:
            pass  # end() was called; end_error says why
        finally:
            stream.queue.put_nowait(_End(stream.end_error))

    async def _commit_then_ack(
        self,
        stream: _Stream,
        *,
        rows: list[Any],
        ack: pb.StreamScansResponse,
        entries: Entries | None,
        previous: asyncio.Future[bool],
        mine: asyncio.Future[bool],
    ) -> None:
        """Commit a batch's rows, then queue its ack once every earlier batch's is;
        resolve `mine` with whether it was (later batches wait on it)."""
        acked = False
        try:
            if self.admission.lagging and rows:
                # Tell the device first (at most once a second), then hold the batch
                # until the inbox drains enough to admit it.
                if time.monotonic() >= stream.hint_quiet_until:
                    stream.hint_quiet_until = time.monotonic() + 1.0
                    stream.hinted = True
                    wait = self.admission.expected_wait(len(rows))
                    stream.queue.put_nowait(self._flow_hint(stream, wait))
                await self.admission.admit(len(rows))
            try:
                await self.committer.submit(rows, stream.device.device_id, stream.epoch)
            except CommitFailed as failed:
                stream.queue.put_nowait(failed)
                return
            except Superseded:
                stream.end(stream_superseded())
                return
            if entries is not None:
                stream.ledger.settle(entries)
            if await previous:
                stream.queue.put_nowait(ack)
                acked = True
        finally:
            if not mine.done():
                mine.set_result(acked)

    # -- unary check-ins -------------------------------------------------------

    async def CheckIn(self, request: pb.CheckInRequest, context: Context) -> pb.CheckInResponse:
        """One scan as the device's writer: the epoch, the lookup and the row in one
        transaction, so calls of one device serialize on its epoch row and each
        sees what the one before it stored. Ends the device's open stream."""
        device = await self._device_of_caller()
        venue = await self.caches.venue(device.venue_id)
        scan = Scan.from_proto(request.scan)
        async with self._pool.acquire() as conn, conn.transaction():
            epoch = int(await conn.fetchval(Q["take_device"], device.device_id))
            water = one(await conn.fetchrow(Q["device_high_water"], device.device_id))
            ledger = Ledger(int(water["high_water"] or 0), int(water["retired_through"]))
            lookup = ledger.needs_lookup([scan])
            if lookup:
                found = await conn.fetch(Q["stored_scans"], device.device_id, lookup)
                ledger.recalled(fingerprints(found))
            results, rows, _ = self.decider.decide([scan], venue, device.device_id, ledger)
            if rows:
                await conn.copy_records_to_table("scan_inbox", records=rows, columns=INBOX_COLUMNS)
        self._supersede(device.device_id, epoch)
        return pb.CheckInResponse(result=results[0])

    async def _submit_or_unavailable(self, rows: list[Any]) -> None:
        try:
            await self.committer.submit(rows)
        except CommitFailed:
            raise errors.Unavailable("the database is unavailable; retry") from None

    async def SelfCheckIn(
        self, request: pb.SelfCheckInRequest, context: Context
    ) -> pb.SelfCheckInResponse:
        request_id = validation.optional_uuid(request.request_id, "request_id")
        if request.direction not in DIRECTIONS:
            raise errors.InvalidArgument(
                "direction must be SCAN_DIRECTION_ENTRY or SCAN_DIRECTION_EXIT", field="direction"
            )
        if not request.HasField("scan_time"):
            raise errors.InvalidArgument("scan_time is required", field="scan_time")
        try:
            venue_id = self._venue_codes.verify(request.venue_code)
        except TokenRefused as refused:
            reason = REASONS[refused.problem]
            return pb.SelfCheckInResponse(
                result=pb.ScanResult(outcome=pb.SCAN_OUTCOME_REJECTED, reject_reason=reason)
            )
        venue = await self.caches.venue(venue_id)
        if venue is None:
            return pb.SelfCheckInResponse(
                result=pb.ScanResult(
                    outcome=pb.SCAN_OUTCOME_REJECTED,
                    reject_reason=pb.SCAN_REJECT_REASON_VENUE_NOT_FOUND,
                )
            )
        reply = {"venue_id": str(venue_id), "venue_display_name": venue.display_name}
        if request_id is not None:
            earlier = await self._pool.fetchrow(Q["get_self_checkin"], request_id)
            if earlier is not None:
                return pb.SelfCheckInResponse(result=self._replayed(earlier), **reply)
        scan = Scan(
            0,
            request.personal_token,
            request.scan_time.seconds * 1_000_000 + request.scan_time.nanos // 1000,
            request.direction,
        )
        results, rows, _ = self.decider.decide([scan], venue, None, None)
        result = results[0]
        if not rows:
            return pb.SelfCheckInResponse(result=result, **reply)
        if request_id is None:
            await self._submit_or_unavailable(rows)
            return pb.SelfCheckInResponse(result=result, **reply)
        # With a request id: the claim and the row commit together, so a retry finds
        # the first answer or nothing at all.
        outcome = "denied" if result.outcome == pb.SCAN_OUTCOME_DENIED else "admitted"
        decision = uuid.UUID(result.decision_id) if result.decision_id else None
        async with self._pool.acquire() as conn, conn.transaction():
            claimed = await conn.fetchval(
                Q["claim_self_checkin"], request_id, venue_id, outcome, decision
            )
            if claimed is None:
                earlier = one(await conn.fetchrow(Q["get_self_checkin"], request_id))
                return pb.SelfCheckInResponse(result=self._replayed(earlier), **reply)
            await conn.copy_records_to_table("scan_inbox", records=rows, columns=INBOX_COLUMNS)
        return pb.SelfCheckInResponse(result=result, **reply)

    @staticmethod
    def _replayed(row: asyncpg.Record) -> pb.ScanResult:
        if row["outcome"] == "denied":
            return pb.ScanResult(
                outcome=pb.SCAN_OUTCOME_DENIED, decision_id=str(row["decision_id"])
            )
        return pb.ScanResult(outcome=pb.SCAN_OUTCOME_ADMITTED)

    async def GetEntryDecision(
        self, request: pb.GetEntryDecisionRequest, context: Context
    ) -> pb.GetEntryDecisionResponse:
        device = await self._device_of_caller()
        venue = await self.caches.venue(device.venue_id)
        now_us = int(time.time() * 1e6)
        if venue is None or not venue.active:
            return pb.GetEntryDecisionResponse(
                outcome=pb.SCAN_OUTCOME_REJECTED,
                reject_reason=pb.SCAN_REJECT_REASON_VENUE_SUSPENDED,
            )
        try:
            person = self.decider.person_at(request.personal_token, now_us)
        except TokenRefused as refused:
            reason = REASONS[refused.problem]
            return pb.GetEntryDecisionResponse(
                outcome=pb.SCAN_OUTCOME_REJECTED, reject_reason=reason
            )
        if self.caches.is_high_risk(person, now_us / 1e6):
            return pb.GetEntryDecisionResponse(outcome=pb.SCAN_OUTCOME_DENIED)
        return pb.GetEntryDecisionResponse(outcome=pb.SCAN_OUTCOME_ADMITTED)

    # -- enrollment and tokens -------------------------------------------------

    async def EnrollPerson(
        self, request: pb.EnrollPersonRequest, context: Context
    ) -> pb.EnrollPersonResponse:
        phone = enrollment.phone_number(request.phone_number, "phone_number")
        if not request.consent_given:
            raise errors.InvalidArgument(
                "enrollment needs the person's consent", field="consent_given"
            )
        version = validation.text(request.consent_text_version, "consent_text_version", max_len=64)
        language = request.language_code.strip() or "km"
        if len(language) > 35 or not _LANGUAGE.match(language):
            raise errors.InvalidArgument(
                "language_code must be a BCP 47 tag such as km or en", field="language_code"
            )
        person_id = uuid.uuid4()
        key = self._keys.people_key()
        phone_enc = key.encrypt(phone.encode(), b"phone|" + person_id.bytes)
        async with self._pool.acquire() as conn, conn.transaction():
            row = one(
                await conn.fetchrow(
                    Q["enroll_person"],
                    person_id,
                    enrollment.phone_index(self._blind_key, phone),
                    phone_enc,
                    key.key_id,
                    language,
                    version,
                )
            )
            person_id = row["person_id"]
            await audit.record(
                conn,
                "person.enroll",
                "person",
                str(person_id),
                {"consent_text_version": version, "newly_enrolled": row["inserted"]},
            )
        return pb.EnrollPersonResponse(
            person_id=str(person_id),
            personal_token=pb.PersonalToken(
                token=self._tokens.issue_static(person_id),
                form=pb.PERSONAL_TOKEN_FORM_STATIC,
                key_id=self._tokens.current_kid,
            ),
            newly_enrolled=row["inserted"],
            enroll_time=timestamp(row["enroll_time"]),
        )

    async def _person(self, selector: Any) -> uuid.UUID:
        row = await enrollment.find(
            self._pool, selector, blind_key=self._blind_key, tokens=self._tokens
        )
        person: uuid.UUID = row["person_id"]
        return person

    async def IssuePersonalToken(
        self, request: pb.IssuePersonalTokenRequest, context: Context
    ) -> pb.IssuePersonalTokenResponse:
        if request.form not in (pb.PERSONAL_TOKEN_FORM_STATIC, pb.PERSONAL_TOKEN_FORM_ROTATING):
            raise errors.InvalidArgument(
                "form must be PERSONAL_TOKEN_FORM_STATIC or PERSONAL_TOKEN_FORM_ROTATING",
                field="form",
            )
        count = request.window_count or 1
        if not 1 <= count <= _MAX_WINDOWS:
            raise errors.InvalidArgument(
                f"window_count must be 0 to {_MAX_WINDOWS}", field="window_count"
            )
        person_id = await self._person(request.person)
        self.decider.active.add(person_id.bytes)
        kid = self._tokens.current_kid
        if request.form == pb.PERSONAL_TOKEN_FORM_STATIC:
            return pb.IssuePersonalTokenResponse(
                personal_tokens=[
                    pb.PersonalToken(
                        token=self._tokens.issue_static(person_id),
                        form=pb.PERSONAL_TOKEN_FORM_STATIC,
                        key_id=kid,
                    )
                ]
            )
        first = self._tokens.window_at(time.time())
        tokens = []
        for window in range(first, first + count):
            start, end = self._tokens.window_bounds(window)
            tokens.append(
                pb.PersonalToken(
                    token=self._tokens.issue_rotating(person_id, window),
                    form=pb.PERSONAL_TOKEN_FORM_ROTATING,
                    key_id=kid,
                    start_time=timestamp(start),
                    expire_time=timestamp(end),
                )
            )
        return pb.IssuePersonalTokenResponse(
            personal_tokens=tokens, window=_duration(self._tokens.window_s)
        )
