"""Deciding one scan: checks, the admit/deny answer, and the encrypted inbox row.

This is the per-scan cost of the hot path, so it runs without awaiting anything:
everything it needs (token keys, day keys, the risk and erasure sets, the venue's
state, the device's known sequences) is already in memory. The order of checks
decides which reason a scan with several problems gets; it goes from what makes
the scan meaningless (malformed, a token that is not genuine, a person erased),
through what makes it a repeat (duplicate, reused number), to what makes it
unacceptable now (venue, time, a stale rotating token).
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeAlias

from google.protobuf.internal.containers import RepeatedCompositeFieldContainer
from prometheus_client import Counter
from stopcovid.checkin.v1 import checkin_service_pb2 as pb
from stopcovid.common.v1 import common_pb2

from services.checkin.caches import Caches, VenueInfo
from services.checkin.copyrows import RowEncoder
from services.domain.people.tokens import PersonalTokens, TokenProblem, TokenRefused
from services.kernel import metrics
from services.kernel.config import Settings
from services.kernel.keys import DayKey, KeyDestroyed, KeyStore, row_aad_parts

ENTRY = common_pb2.SCAN_DIRECTION_ENTRY
EXIT = common_pb2.SCAN_DIRECTION_EXIT
DIRECTIONS: dict[int, str] = {ENTRY: "entry", EXIT: "exit"}

ADMITTED = pb.SCAN_OUTCOME_ADMITTED
DENIED = pb.SCAN_OUTCOME_DENIED
REJECTED = pb.SCAN_OUTCOME_REJECTED
DUPLICATE = pb.SCAN_OUTCOME_DUPLICATE

Outcome: TypeAlias = pb.ScanOutcome.ValueType
Reason: TypeAlias = pb.ScanRejectReason.ValueType
Results: TypeAlias = RepeatedCompositeFieldContainer[pb.ScanResult]
"""Where a batch's results go: a ScanBatchAck's `results` (Decider.decide)."""
Packer: TypeAlias = Callable[[int, int, bytes, bytes], bytes]
"""(sequence, scan_us, person_ref, person_enc) -> a row (copyrows.RowEncoder.packer)."""

REASONS: dict[TokenProblem, Reason] = {
    problem: pb.ScanRejectReason.Value(f"SCAN_REJECT_REASON_{problem.value}")
    for problem in TokenProblem
}

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_EPOCH_DAY = _EPOCH.date()
_US_PER_DAY = 86_400_000_000


def us_to_datetime(us: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(microseconds=us)


def datetime_to_us(value: dt.datetime) -> int:
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


class Ledger:
    """The exact record of one writer's sequence numbers: what answers DUPLICATE and
    SEQUENCE_REUSED.

    A device has one writer at a time (the stream or unary call holding its epoch,
    migration 0006), and the writer reads the device's stored state only after
    taking the epoch, so this record plus the database is the whole truth:

    - numbers decided by this writer are held here with their content's
      fingerprint (`known`), from the moment they are decided, so a repeat in a
      later batch is answered before the first one's commit is even done;
    - numbers at or below `high_water` (the device's highest stored number when
      the writer started) that are not held here are looked up in the store and
      the inbox on every day (`needs_lookup`): resends after a reconnect;
    - numbers at or below `retired` were used on days that have expired.

    Memory stays bounded: at most `keep` settled numbers are held (each an int),
    oldest dropped first. A number is settled when its batch's commit is done;
    an unsettled one is never dropped, because a lookup could not find it yet.
    Nor is any number dropped while a batch is being decided (`deciding`): the
    batch skipped the lookup of the numbers held here, so they must still be here
    when the decision reads them, after the awaits in between (the lookup itself,
    the venue), during which other batches' commits settle.
    """

    KEEP = 1_000
    """Settled numbers held per writer. A number dropped is settled, so a repeat of
    it is looked up in the store instead (only a device that resends on the same
    stream does that); each number held costs about 100 bytes, and 10,000 had made
    a stream at full window hold about 1 MB (`./dev bench connections`, slow)."""

    __slots__ = ("_batches", "_deciding", "high_water", "keep", "known", "retired")

    def __init__(self, high_water: int, retired: int = 0, keep: int = KEEP) -> None:
        self.high_water = high_water
        self.retired = retired
        self.keep = keep
        self.known: dict[int, int] = {}
        """sequence -> fingerprint of the scan's content (`fingerprint`)."""
        self._batches: collections.deque[Entries] = collections.deque()
        self._deciding = 0

    @contextlib.contextmanager
    def deciding(self) -> Iterator[None]:
        """Around one batch, from `needs_lookup` to its decision: nothing is dropped
        meanwhile; what is over `keep` is dropped when the batch is decided."""
        self._deciding += 1
        try:
            yield
        finally:
            self._deciding -= 1
            self._trim()

    @staticmethod
    def fingerprint(scan_us: int, direction: int, person_ref: bytes) -> int:
        """What makes two scans with one number the same scan: the time, the direction
        and the person (as the day's pseudonym, so a stored row compares too)."""
        return hash((scan_us, direction, person_ref))

    def needs_lookup(self, scans: Iterable[pb.Scan]) -> list[int]:
        retired, high_water, known = self.retired, self.high_water, self.known
        sequences = [s.sequence for s in scans]  # each protobuf field read once
        return [n for n in sequences if retired < n <= high_water and n not in known]

    def recalled(self, entries: Iterable[tuple[int, int]]) -> None:
        """Numbers (with fingerprints) found in the database: settled already."""
        batch = Entries(settled=True)
        for sequence, fp in entries:
            if sequence not in self.known:
                self.known[sequence] = fp
                batch.sequences.append(sequence)
        self._batches.append(batch)
        self._trim()

    def open_batch(self) -> Entries:
        batch = Entries(settled=False)
        self._batches.append(batch)
        return batch

    def remember(self, batch: Entries, sequence: int, fp: int) -> None:
        self.known[sequence] = fp
        batch.sequences.append(sequence)
        self.high_water = max(self.high_water, sequence)

    def settle(self, batch: Entries) -> None:
        """The batch's commit is done: its numbers may be dropped when old."""
        batch.settled = True
        self._trim()

    def _trim(self) -> None:
        if self._deciding:
            return
        batches = self._batches
        while len(self.known) > self.keep and batches and batches[0].settled:
            for sequence in batches.popleft().sequences:
                self.known.pop(sequence, None)
        while batches and batches[0].settled and not batches[0].sequences:
            batches.popleft()


