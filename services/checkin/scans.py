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
import datetime as dt
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeAlias

from stopcovid.checkin.v1 import checkin_service_pb2 as pb
from stopcovid.common.v1 import common_pb2

from services.checkin.caches import Caches, VenueInfo
from services.domain.checkins.inbox import InboxRow
from services.domain.people.tokens import PersonalTokens, TokenProblem, TokenRefused
from services.kernel.config import Settings
from services.kernel.keys import KeyDestroyed, KeyStore, row_aad

ENTRY = common_pb2.SCAN_DIRECTION_ENTRY
EXIT = common_pb2.SCAN_DIRECTION_EXIT
DIRECTIONS: dict[int, str] = {ENTRY: "entry", EXIT: "exit"}

ADMITTED = pb.SCAN_OUTCOME_ADMITTED
DENIED = pb.SCAN_OUTCOME_DENIED
REJECTED = pb.SCAN_OUTCOME_REJECTED
DUPLICATE = pb.SCAN_OUTCOME_DUPLICATE

Outcome: TypeAlias = pb.ScanOutcome.ValueType
Reason: TypeAlias = pb.ScanRejectReason.ValueType

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
    """

    KEEP = 10_000

    __slots__ = ("_batches", "high_water", "keep", "known", "retired")

    def __init__(self, high_water: int, retired: int = 0, keep: int = KEEP) -> None:
        self.high_water = high_water
        self.retired = retired
        self.keep = keep
        self.known: dict[int, int] = {}
        """sequence -> fingerprint of the scan's content (`fingerprint`)."""
        self._batches: collections.deque[Entries] = collections.deque()

    @staticmethod
    def fingerprint(scan_us: int, direction: int, person_ref: bytes) -> int:
        """What makes two scans with one number the same scan: the time, the direction
        and the person (as the day's pseudonym, so a stored row compares too)."""
        return hash((scan_us, direction, person_ref))

    def needs_lookup(self, scans: list[Scan]) -> list[int]:
        return [
            s.sequence
            for s in scans
            if self.retired < s.sequence <= self.high_water and s.sequence not in self.known
        ]

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

    __slots__ = ("_entries", "max_entries")

    def __init__(self, max_entries: int = 200_000) -> None:
        self.max_entries = max_entries
        self._entries: dict[str, tuple[bytes, int | None]] = {}

    def get(self, token: str) -> tuple[bytes, int | None] | None:
        return self._entries.get(token)

    def put(self, token: str, person: bytes, window: int | None) -> None:
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[token] = (person, window)

    def __len__(self) -> int:
        return len(self._entries)


def _result(
    sequence: int,
    outcome: Outcome,
    reason: Reason = pb.SCAN_REJECT_REASON_UNSPECIFIED,
    decision: str = "",
) -> pb.ScanResult:
    return pb.ScanResult(
        sequence=sequence, outcome=outcome, reject_reason=reason, decision_id=decision
    )


