"""The key store and the token formats, without servers: what the privacy promises
rest on (keys outside the database, destroyable; tokens that cannot be forged)."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag
from hypothesis import given, settings
from hypothesis import strategies as st

from services.domain.people import tokens
from services.domain.people.tokens import TokenProblem, TokenRefused
from services.kernel import keys

KEK = b"\x01" * 32
DAY = dt.date(2026, 11, 29)


def store(path: Path, kek: bytes = KEK) -> keys.KeyStore:
    made = keys.KeyStore(path, kek)
    made.ensure_all()
    return made


def test_key_files_hold_no_plain_key_and_need_the_kek(tmp_path: Path) -> None:
    first = store(tmp_path)
    day = first.day_key(DAY)
    person, aad = uuid.uuid4().bytes, keys.row_aad(b"v" * 16, b"d" * 16, 7, DAY)
    blob = day.encrypt(person, aad)
    # Another process with the same KEK reads the same key ...
    assert store(tmp_path).day_key(DAY).decrypt(blob, aad) == person
    # ... one with another KEK cannot unwrap anything.
    with pytest.raises(keys.KeyError_):
        keys.KeyStore(tmp_path, b"\x02" * 32).day_key(DAY, create=False)
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert path.stat().st_mode & 0o077 == 0, path


def test_the_row_binding_refuses_a_moved_ciphertext(tmp_path: Path) -> None:
    day = store(tmp_path).day_key(DAY)
    person = uuid.uuid4().bytes
    blob = day.encrypt(person, keys.row_aad(b"v" * 16, b"d" * 16, 7, DAY))
    with pytest.raises(InvalidTag):
        day.decrypt(blob, keys.row_aad(b"v" * 16, b"d" * 16, 8, DAY))
    assert day.pseudonym(person) == day.pseudonym(person)
    other_day = store(tmp_path).day_key(DAY + dt.timedelta(days=1))
    assert other_day.pseudonym(person) != day.pseudonym(person)


def test_a_destroyed_day_key_is_gone_for_good(tmp_path: Path) -> None:
    first = store(tmp_path)
    day = first.day_key(DAY)
    person, aad = uuid.uuid4().bytes, keys.row_aad(b"v" * 16, None, None, DAY)
    blob = day.encrypt(person, aad)
    assert first.destroy_day_key(DAY)
    assert not first.has_day_key(DAY)
    for reader in (first, store(tmp_path)):
        with pytest.raises(keys.KeyDestroyed):
            reader.day_key(DAY)  # not even recreated on demand
    # Only the tombstone is left of the day: no file holds its key any more.
    assert sorted(p.name for p in (tmp_path / "day").iterdir()) == [f"{DAY}.destroyed"]
    with pytest.raises(keys.KeyError_):
        first._read("day", DAY.isoformat())
    del blob
    assert not first.destroy_day_key(DAY)  # destroying twice is harmless


def test_racing_processes_agree_on_one_day_key(tmp_path: Path) -> None:
    def make(_: int) -> bytes:
        key = keys.KeyStore(tmp_path, KEK).day_key(DAY)
        return key.pseudonym(b"p" * 16)

    with ThreadPoolExecutor(8) as pool:
        assert len(set(pool.map(make, range(32)))) == 1


def codec(path: Path, window_s: int = 60) -> tokens.PersonalTokens:
    current, found = store(path).token_keys()
    return tokens.PersonalTokens(current, found, window_s)


def test_tokens_verify_and_refuse_precisely(tmp_path: Path) -> None:
    t = codec(tmp_path)
    person = uuid.uuid4()
    now = dt.datetime(2026, 11, 29, 12, 0, 30, tzinfo=dt.UTC).timestamp()
    static = t.issue_static(person)
    rotating = t.issue_rotating(person, t.window_at(now))
    assert t.verify(static, now).person_id == person
    assert t.verify(rotating, now).person_id == person
    assert t.verify(rotating, now + 60).person_id == person  # one window of grace
    assert static != t.issue_static(uuid.uuid4())
    # The rotating form hides the person: two windows share nothing but the header.
    later = t.issue_rotating(person, t.window_at(now) + 1)
    assert rotating.split(".")[2][8:] != later.split(".")[2][8:]
    assert person.hex not in rotating and person.hex not in static

    def refused(token: str, at: float = now) -> TokenProblem:
        with pytest.raises(TokenRefused) as caught:
            t.verify(token, at)
        return caught.value.problem

    assert refused(rotating, now + 150) is TokenProblem.TOKEN_EXPIRED
    assert refused(rotating, now - 150) is TokenProblem.TOKEN_EXPIRED
    form, kid, body = static.split(".")
    flipped = body[:5] + ("A" if body[5] != "A" else "B") + body[6:]
    assert refused(f"{form}.{kid}.{flipped}") is TokenProblem.BAD_TOKEN_SIGNATURE
    assert refused(f"R1.{kid}.{body}") is TokenProblem.MALFORMED_TOKEN  # wrong length
    assert refused(f"{form}.t77.{body}") is TokenProblem.UNKNOWN_KEY_ID
    assert refused("") is TokenProblem.MALFORMED_TOKEN
    assert refused("S1.t1." + "A" * 300) is TokenProblem.MALFORMED_TOKEN


def test_every_token_has_exactly_one_spelling(tmp_path: Path) -> None:
    """Lenient base64 would accept padding, junk characters and unused bits that are
    set, giving one card unlimited spellings (each a new cache entry at the door)."""
    t = codec(tmp_path)
    person = uuid.uuid4()
    static = t.issue_static(person)
    form, kid, body = static.split(".")
    # 32 bytes are 43 characters, whose last one carries 2 unused bits.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    unused_bits = body[:-1] + alphabet[alphabet.index(body[-1]) | 1]
    assert unused_bits != body
    for spelling in (
        body + "=",
        body + "==",
        body[:10] + "\n" + body[10:],
        body[:10] + "+" + body[11:],  # the other base64 alphabet
        body[:10] + "*" + body[10:],
        unused_bits,
        body + "A",
    ):
        with pytest.raises(TokenRefused) as caught:
            t.identify(f"{form}.{kid}.{spelling}")
        assert caught.value.problem is TokenProblem.MALFORMED_TOKEN, spelling
    assert t.identify(static).person_id == person


def test_rotating_tokens_are_judged_by_the_servers_clock_too(tmp_path: Path) -> None:
    """A photographed phone code replayed later with a back-dated scan time is stale:
    the window must hold the scan time and have ended at most `offline_s` before
    the server received the scan."""
    t = codec(tmp_path)
    window = t.window_at(dt.datetime(2026, 11, 29, 12, 0, 30, tzinfo=dt.UTC).timestamp())
    start, _ = t.window_bounds(window)
    scan_s = start.timestamp() + 10
    hour = 3600.0
    assert t.fresh(window, scan_s, scan_s + 1, hour)  # at once
    assert t.fresh(window, scan_s, scan_s + hour, hour)  # buffered offline for an hour
    assert not t.fresh(window, scan_s, scan_s + 2 * hour, hour)  # replayed later
    assert not t.fresh(window, scan_s, scan_s + 3 * 86400, hour)  # days later
    assert not t.fresh(window, scan_s + 300, scan_s + 300, hour)  # scan outside the window
    assert not t.fresh(window + 5, scan_s + 300, scan_s, hour)  # a window in the future


def test_rotated_keys_keep_old_tokens_valid(tmp_path: Path) -> None:
    old = codec(tmp_path)
    person = uuid.uuid4()
    token = old.issue_static(person)
    assert store(tmp_path).rotate_token_key() == "t2"
    new = codec(tmp_path)
    assert new.current_kid == "t2"
    assert new.issue_static(person).split(".")[1] == "t2"
    assert new.verify(token, 0).person_id == person


def test_a_rotated_people_key_still_opens_what_older_keys_sealed(tmp_path: Path) -> None:
    keys = store(tmp_path)
    person = uuid.uuid4().bytes
    first = keys.people_key()
    sealed = first.encrypt(b"+85512000777", b"phone|" + person)
    assert keys.rotate_people_key() == "p2"
    again = store(tmp_path)  # another process, after the rotation
    assert again.people_key().key_id == "p2"
    assert again.people_key(first.key_id).decrypt(sealed, b"phone|" + person) == b"+85512000777"
    with pytest.raises(InvalidTag):
        again.people_key().decrypt(sealed, b"phone|" + person)


_SIGNED_LOOKING = st.binary(max_size=80).map(
    lambda b: "S1.t1." + base64.urlsafe_b64encode(b).decode()
)
_CODEC = tokens.PersonalTokens("t1", {"t1": b"\x03" * 64}, 60)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300) | _SIGNED_LOOKING)
def test_no_input_breaks_the_token_parser(text: str) -> None:
    """Whatever arrives is either a person or TokenRefused, never another error."""
    with contextlib.suppress(TokenRefused):
        _CODEC.verify(text, 0)


def test_venue_codes_are_signed(tmp_path: Path) -> None:
    s = store(tmp_path)
    codes = tokens.VenueCodes(s.venue_public_keys(), s.venue_signing_key())
    venue = uuid.uuid4()
    code, kid = codes.sign(venue)
    assert codes.verify(code) == venue
    verify_only = tokens.VenueCodes(s.venue_public_keys())
    assert verify_only.verify(code) == venue
    _, _, body = code.split(".")
    raw = base64.urlsafe_b64decode(body + "==")
    swapped = base64.urlsafe_b64encode(uuid.uuid4().bytes + raw[16:]).rstrip(b"=").decode()
    with pytest.raises(TokenRefused) as caught:
        verify_only.verify(f"V1.{kid}.{swapped}")
    assert caught.value.problem is TokenProblem.BAD_VENUE_SIGNATURE