class Entries:
    """The numbers one batch (or one lookup) added to a Ledger."""

    __slots__ = ("sequences", "settled")

    def __init__(self, settled: bool) -> None:
        self.sequences: list[int] = []
        self.settled = settled


class TokenCache:
    """Verified personal tokens, so the cards scanned all day are decrypted once.

    Keyed by the token's text, which is canonical (one spelling per token:
    services/domain/people/tokens.py), so the entries are bounded by the genuine tokens
    seen, and filled only with tokens of people who are not erased. At most
    `max_entries` (each about 250 bytes: a token of at most 256 ASCII characters
    is refused earlier, genuine ones are under 70); when full, it starts over."""

    __slots__ = ("_entries", "get", "max_entries")

    def __init__(self, max_entries: int = 200_000) -> None:
        self.max_entries = max_entries
        self._entries: dict[str, tuple[bytes, int | None]] = {}
        self.get: Callable[[str], tuple[bytes, int | None] | None] = self._entries.get
        """The entry of a token, or None: the dict's own lookup (a call less per scan;
        `put` clears the dict, never replaces it)."""

    def put(self, token: str, person: bytes, window: int | None) -> None:
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[token] = (person, window)

    def __len__(self) -> int:
        return len(self._entries)


_TOO_OLD = pb.SCAN_REJECT_REASON_SCAN_TIME_TOO_OLD
_REUSED = pb.SCAN_REJECT_REASON_SEQUENCE_REUSED
_NO_REASON = pb.SCAN_REJECT_REASON_UNSPECIFIED
_MALFORMED = pb.SCAN_REJECT_REASON_MALFORMED_SCAN
_SUSPENDED = pb.SCAN_REJECT_REASON_VENUE_SUSPENDED
_IN_FUTURE = pb.SCAN_REJECT_REASON_SCAN_TIME_IN_FUTURE
_EXPIRED = pb.SCAN_REJECT_REASON_TOKEN_EXPIRED