@dataclass
class Scan:
    """One scan's fields, from a device scan or a self check-in."""

    sequence: int
    token: str
    scan_us: int | None
    """Scan time in microseconds since the epoch; None when the scan had none."""
    direction: int

    @classmethod
    def from_proto(cls, scan: pb.Scan) -> Scan:
        ts = scan.scan_time
        scan_us = ts.seconds * 1_000_000 + ts.nanos // 1000 if scan.HasField("scan_time") else None
        return cls(scan.sequence, scan.personal_token, scan_us, scan.direction)


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
        self._days: dict[int, dt.date] = {}

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

    def day_of(self, scan_us: int) -> dt.date:
        """The UTC day of a scan time: its partition and its day key."""
        number = scan_us // _US_PER_DAY
        day = self._days.get(number)
        if day is None:
            day = _EPOCH_DAY + dt.timedelta(days=number)
            self._days[number] = day
        return day

    def decide(
        self,
        scans: list[Scan],
        venue: VenueInfo | None,
        device_id: uuid.UUID | None,
        ledger: Ledger | None,
        now_us: int | None = None,
    ) -> tuple[list[pb.ScanResult], list[InboxRow], Entries | None]:
        """Results (in order), inbox rows (stored scans only) of a batch, and the
        ledger entries it added (to `settle` once the rows are committed).

        The checks, in order: the scan is well formed; its token is genuine and its
        person enrolled; its number is new (else DUPLICATE for the same content,
        SEQUENCE_REUSED for other content, wherever and whenever the first one
        arrived); the venue is open; the time is within bounds; a rotating token
        is fresh; the day still has its key. Then admit, or deny at HIGH risk."""
        now_us = now_us if now_us is not None else int(time.time() * 1e6)
        now_s = now_us / 1e6
        receive_time = us_to_datetime(now_us)
        oldest, newest = now_us - self._max_age_us, now_us + self._skew_us
        venue_id = venue.venue_id if venue else None
        venue_bytes = venue_id.bytes if venue_id else b""
        device_bytes = device_id.bytes if device_id else None
        venue_ok = venue is not None and venue.active
        high_risk = self._caches.high_risk
        active = self.active
        known = ledger.known if ledger is not None else None
        retired = ledger.retired if ledger is not None else 0
        entries = ledger.open_batch() if ledger is not None else None
        results: list[pb.ScanResult] = []
        rows: list[InboxRow] = []
        for scan in scans:
            sequence = scan.sequence
            scan_us = scan.scan_us
            if (
                (device_id is not None and sequence < 1)
                or scan_us is None
                or scan.direction not in DIRECTIONS
            ):
                results.append(_result(sequence, REJECTED, pb.SCAN_REJECT_REASON_MALFORMED_SCAN))
                continue
            try:
                person, window = self.identify(scan.token)
            except TokenRefused as refused:
                results.append(_result(sequence, REJECTED, REASONS[refused.problem]))
                continue
            if known is not None:
                if sequence <= retired:
                    reason = (
                        pb.SCAN_REJECT_REASON_SCAN_TIME_TOO_OLD
                        if scan_us < oldest
                        else pb.SCAN_REJECT_REASON_SEQUENCE_REUSED
                    )
                    results.append(_result(sequence, REJECTED, reason))
                    continue
                seen = known.get(sequence)
                if seen is not None:
                    results.append(self._repeat(sequence, seen, scan_us, scan.direction, person))
                    continue
            if not venue_ok:
                results.append(_result(sequence, REJECTED, pb.SCAN_REJECT_REASON_VENUE_SUSPENDED))
                continue
            if scan_us < oldest:
                results.append(_result(sequence, REJECTED, pb.SCAN_REJECT_REASON_SCAN_TIME_TOO_OLD))
                continue
            if scan_us >= newest:
                results.append(
                    _result(sequence, REJECTED, pb.SCAN_REJECT_REASON_SCAN_TIME_IN_FUTURE)
                )
                continue
            if window is not None and not self.fresh(window, scan_us, now_us):
                results.append(_result(sequence, REJECTED, pb.SCAN_REJECT_REASON_TOKEN_EXPIRED))
                continue
            day = self.day_of(scan_us)
            try:
                key = self._keys.day_key(day)
            except KeyDestroyed:
                # Only reachable if max_scan_age exceeds retention: the day is gone.
                results.append(_result(sequence, REJECTED, pb.SCAN_REJECT_REASON_SCAN_TIME_TOO_OLD))
                continue
            active.add(person)
            expiry = high_risk.get(person)
            decision_id = None
            if scan.direction == ENTRY and expiry is not None and expiry > now_s:
                decision_id = uuid.uuid4()
                results.append(_result(sequence, DENIED, decision=str(decision_id)))
                outcome = "denied"
            else:
                results.append(_result(sequence, ADMITTED))
                outcome = "admitted"
            seq_or_none = sequence if device_id is not None else None
            aad = row_aad(venue_bytes, device_bytes, seq_or_none, day)
            person_ref = key.pseudonym(person)
            rows.append(
                InboxRow(
                    day,
                    venue_id,  # type: ignore[arg-type]  # not None: venue_ok
                    device_id,
                    seq_or_none,
                    us_to_datetime(scan_us),
                    DIRECTIONS[scan.direction],
                    outcome,
                    decision_id,
                    key.key_id,
                    person_ref,
                    key.encrypt(person, aad),
                    receive_time,
                )
            )
            if ledger is not None and entries is not None:
                ledger.remember(
                    entries, sequence, Ledger.fingerprint(scan_us, scan.direction, person_ref)
                )
        return results, rows, entries

    def _repeat(
        self, sequence: int, seen: int, scan_us: int, direction: int, person: bytes
    ) -> pb.ScanResult:
        """The answer to a number already stored (or being stored) for the device."""
        try:
            person_ref = self._keys.day_key(self.day_of(scan_us)).pseudonym(person)
        except KeyDestroyed:
            # Its day is gone, so it cannot be the scan stored under this number.
            return _result(sequence, REJECTED, pb.SCAN_REJECT_REASON_SEQUENCE_REUSED)
        if Ledger.fingerprint(scan_us, direction, person_ref) == seen:
            return _result(sequence, DUPLICATE)
        return _result(sequence, REJECTED, pb.SCAN_REJECT_REASON_SEQUENCE_REUSED)
