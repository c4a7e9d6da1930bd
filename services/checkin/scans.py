"""Deciding one scan: checks, the admit/deny answer, and the encrypted inbox row.

This is the per-scan cost of the hot path, so it runs without awaiting anything:
everything it needs (token keys, day keys, the risk and erasure sets, the venue's
state, the device's known sequences) is already in memory. The order of checks
decides which reason a scan with several problems gets; it goes from what makes
the scan meaningless (malformed), through what makes it a repeat (duplicate), to
what makes it unacceptable (venue, time, token, person).
"""

from __future__ import annotations

import datetime as dt
import itertools
import time
import uuid
from dataclasses import dataclass
from typing import TypeAlias

from stopcovid.checkin.v1 import checkin_service_pb2 as pb
from stopcovid.common.v1 import common_pb2

from services.checkin.caches import Caches, VenueInfo
from services.checkin.commit import Row
from services.core.config import Settings
from services.core.keys import KeyDestroyed, KeyStore, row_aad
from services.core.tokens import PersonalTokens, TokenProblem, TokenRefused

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
_TOKEN_CACHE_MAX = 500_000


def us_to_datetime(us: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(microseconds=us)


def datetime_to_us(value: dt.datetime) -> int:
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


class Ledger:
    """What one stream knows of its device's sequence numbers, to answer DUPLICATE
    and SEQUENCE_REUSED.

    Scans above every number seen (stored before the stream opened, or on it) are
    new: the common case, costing one comparison. Any other number not among the
    recent ones held here is looked up in the database first (`needs_lookup`):
    that happens for resends after a reconnect, and for a device that repeats or
    reorders scans. The store deduplicates regardless; this decides the answer.

    Memory per stream stays bounded: only the most recent `KEEP` numbers are held,
    each as one int (scan time and direction packed), so the garbage collector has
    no per-scan objects to walk.
    """

    KEEP = 10_000

    __slots__ = ("high_water", "known")

    def __init__(self, high_water: int) -> None:
        self.high_water = high_water
        self.known: dict[int, int] = {}
        """sequence -> pack(scan time in microseconds, direction), insertion-ordered."""

    @staticmethod
    def pack(scan_us: int, direction: int) -> int:
        return scan_us * 4 + direction

    def needs_lookup(self, scans: list[Scan]) -> list[int]:
        return [
            s.sequence
            for s in scans
            if 0 < s.sequence <= self.high_water and s.sequence not in self.known
        ]

    def remember(self, sequence: int, scan_us: int, direction: int) -> None:
        self.known[sequence] = scan_us * 4 + direction
        self.high_water = max(self.high_water, sequence)
        if len(self.known) > 2 * self.KEEP:
            # Drop the oldest half; dicts keep insertion order, so no sort.
            for old in list(itertools.islice(self.known, len(self.known) - self.KEEP)):
                del self.known[old]


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
        # People whose scans were stored since the last activity flush (service.py).
        self.active: set[bytes] = set()
        self._verified: dict[str, tuple[bytes, int | None]] = {}
        self._days: dict[int, dt.date] = {}

    def person_of(self, token: str, at_us: int) -> bytes:
        """The person id (16 bytes) of a token valid at `at_us`; raises TokenRefused.

        Verified tokens are remembered: the same cards are scanned all day, and a
        lookup is ten times cheaper than decrypting."""
        hit = self._verified.get(token)
        if hit is None:
            verified = self._tokens.verify(token, at_us / 1e6)
            hit = (verified.person_id.bytes, verified.window)
            if len(self._verified) >= _TOKEN_CACHE_MAX:
                self._verified.clear()
            self._verified[token] = hit
        elif hit[1] is not None and not self._tokens.in_window(hit[1], at_us / 1e6):
            raise TokenRefused(TokenProblem.TOKEN_EXPIRED)
        return hit[0]

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
    ) -> tuple[list[pb.ScanResult], list[Row]]:
        """Results (in order) and inbox rows (stored scans only) of a batch."""
        now_us = now_us if now_us is not None else int(time.time() * 1e6)
        now_s = now_us / 1e6
        receive_time = us_to_datetime(now_us)
        oldest, newest = now_us - self._max_age_us, now_us + self._skew_us
        venue_id = venue.venue_id if venue else None
        venue_bytes = venue_id.bytes if venue_id else b""
        device_bytes = device_id.bytes if device_id else None
        venue_ok = venue is not None and venue.active
        high_risk = self._caches.high_risk
        erased = self._caches.erased
        active = self.active
        results: list[pb.ScanResult] = []
        rows: list[Row] = []
        for scan in scans:
            sequence = scan.sequence
            if (
                (device_id is not None and sequence < 1)
                or scan.scan_us is None
                or scan.direction not in DIRECTIONS
            ):
                results.append(_result(sequence, REJECTED, pb.SCAN_REJECT_REASON_MALFORMED_SCAN))
                continue
            if ledger is not None:
                seen = ledger.known.get(sequence)
                if seen is not None:
                    if seen == scan.scan_us * 4 + scan.direction:
                        results.append(_result(sequence, DUPLICATE))
                    else:
                        results.append(
                            _result(sequence, REJECTED, pb.SCAN_REJECT_REASON_SEQUENCE_REUSED)
                        )
                    continue
            if not venue_ok:
                results.append(_result(sequence, REJECTED, pb.SCAN_REJECT_REASON_VENUE_SUSPENDED))
                continue
            scan_us = scan.scan_us
            if scan_us < oldest:  # (not None: checked above)
                results.append(_result(sequence, REJECTED, pb.SCAN_REJECT_REASON_SCAN_TIME_TOO_OLD))
                continue
            if scan_us >= newest:
                results.append(
                    _result(sequence, REJECTED, pb.SCAN_REJECT_REASON_SCAN_TIME_IN_FUTURE)
                )
                continue
            try:
                person = self.person_of(scan.token, scan_us)
            except TokenRefused as refused:
                results.append(_result(sequence, REJECTED, REASONS[refused.problem]))
                continue
            if person in erased:
                results.append(
                    _result(sequence, REJECTED, pb.SCAN_REJECT_REASON_PERSON_NOT_ENROLLED)
                )
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
            rows.append(
                (
                    day,
                    venue_id,
                    device_id,
                    seq_or_none,
                    us_to_datetime(scan_us),
                    DIRECTIONS[scan.direction],
                    outcome,
                    decision_id,
                    key.key_id,
                    key.pseudonym(person),
                    key.encrypt(person, aad),
                    receive_time,
                )
            )
            if ledger is not None:
                ledger.remember(sequence, scan_us, scan.direction)
        return results, rows