_ADMITTED_SCANS = metrics.SCANS.labels(outcome="admitted", reason="")
_DENIED_SCANS = metrics.SCANS.labels(outcome="denied", reason="")
_UNSTORED_SCANS: dict[tuple[Outcome, Reason], Counter] = {}
"""(outcome, reason) -> its child of metrics.SCANS, bound when first seen."""


def count_scans(results: Sequence[pb.ScanResult], stored: int, denied: int) -> None:
    """Count one batch's outcomes in the metrics: the stored scans (admitted or
    denied) by their number, and only when some were not stored, the others by
    outcome and reason, in one pass."""
    if stored > denied:
        _ADMITTED_SCANS.inc(stored - denied)
    if denied:
        _DENIED_SCANS.inc(denied)
    if len(results) == stored:
        return
    tally: collections.Counter[tuple[Outcome, Reason]] = collections.Counter(
        (r.outcome, r.reject_reason) for r in results if r.outcome in (REJECTED, DUPLICATE)
    )
    for key, n in tally.items():
        child = _UNSTORED_SCANS.get(key)
        if child is None:
            outcome, reason = key
            name = pb.ScanRejectReason.Name(reason) if reason else ""
            child = _UNSTORED_SCANS[key] = metrics.SCANS.labels(
                outcome=pb.ScanOutcome.Name(outcome).removeprefix("SCAN_OUTCOME_").lower(),
                reason=name.removeprefix("SCAN_REJECT_REASON_"),
            )
        child.inc(n)


def _no_packer(sequence: int, scan_us: int, person_ref: bytes, person_enc: bytes) -> bytes:
    raise AssertionError("a row without a device takes the general encoder")


class _BatchDay:
    """What one batch needs for the scans of one UTC day: the day's key, its sealer
    (a block of nonces for the batch: DayKey.sealer), the row's associated data
    before and after the sequence (keys.row_aad_parts), and the packers of the
    admitted rows of a device (copyrows.RowEncoder.packer)."""

    __slots__ = (
        "_encoder",
        "aad_head",
        "aad_tail",
        "day",
        "entry",
        "exit",
        "key",
        "pseudonym",
        "seal",
    )

    def __init__(
        self,
        key: DayKey,
        encoder: RowEncoder,
        venue_bytes: bytes,
        device_bytes: bytes | None,
        count: int,
    ) -> None:
        self.key = key
        self.day = key.day
        self.pseudonym = key.pseudonym
        self.seal = key.sealer(count)
        self.aad_head, self.aad_tail = row_aad_parts(venue_bytes, device_bytes, key.day)
        self._encoder = encoder
        self.entry: Packer = _no_packer
        self.exit: Packer = _no_packer
        if device_bytes is not None:
            self.entry = encoder.packer(key.day, key.key_id, DIRECTIONS[ENTRY], "admitted")
            self.exit = encoder.packer(key.day, key.key_id, DIRECTIONS[EXIT], "admitted")

    def row(  # noqa: PLR0917 - mirrors RowEncoder.row
        self,
        device_id: uuid.UUID | None,
        sequence: int,
        scan_us: int,
        direction: int,
        outcome: str,
        decision_id: uuid.UUID | None,
        person_ref: bytes,
        person_enc: bytes,
    ) -> bytes:
        """A row of any other shape (a denial, a self check-in), by the general encoder."""
        return self._encoder.row(
            self.day,
            self.key.key_id,
            sequence if device_id is not None else None,
            scan_us,
            DIRECTIONS[direction],
            outcome,
            decision_id,
            person_ref,
            person_enc,
        )


