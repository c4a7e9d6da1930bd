"""Deciding a batch of scans in one pass (scans.py), against a plain per-scan
reading of the rules: the same result for every scan, and for every stored one the
row the general encoder makes, its person id sealed under the day key and bound to
the row, with a nonce of its own.

Without servers: a real key store in a temporary directory, real tokens."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stopcovid.checkin.v1 import checkin_service_pb2 as pb
from stopcovid.common.v1 import common_pb2

from services.checkin.caches import Caches, VenueInfo
from services.checkin.copyrows import RowEncoder
from services.checkin.scans import DIRECTIONS, ENTRY, REASONS, Decider, Ledger
from services.domain.people.tokens import PersonalTokens, TokenRefused
from services.kernel import keys
from services.kernel.config import Settings

NOW_US = int(time.time()) * 1_000_000 + 123_456
WINDOW_S = 300
_US_PER_DAY = 86_400_000_000


class World:
    """One venue and device, a real key store, and a cast of people."""

    def __init__(self, path: Path) -> None:
        self.settings = Settings.from_env()
        self.keystore = keys.KeyStore(path, b"\x02" * 32)
        self.keystore.ensure_all()
        self.tokens = PersonalTokens("t1", {"t1": b"\x03" * 64}, WINDOW_S)
        self.forger = PersonalTokens("t1", {"t1": b"\x04" * 64}, WINDOW_S)
        self.caches = Caches(None, self.settings)  # type: ignore[arg-type]  # (no reloads here)
        self.people = [uuid.uuid4() for _ in range(4)]
        self.erased, self.risky = uuid.uuid4(), uuid.uuid4()
        self.caches.erased.add(self.erased.bytes)
        self.caches.high_risk[self.risky.bytes] = NOW_US / 1e6 + 3600
        now_window = self.tokens.window_at(NOW_US / 1e6)
        self.token_texts = [
            *(self.tokens.issue_static(p) for p in self.people),
            self.tokens.issue_static(self.erased),
            self.tokens.issue_static(self.risky),
            self.tokens.issue_rotating(self.people[0], now_window),
            self.tokens.issue_rotating(self.people[1], now_window - 50),  # stale
            self.forger.issue_static(self.people[2]),  # not genuine
            "S1.t1.not-base64!",
            "",
        ]
        self.venue = VenueInfo(uuid.uuid4(), True, "a venue")
        self.device = uuid.uuid4()

    def decider(self) -> Decider:
        return Decider(self.settings, self.tokens, self.keystore, self.caches)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return World(tmp_path_factory.mktemp("keys"))


SCAN_TIMES: st.SearchStrategy[int | str | None] = st.one_of(
    st.none(),  # missing: malformed
    st.sampled_from([0, -1_000_000, -3_600_000_000, 5_000_000]).map(lambda d: NOW_US + d),
    st.sampled_from(["too old", "future"]),  # just outside the bounds (settings)
)

SCANS = st.lists(
    st.tuples(
        st.integers(min_value=-1, max_value=12),  # sequence: repeats and reuses
        st.integers(min_value=0, max_value=10),  # index into World.token_texts
        SCAN_TIMES,
        st.sampled_from([ENTRY, common_pb2.SCAN_DIRECTION_EXIT, 0, 7]),
    ),
    min_size=1,
    max_size=25,
)


def _make(world: World, spec: tuple[int, int, int | str | None, int]) -> pb.Scan:
    sequence, token, at, direction = spec
    scan = pb.Scan(
        sequence=sequence,
        personal_token=world.token_texts[token],
        direction=common_pb2.ScanDirection.ValueType(direction),
    )
    if at == "too old":
        at = NOW_US - int(world.settings.max_scan_age_s * 1e6) - 1
    elif at == "future":
        at = NOW_US + int(world.settings.max_clock_skew_s * 1e6) + 10
    if at is not None:
        assert isinstance(at, int)
        scan.scan_time.seconds, micros = divmod(at, 1_000_000)
        scan.scan_time.nanos = micros * 1000
    return scan


class Reference:
    """The rules read one scan at a time, as the docstring of Decider.decide orders them."""

    def __init__(self, world: World, retired: int) -> None:
        self.world = world
        self.retired = retired
        self.known: dict[int, int] = {}

    def result(self, scan: pb.Scan, venue_active: bool) -> tuple[int, int, bytes | None]:
        """(outcome, reject reason, the person's id if stored)."""
        w, s = self.world, self.world.settings
        if scan.sequence < 1 or not scan.HasField("scan_time") or scan.direction not in DIRECTIONS:
            return pb.SCAN_OUTCOME_REJECTED, pb.SCAN_REJECT_REASON_MALFORMED_SCAN, None
        scan_us = scan.scan_time.seconds * 1_000_000 + scan.scan_time.nanos // 1000
        try:
            verified = w.tokens.identify(scan.personal_token)
            if verified.person_id.bytes in w.caches.erased:
                return pb.SCAN_OUTCOME_REJECTED, pb.SCAN_REJECT_REASON_PERSON_NOT_ENROLLED, None
        except TokenRefused as refused:
            return pb.SCAN_OUTCOME_REJECTED, REASONS[refused.problem], None
        person = verified.person_id.bytes
        oldest = NOW_US - int(s.max_scan_age_s * 1e6)
        key = w.keystore.day_key(dt.date(1970, 1, 1) + dt.timedelta(days=scan_us // _US_PER_DAY))
        fingerprint = Ledger.fingerprint(scan_us, scan.direction, key.pseudonym(person))
        if scan.sequence <= self.retired:
            too_old = scan_us < oldest
            reason = pb.SCAN_REJECT_REASON_SCAN_TIME_TOO_OLD if too_old else _REUSED
            return pb.SCAN_OUTCOME_REJECTED, reason, None
        if scan.sequence in self.known:
            if self.known[scan.sequence] == fingerprint:
                return pb.SCAN_OUTCOME_DUPLICATE, 0, None
            return pb.SCAN_OUTCOME_REJECTED, _REUSED, None
        if not venue_active:
            return pb.SCAN_OUTCOME_REJECTED, pb.SCAN_REJECT_REASON_VENUE_SUSPENDED, None
        if scan_us < oldest:
            return pb.SCAN_OUTCOME_REJECTED, pb.SCAN_REJECT_REASON_SCAN_TIME_TOO_OLD, None
        if scan_us >= NOW_US + int(s.max_clock_skew_s * 1e6):
            return pb.SCAN_OUTCOME_REJECTED, pb.SCAN_REJECT_REASON_SCAN_TIME_IN_FUTURE, None
        if verified.window is not None and not w.tokens.fresh(
            verified.window, scan_us / 1e6, NOW_US / 1e6, s.rotating_token_offline_s
        ):
            return pb.SCAN_OUTCOME_REJECTED, pb.SCAN_REJECT_REASON_TOKEN_EXPIRED, None
        self.known[scan.sequence] = fingerprint
        risky = w.caches.is_high_risk(person, NOW_US / 1e6)
        if scan.direction == ENTRY and risky:
            return pb.SCAN_OUTCOME_DENIED, 0, person
        return pb.SCAN_OUTCOME_ADMITTED, 0, person


_REUSED = pb.SCAN_REJECT_REASON_SEQUENCE_REUSED


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batches=st.lists(SCANS, min_size=1, max_size=3),
    retired=st.sampled_from([0, 2]),
    venue_active=st.booleans(),
)
def test_a_batch_is_decided_as_scan_by_scan(
    world: World,
    batches: list[list[tuple[int, int, int | str | None, int]]],
    retired: int,
    venue_active: bool,
) -> None:
    decider = world.decider()
    venue = VenueInfo(world.venue.venue_id, venue_active, "a venue")
    ledger = Ledger(0, retired)
    reference = Reference(world, retired)
    nonces: set[bytes] = set()
    stored_count = 0
    for specs in batches:
        scans = [_make(world, spec) for spec in specs]
        results, rows, entries = decider.decide(scans, venue, world.device, ledger, now_us=NOW_US)
        assert [r.sequence for r in results] == [s.sequence for s in scans]
        stored = iter(rows)
        for scan, result in zip(scans, results, strict=True):
            outcome, reason, person = reference.result(scan, venue_active)
            assert (result.outcome, result.reject_reason) == (outcome, reason), scan
            assert bool(result.decision_id) == (outcome == pb.SCAN_OUTCOME_DENIED)
            if person is not None:
                nonces.add(_check_row(world, scan, result, person, next(stored)))
                stored_count += 1
        assert next(stored, None) is None
        assert entries is not None
        ledger.settle(entries)
    assert len(nonces) == stored_count  # every sealed person id has a nonce of its own


def _check_row(
    world: World, scan: pb.Scan, result: pb.ScanResult, person: bytes, row: bytes
) -> bytes:
    """The row is the general encoder's, with a person_enc that opens to the person
    only with the row's own venue, device, sequence and day; returns its nonce."""
    scan_us = scan.scan_time.seconds * 1_000_000 + scan.scan_time.nanos // 1000
    day = dt.date(1970, 1, 1) + dt.timedelta(days=scan_us // _US_PER_DAY)
    key = world.keystore.day_key(day)
    person_enc = row[-56:-12]  # the last two columns: person_enc (4 + 44), receive_time (4 + 8)
    venue, device = world.venue.venue_id.bytes, world.device.bytes

    def opened(sequence: int) -> bytes:
        return keys.open_row(
            key, person_enc, venue_id=venue, device_id=device, sequence=sequence, day=day
        )

    assert opened(scan.sequence) == person
    with pytest.raises(InvalidTag):
        opened(scan.sequence + 1)
    denied = result.outcome == pb.SCAN_OUTCOME_DENIED
    expected = RowEncoder(world.venue.venue_id, world.device, NOW_US).row(
        day,
        key.key_id,
        scan.sequence,
        scan_us,
        DIRECTIONS[scan.direction],
        "denied" if denied else "admitted",
        uuid.UUID(result.decision_id) if denied else None,
        key.pseudonym(person),
        person_enc,
    )
    assert row == expected
    return person_enc[:12]


def test_a_self_check_in_is_sealed_without_a_sequence(world: World) -> None:
    decider = world.decider()
    scan = _make(world, (0, 1, NOW_US, ENTRY))
    results, rows, entries = decider.decide([scan], world.venue, None, None, now_us=NOW_US)
    assert [r.outcome for r in results] == [pb.SCAN_OUTCOME_ADMITTED]
    assert entries is None
    day = dt.date(1970, 1, 1) + dt.timedelta(days=NOW_US // _US_PER_DAY)
    key = world.keystore.day_key(day)
    person_enc = rows[0][-56:-12]
    opened = keys.open_row(
        key, person_enc, venue_id=world.venue.venue_id.bytes, device_id=None, sequence=None, day=day
    )
    assert opened == world.people[1].bytes
    expected = RowEncoder(world.venue.venue_id, None, NOW_US).row(
        day, key.key_id, None, NOW_US, "entry", "admitted", None, key.pseudonym(opened), person_enc
    )
    assert rows[0] == expected


@given(
    venue=st.binary(min_size=16, max_size=16),
    device=st.none() | st.binary(min_size=16, max_size=16),
    sequence=st.none() | st.integers(min_value=0, max_value=2**63 - 1),
    days=st.integers(min_value=0, max_value=60_000),
)
def test_the_associated_data_in_two_parts_is_the_whole(
    venue: bytes, device: bytes | None, sequence: int | None, days: int
) -> None:
    day = dt.date(1970, 1, 1) + dt.timedelta(days=days)
    head, tail = keys.row_aad_parts(venue, device, day)
    whole = b"|".join(
        (
            b"checkin/v1",
            venue,
            device or b"-",
            str(sequence or 0).encode(),
            day.isoformat().encode(),
        )
    )
    assert (
        head + str(sequence or 0).encode() + tail
        == whole
        == keys.row_aad(venue, device, sequence, day)
    )


def test_a_sealer_seals_no_more_than_it_has_nonces_for(world: World) -> None:
    key = world.keystore.day_key(dt.date(2026, 11, 29))
    seal = key.sealer(3)
    blobs = [seal(b"p" * 16, b"aad") for _ in range(3)]
    assert len({b[:12] for b in blobs} | {key.encrypt(b"p" * 16, b"aad")[:12]}) == 4
    assert all(key.decrypt(b, b"aad") == b"p" * 16 for b in blobs)
    with pytest.raises(RuntimeError):
        seal(b"p" * 16, b"aad")


def test_nonce_blocks_never_overlap_and_renew_the_prefix_before_wrapping() -> None:
    nonces = keys._Nonces()
    prefix, first = nonces.block(10)
    assert (first, nonces.block(5)) == (0, (prefix, 10))
    nonces._next = keys._Nonces.LIMIT - 3
    renewed, start = nonces.block(4)  # 3 left under this prefix: a new one
    assert (renewed != prefix, start) == (True, 0)
    with pytest.raises(ValueError, match="block"):
        nonces.block(0)