class Decider:
    """Evaluates scans for a venue and builds their inbox rows."""

    def __init__(
        self, settings: Settings, tokens: PersonalTokens, keystore: KeyStore, caches: Caches
    ) -> None:
        self._tokens = tokens
        self._keys = keystore
        self._caches = caches
        self._max_age_us = int(settings.max_scan_age_s * 1e6)
        self._skew_us = int(settings.max_clock_skew_s * 1e6)
        self._offline_s = settings.rotating_token_offline_s
        # People whose scans were stored since the last activity flush (service.py).
        self.active: set[bytes] = set()
        self.verified = TokenCache()
        self._day_keys: dict[int, DayKey] = {}
        """UTC day number (days since the epoch) -> its key, for the days seen."""

    def identify(self, token: str) -> tuple[bytes, int | None]:
        """(person id, rotating window or None) of a genuine token of a person who is
        not erased; raises TokenRefused (PERSON_NOT_ENROLLED for an erased person).
        Freshness is the caller's: `fresh`."""
        hit = self.verified.get(token)
        if hit is None:
            verified = self._tokens.identify(token)
            person = verified.person_id.bytes
            if person in self._caches.erased:
                raise TokenRefused(TokenProblem.PERSON_NOT_ENROLLED)
            self.verified.put(token, person, verified.window)
            return person, verified.window
        if hit[0] in self._caches.erased:  # erased after it was cached
            raise TokenRefused(TokenProblem.PERSON_NOT_ENROLLED)
        return hit

    def fresh(self, window: int | None, scan_us: int, now_us: int) -> bool:
        """Whether a token of `window` (None: static) is valid for a scan made at `scan_us`
        and received at `now_us` (services/domain/people/tokens.py, PersonalTokens.fresh)."""
        if window is None:
            return True
        return self._tokens.fresh(window, scan_us / 1e6, now_us / 1e6, self._offline_s)

    def person_at(self, token: str, now_us: int) -> bytes:
        """The person of a token shown now (GetEntryDecision); raises TokenRefused."""
        person, window = self.identify(token)
        if not self.fresh(window, now_us, now_us):
            raise TokenRefused(TokenProblem.TOKEN_EXPIRED)
        return person

    def decide(
        self,
        scans: Sequence[pb.Scan],
        venue: VenueInfo | None,
        device_id: uuid.UUID | None,
        ledger: Ledger | None,
        *,
        now_us: int | None = None,
        results: Results | None = None,
    ) -> tuple[Results, list[bytes], Entries | None]:
        """Results (in order), the rows to store (binary COPY rows in the inbox
        row's layout: copyrows.py) of a batch, and the ledger entries it added (to
        `settle` once the rows are committed). The results are added to `results`
        when given (the ack's own field, so that they are made in place rather than
        made and then copied into it), else to a new container.

        The checks, in order: the scan is well formed; its token is genuine and its
        person enrolled; its number is new (else DUPLICATE for the same content,
        SEQUENCE_REUSED for other content, wherever and whenever the first one
        arrived); the venue is open; the time is within bounds; a rotating token
        is fresh; the day still has its key. Then admit, or deny at HIGH risk.

        This loop is the hot path's Python cost (about half the CheckIn server's
        CPU at full load, measured with py-spy), so it reads each protobuf field
        once, looks the token cache and the ledger up inline, and does per batch
        and day what does not change from scan to scan (`_BatchDay`: the day's
        sealer with a block of nonces, the associated data around the sequence,
        one struct per row shape)."""
        now_us = now_us if now_us is not None else time.time_ns() // 1000
        now_s = now_us / 1e6
        oldest, newest = now_us - self._max_age_us, now_us + self._skew_us
        venue_id = venue.venue_id if venue else None
        device_bytes = device_id.bytes if device_id else None
        venue_ok = venue is not None and venue.active
        high_risk = self._caches.high_risk
        erased = self._caches.erased
        active = self.active
        cached = self.verified.get
        known = ledger.known if ledger is not None else None
        retired = ledger.retired if ledger is not None else 0
        entries = ledger.open_batch() if ledger is not None else None
        remembered = entries.sequences if entries is not None else None
        denied = 0
        if results is None:
            results = pb.ScanBatchAck().results
        add = results.add
        rows: list[bytes] = []
        encoder = RowEncoder(venue_id, device_id, now_us) if venue_id is not None else None
        days: dict[int, _BatchDay] = {}
        for scan in scans:
            sequence = scan.sequence
            direction = scan.direction
            if (
                (device_id is not None and sequence < 1)
                or direction not in DIRECTIONS
                or not scan.HasField("scan_time")
            ):
                add(sequence=sequence, outcome=REJECTED, reject_reason=_MALFORMED)
                continue
            ts = scan.scan_time
            scan_us = ts.seconds * 1_000_000 + ts.nanos // 1000
            token = scan.personal_token
            hit = cached(token)
            if hit is None or hit[0] in erased:
                try:
                    hit = self.identify(token)
                except TokenRefused as refused:
                    add(sequence=sequence, outcome=REJECTED, reject_reason=REASONS[refused.problem])
                    continue
            person, window = hit
            if known is not None:
                if sequence <= retired:
                    reason = _TOO_OLD if scan_us < oldest else _REUSED
                    add(sequence=sequence, outcome=REJECTED, reject_reason=reason)
                    continue
                seen = known.get(sequence)
                if seen is not None:
                    outcome, reason = self._repeat(seen, scan_us, direction, person)
                    add(sequence=sequence, outcome=outcome, reject_reason=reason)
                    continue
            if not venue_ok:
                add(sequence=sequence, outcome=REJECTED, reject_reason=_SUSPENDED)
                continue
            if scan_us < oldest:
                add(sequence=sequence, outcome=REJECTED, reject_reason=_TOO_OLD)
                continue
            if scan_us >= newest:
                add(sequence=sequence, outcome=REJECTED, reject_reason=_IN_FUTURE)
                continue
            if window is not None and not self.fresh(window, scan_us, now_us):
                add(sequence=sequence, outcome=REJECTED, reject_reason=_EXPIRED)
                continue
            number = scan_us // _US_PER_DAY
            today = days.get(number)
            if today is None:
                try:
                    key = self._day_keys.get(number) or self._day_key(number)
                except KeyDestroyed:
                    # Only reachable if max_scan_age exceeds retention: the day is gone.
                    add(sequence=sequence, outcome=REJECTED, reject_reason=_TOO_OLD)
                    continue
                assert encoder is not None and venue_id is not None  # (venue_ok)
                today = days[number] = _BatchDay(
                    key, encoder, venue_id.bytes, device_bytes, len(scans)
                )
            active.add(person)
            person_ref = today.pseudonym(person)
            expiry = high_risk.get(person)
            if device_id is None:
                # A self check-in: no sequence (its associated data says 0).
                person_enc = today.seal(person, today.aad_head + b"0" + today.aad_tail)
            else:
                person_enc = today.seal(
                    person, b"%b%d%b" % (today.aad_head, sequence, today.aad_tail)
                )
            if direction == ENTRY and expiry is not None and expiry > now_s:
                decision_id = uuid.uuid4()
                denied += 1
                add(sequence=sequence, outcome=DENIED, decision_id=str(decision_id))
                rows.append(
                    today.row(
                        device_id,
                        sequence,
                        scan_us,
                        direction,
                        "denied",
                        decision_id,
                        person_ref,
                        person_enc,
                    )
                )
            elif device_id is None:
                add(sequence=sequence, outcome=ADMITTED)
                rows.append(
                    today.row(
                        None, sequence, scan_us, direction, "admitted", None, person_ref, person_enc
                    )
                )
            else:
                add(sequence=sequence, outcome=ADMITTED)
                pack = today.entry if direction == ENTRY else today.exit
                rows.append(pack(sequence, scan_us, person_ref, person_enc))
            if known is not None and remembered is not None:
                known[sequence] = hash((scan_us, direction, person_ref))  # Ledger.fingerprint
                remembered.append(sequence)
        if ledger is not None and remembered:
            ledger.high_water = max(ledger.high_water, *remembered)
        if metrics.enabled:
            count_scans(results, len(rows), denied)
        return results, rows, entries

    def _day_key(self, number: int) -> DayKey:
        """The key of UTC day `number` (days since the epoch), remembered; raises
        KeyDestroyed for a day whose key was destroyed (never remembered, so a day
        that expires while this server runs is refused from then on)."""
        key = self._keys.day_key(_EPOCH_DAY + dt.timedelta(days=number))
        if len(self._day_keys) > 64:
            self._day_keys.clear()
        self._day_keys[number] = key
        return key

    def _repeat(
        self, seen: int, scan_us: int, direction: int, person: bytes
    ) -> tuple[Outcome, Reason]:
        """The answer to a number already stored (or being stored) for the device:
        DUPLICATE (no reason) or REJECTED for SEQUENCE_REUSED."""
        number = scan_us // _US_PER_DAY
        try:
            key = self._day_keys.get(number) or self._day_key(number)
        except KeyDestroyed:
            # Its day is gone, so it cannot be the scan stored under this number.
            return REJECTED, _REUSED
        if Ledger.fingerprint(scan_us, direction, key.pseudonym(person)) == seen:
            return DUPLICATE, _NO_REASON
        return REJECTED, _REUSED
