"""Keys: the key store, the data keys it holds, and where it keeps them (a vault).

The promise is that data can be made unreadable for good by destroying a key, even
in old database backups. The file store (`FileVault`, the default) writes no key
material to the database: every data key lives in a directory outside it, wrapped
(AES-256-GCM) by the KEK, which comes from the environment or a file and never
touches the database either; a database dump holds only ciphertext and key ids.
The PKCS#11 store (services/kernel/hsm.py) keeps the wrapped keys in the database
instead, each destroyable one wrapped by an HSM key of its own that expiry destroys
in the HSM. `KeyStore` is the same over either; services/kernel/keystores.py says
which one a process opens.

Keys in the store, by kind:

- `day/YYYY-MM-DD`: one random key per UTC day. From it come (HKDF) the day's
  pseudonym key (HMAC of a person id: links a person's visits within the day, and
  only with the key) and its row key (AES-GCM of the person id). Destroying the
  key at expiry makes that day's rows unlinkable and undecryptable; a tombstone
  stops the day from ever getting a new key.
- `case/<uuid>`: one key per case (its person, trace results and case records),
  destroyed with the case's records, as a day's key is.
- `token/<kid>`: AES-SIV keys of personal QR tokens; `token/current` names the
  one new tokens use. Older ones keep verifying until removed (rotation).
- `people/<kid>`: AES-GCM keys of phone numbers; `people/blind-index` is the HMAC
  key of the phone blind index, which must never change.
- `venue/<kid>`: Ed25519 keys that sign venue QR codes.
- `server/page-tokens`: the AES-GCM key that seals the servers' page tokens.

Every file of the file store is written by `atomic_files.write_private`
(owner-only, synced, then named atomically); keys are created exclusively, so
processes racing to create the same key agree on one. Every process of one
installation must see the same directory (one machine, or a shared volume); for
many hosts use the PKCS#11 store.
"""

from __future__ import annotations

import base64
import datetime as dt
import enum
import hashlib
import hmac
import itertools
import json
import os
import secrets
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from services.kernel.atomic_files import write_private

KEK_BYTES = 32
_NONCE = 12


class KeyError_(Exception):
    """A key is missing, destroyed, or cannot be unwrapped (wrong KEK)."""


class KeyDestroyed(KeyError_):
    """The key was destroyed at expiry; its data is gone for good."""


def load_kek(secrets_dir: Path) -> bytes:
    """The KEK: STOPCOVID_KEK (base64 of 32 bytes), else the file STOPCOVID_KEK_FILE,
    else `secrets_dir/kek` (made by `up`)."""
    raw = os.environ.get("STOPCOVID_KEK")
    if raw:
        source = "STOPCOVID_KEK"
    else:
        path = Path(os.environ.get("STOPCOVID_KEK_FILE") or secrets_dir / "kek")
        if not path.exists():
            raise SystemExit(
                f"configuration error: no KEK: set STOPCOVID_KEK or STOPCOVID_KEK_FILE, "
                f"or run `up` to make {path}"
            )
        raw, source = path.read_text().strip(), str(path)
    try:
        kek = base64.b64decode(raw, validate=True)
    except ValueError:
        kek = b""
    if len(kek) != KEK_BYTES:
        raise SystemExit(f"configuration error: {source} must be base64 of {KEK_BYTES} bytes")
    return kek


def new_kek_text() -> str:
    return base64.b64encode(secrets.token_bytes(KEK_BYTES)).decode()


def _hkdf(key: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(key)


class _Nonces:
    """AES-GCM nonces for one key in one process: 8 random bytes and a 4-byte counter.

    A day key seals every scan of its day, on every server, so its nonces must
    never repeat. A fresh random prefix (renewed before the counter would wrap) and
    a counter make a repeat within a process impossible and one across processes as
    unlikely as a collision of 64 random bits (for 10,000 process starts per day
    key, about 3e-12), at a fifth of the cost of asking the kernel for 12 random
    bytes per scan. A batch takes a block of counters at once (`block`), under a
    lock, so two threads never get the same one."""

    __slots__ = ("_lock", "_next", "_prefix")

    LIMIT = 0xFFFFFFFF
    """Counters run from 0 to LIMIT - 1 under one prefix."""

    def __init__(self) -> None:
        self._prefix = os.urandom(8)
        self._next = 0
        self._lock = threading.Lock()

    def block(self, n: int) -> tuple[bytes, int]:
        """A prefix and the first of `n` counters reserved for the caller alone: its
        nonces are prefix + counter (4 bytes, big-endian) for first <= counter < first + n."""
        if not 0 < n < self.LIMIT:
            raise ValueError(f"a block of nonces holds 1 to {self.LIMIT - 1}")
        with self._lock:
            if self._next + n > self.LIMIT:  # the counter would wrap: start a new prefix
                self._prefix, self._next = os.urandom(8), 0
            first = self._next
            self._next += n
            return self._prefix, first

    def next(self) -> bytes:
        prefix, n = self.block(1)
        return prefix + n.to_bytes(4, "big")


class DayKey:
    """One day's key: pseudonyms (HMAC-SHA256, 16 bytes) and row encryption (AES-GCM)."""

    def __init__(self, day: dt.date, key_id: str, key: bytes) -> None:
        self.day = day
        self.key_id = key_id
        self._pseudonym_key = _hkdf(key, b"stopcovid/day/pseudonym/v1")
        self._aead = AESGCM(_hkdf(key, b"stopcovid/day/row/v1"))
        self._pseudonyms: dict[bytes, bytes] = {}
        self._nonces = _Nonces()

    def pseudonym(self, person_id: bytes) -> bytes:
        """HMAC of the person id with the day key: equal for one person within a day."""
        found = self._pseudonyms.get(person_id)
        if found is None:
            found = hmac.new(self._pseudonym_key, person_id, hashlib.sha256).digest()[:16]
            if len(self._pseudonyms) > 1_000_000:
                self._pseudonyms.clear()
            self._pseudonyms[person_id] = found
        return found

    def encrypt(self, person_id: bytes, aad: bytes) -> bytes:
        nonce = self._nonces.next()
        return nonce + self._aead.encrypt(nonce, person_id, aad)

    def sealer(self, count: int) -> Callable[[bytes, bytes], bytes]:
        """`encrypt` for up to `count` calls, with their nonces taken in one block:
        the hot path seals a batch's rows with it (an ordinary call per row would take
        a lock per nonce). One call more than `count` raises rather than reuse a nonce."""
        prefix, first = self._nonces.block(count)
        encrypt = self._aead.encrypt
        counters = itertools.count(first)
        end = first + count

        def seal(plaintext: bytes, aad: bytes) -> bytes:
            n = next(counters)
            if n >= end:
                raise RuntimeError("more rows sealed than the sealer was made for")
            nonce = prefix + n.to_bytes(4, "big")
            return nonce + encrypt(nonce, plaintext, aad)

        return seal

    def decrypt(self, blob: bytes, aad: bytes) -> bytes:
        return self._aead.decrypt(blob[:_NONCE], blob[_NONCE:], aad)


def row_aad_parts(venue_id: bytes, device_id: bytes | None, day: dt.date) -> tuple[bytes, bytes]:
    """`row_aad` around the sequence: row_aad(venue_id, device_id, sequence, day) is
    head + b"%d" % (sequence or 0) + tail, so a batch builds the two once."""
    head = b"|".join((b"checkin/v1", venue_id, device_id or b"-", b""))
    return head, b"|" + day.isoformat().encode()


def row_aad(venue_id: bytes, device_id: bytes | None, sequence: int | None, day: dt.date) -> bytes:
    """Associated data binding an encrypted person id to its check-in row: moving the
    ciphertext to another row (venue, device, sequence or day) fails decryption."""
    head, tail = row_aad_parts(venue_id, device_id, day)
    return b"%b%d%b" % (head, sequence or 0, tail)


def seal_row(
    key: DayKey,
    person_id: bytes,
    *,
    venue_id: bytes,
    device_id: bytes | None,
    sequence: int | None,
    day: dt.date,
) -> bytes:
    """A check-in row's person_enc: the person id under the day key, bound to the row."""
    return key.encrypt(person_id, row_aad(venue_id, device_id, sequence, day))


def open_row(
    key: DayKey,
    blob: bytes,
    *,
    venue_id: bytes,
    device_id: bytes | None,
    sequence: int | None,
    day: dt.date,
) -> bytes:
    """The person id (16 bytes) of a check-in row's person_enc; raises InvalidTag when
    the key, or any of the row's fields, is not the one it was sealed with."""
    return key.decrypt(bytes(blob), row_aad(venue_id, device_id, sequence, day))


class Sealed(enum.Enum):
    """Every kind of encrypted field outside the check-in rows, with what its
    ciphertext is bound to: AES-GCM associated data `<kind>|<owner id>`, so a
    ciphertext moved to another row or another kind of field fails to open.

    The one place these formats are written and read; each member names its
    column and the id it is bound to."""

    CASE_PERSON = "case"
    """cases.person_enc: the case's person id, under the case key; bound to the case id."""
    CONTACT_PERSON = "contact"
    """trace_contacts.person_enc: a contact's person id, under the case key; the trace id."""
    CASE_RECORD_PERSON = "record"
    """case_records.person_enc: the person of a kept check-in, case key; the trace id."""
    NOTIFICATION_PERSON = "notification"
    """notifications.person_enc: the addressee, under the case key; the notification id."""
    PHONE = "phone"
    """people.phone_enc: the E.164 number, under a people key; the person id."""
    GRIEVANCE_PERSON = "grievance"
    """grievances.person_enc: the appellant of a denial, people key; the grievance id."""
    GRIEVANCE_DESCRIPTION = "grievance-description"
    """grievances.description_enc: the complaint's text, people key; the grievance id."""
    GRIEVANCE_CONTACT = "grievance-contact"
    """grievances.contact_enc: how to reach the complainant, people key; the grievance id."""

    def aad(self, owner: uuid.UUID) -> bytes:
        return self.value.encode() + b"|" + owner.bytes

    def seal(self, key: DataKey | DayKey, owner: uuid.UUID, plaintext: bytes) -> bytes:
        return key.encrypt(plaintext, self.aad(owner))

    def open(self, key: DataKey | DayKey, owner: uuid.UUID, blob: bytes) -> bytes:
        """The plaintext; raises cryptography's InvalidTag for a wrong key, owner or kind."""
        return key.decrypt(bytes(blob), self.aad(owner))


@dataclass(frozen=True)
class DataKey:
    """A named AES-GCM key (phone numbers)."""

    key_id: str
    key: bytes

    def encrypt(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        return nonce + AESGCM(self.key).encrypt(nonce, plaintext, aad)

    def decrypt(self, blob: bytes, aad: bytes) -> bytes:
        return AESGCM(self.key).decrypt(blob[:_NONCE], blob[_NONCE:], aad)


class Vault(Protocol):
    """Where a key store keeps its keys: wrapped at rest, unwrapped only into the
    memory of a process that has the KEK (or, for an HSM, a session with it).

    Every method is safe to call from several threads and several processes at
    once; `create` is exclusive (the first key stored under a name wins)."""

    def read(self, kind: str, name: str) -> bytes:
        """The unwrapped key; KeyError_ when it is missing or does not unwrap."""
        ...

    def exists(self, kind: str, name: str) -> bool: ...

    def create(self, kind: str, name: str, key: bytes) -> bytes:
        """Store `key` unless a key of that name exists; return the one stored."""
        ...

    def names(self, kind: str) -> list[str]:
        """The names of the live keys of `kind`, sorted."""
        ...

    def pointer(self, kind: str) -> str | None:
        """The name of the current key of `kind`, if one was named."""
        ...

    def set_pointer(self, kind: str, name: str, *, exclusive: bool) -> None: ...

    def destroyed(self, kind: str, name: str) -> bool:
        """Whether kind/name was destroyed (its tombstone): it may never be made again."""
        ...

    def shred(self, kind: str, name: str) -> bool:
        """Tombstone kind/name, then destroy it for good; False when there was no key.
        Safe to repeat: a repeat finishes what a crash interrupted."""
        ...

    def close(self) -> None:
        """Let go of what the vault holds open (sessions, connections)."""
        ...


class FileVault:
    """Keys in a directory, one file each, wrapped (AES-256-GCM) by a KEK held in
    memory: the default store of one machine (or of hosts sharing one volume)."""

    def __init__(self, directory: Path, kek: bytes) -> None:
        self.dir = directory
        self._kek = AESGCM(kek)

    def _path(self, kind: str, name: str) -> Path:
        return self.dir / kind / name

    def _wrap(self, kind: str, name: str, key: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        aad = f"{kind}/{name}".encode()
        return json.dumps(
            {
                "kind": kind,
                "name": name,
                "wrapped": base64.b64encode(nonce + self._kek.encrypt(nonce, key, aad)).decode(),
            }
        ).encode()

    def _unwrap(self, kind: str, name: str, data: bytes) -> bytes:
        blob = base64.b64decode(json.loads(data)["wrapped"])
        try:
            return self._kek.decrypt(blob[:_NONCE], blob[_NONCE:], f"{kind}/{name}".encode())
        except InvalidTag:
            raise KeyError_(f"key {kind}/{name} does not unwrap with this KEK") from None

    def read(self, kind: str, name: str) -> bytes:
        try:
            data = self._path(kind, name).read_bytes()
        except FileNotFoundError:
            raise KeyError_(f"no key {kind}/{name} in the key store") from None
        return self._unwrap(kind, name, data)

    def exists(self, kind: str, name: str) -> bool:
        return self._path(kind, name).exists()

    def create(self, kind: str, name: str, key: bytes) -> bytes:
        # Exclusive: a process that lost the race to create it uses the winner's.
        write_private(self._path(kind, name), self._wrap(kind, name, key), exclusive=True)
        return self.read(kind, name)

    def names(self, kind: str) -> list[str]:
        return sorted(
            path.name
            for path in self._path(kind, "").glob("*")
            if path.name != "current"
            and not path.name.startswith(".")
            and not path.name.endswith(".destroyed")
        )

    def pointer(self, kind: str) -> str | None:
        try:
            return self._path(kind, "current").read_text().strip()
        except FileNotFoundError:
            return None

    def set_pointer(self, kind: str, name: str, *, exclusive: bool) -> None:
        write_private(self._path(kind, "current"), name.encode(), exclusive=exclusive)

    def destroyed(self, kind: str, name: str) -> bool:
        return self._path(kind, f"{name}.destroyed").exists()

    def shred(self, kind: str, name: str) -> bool:
        """Tombstone first (so it is never made again), then overwrite, sync and
        unlink the key's file."""
        path = self._path(kind, name)
        write_private(self._path(kind, f"{name}.destroyed"), b"")
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return False
        with path.open("r+b") as f:
            f.write(b"\0" * size)
            f.flush()
            os.fsync(f.fileno())
        path.unlink()
        return True

    def close(self) -> None:
        pass  # nothing is held open between calls


class KeyStore:
    """The installation's keys, read from a vault and kept unwrapped in memory on
    first use. `KeyStore(directory, kek)` is the file store; `KeyStore.over(vault)`
    any other (services/kernel/hsm.py)."""

    def __init__(self, directory: Path, kek: bytes) -> None:
        self._setup(FileVault(directory, kek))

    @classmethod
    def over(cls, vault: Vault) -> KeyStore:
        made = cls.__new__(cls)
        made._setup(vault)
        return made

    def _setup(self, vault: Vault) -> None:
        self.vault = vault
        self._lock = threading.Lock()
        self._days: dict[dt.date, DayKey] = {}
        self._blind: bytes | None = None
        self._people: dict[str, DataKey] = {}

    def close(self) -> None:
        self.vault.close()

    # -- storage ---------------------------------------------------------------

    def _read(self, kind: str, name: str) -> bytes:
        return self.vault.read(kind, name)

    def _create(self, kind: str, name: str, key: bytes) -> bytes:
        return self.vault.create(kind, name, key)

    def _get_or_create(self, kind: str, name: str, size: int = 32) -> bytes:
        if self.vault.exists(kind, name):
            return self._read(kind, name)
        return self._create(kind, name, secrets.token_bytes(size))

    def _pointer(self, kind: str, default_prefix: str, size: int) -> str:
        """The current key id of `kind`, creating a first key when there is none."""
        current = self.vault.pointer(kind)
        if current is None:
            kid = f"{default_prefix}1"
            self._get_or_create(kind, kid, size)
            self.vault.set_pointer(kind, kid, exclusive=True)
            current = self.vault.pointer(kind)
            assert current is not None
        return current

    # -- day keys --------------------------------------------------------------

    def day_key(self, day: dt.date, create: bool = True) -> DayKey:
        """The key of a UTC day, created on first use (workers create them ahead).

        Raises KeyDestroyed for a day whose key was destroyed: its data is gone and
        nothing new may be written under that day."""
        found = self._days.get(day)
        if found is not None:
            return found
        with self._lock:
            found = self._days.get(day)
            if found is not None:
                return found
            if self.vault.destroyed("day", day.isoformat()):
                raise KeyDestroyed(f"the key of {day.isoformat()} was destroyed")
            name = day.isoformat()
            key = self._get_or_create("day", name) if create else self._read("day", name)
            found = DayKey(day, f"day-{name}", key)
            self._days[day] = found
            return found

    def has_day_key(self, day: dt.date) -> bool:
        return self.vault.exists("day", day.isoformat())

    def destroy_day_key(self, day: dt.date) -> bool:
        """Destroy a day's key for good: overwrite, sync, unlink, leave a tombstone.
        Returns False when there was no key."""
        with self._lock:
            self._days.pop(day, None)
        return self.vault.shred("day", day.isoformat())

    # -- case keys -------------------------------------------------------------

    def case_key(self, case_id: uuid.UUID, create: bool = False) -> DataKey:
        """The key of one case: its person, trace results and case records are
        encrypted under it, so destroying it (retention) makes them unreadable,
        backups included. Raises KeyDestroyed once destroyed, KeyError_ when the
        case has no key and `create` is false."""
        name = str(case_id)
        if self.vault.destroyed("case", name):
            raise KeyDestroyed(f"the key of case {name} was destroyed")
        key = self._get_or_create("case", name) if create else self._read("case", name)
        return DataKey(f"case-{name}", key)

    def destroy_case_key(self, case_id: uuid.UUID) -> bool:
        """Destroy a case's key for good, as destroy_day_key does a day's."""
        return self.vault.shred("case", str(case_id))

    def person_index(self, person_id: bytes) -> bytes:
        """A keyed, stable lookup value for a person id (16 bytes), for tables that
        must find a person's rows (exports, withdrawal, a person's cases) without
        holding the id itself. Domain-separated from the phone blind index."""
        return hmac.new(self.blind_index_key(), b"person-id|" + person_id, "sha256").digest()

    # -- tokens, people, venues ------------------------------------------------

    def token_keys(self) -> tuple[str, dict[str, bytes]]:
        """(current key id, every accepted token key by id). AES-SIV keys are 64 bytes."""
        current = self._pointer("token", "t", 64)
        keys: dict[str, bytes] = {}
        for name in self.vault.names("token"):
            keys[name] = self._read("token", name)
        return current, keys

    def rotate_token_key(self) -> str:
        """Make a new token key current; older keys keep verifying until removed."""
        self.token_keys()
        return self._rotate("token", "t", 64)

    def rotate_people_key(self) -> str:
        """Make a new people key current: new phones and grievance texts are
        encrypted under it; rows under older keys still decrypt (they name theirs)."""
        self.people_key()
        return self._rotate("people", "p", 32)

    def _rotate(self, kind: str, prefix: str, size: int) -> str:
        numbers = [
            int(name[len(prefix) :])
            for name in self.vault.names(kind)
            if name.startswith(prefix) and name[len(prefix) :].isdigit()
        ]
        kid = f"{prefix}{1 + max(numbers)}"
        self._create(kind, kid, secrets.token_bytes(size))
        self.vault.set_pointer(kind, kid, exclusive=False)
        return kid

    def people_key(self, key_id: str | None = None) -> DataKey:
        """The current people key (phones, grievance texts), or the one named
        `key_id` (rows keep the id of the key that encrypted them, so they still
        decrypt after a new key is made current)."""
        kid = key_id or self._pointer("people", "p", 32)
        found = self._people.get(kid)
        if found is None:
            found = self._people[kid] = DataKey(kid, self._read("people", kid))
        return found

    def blind_index_key(self) -> bytes:
        if self._blind is None:
            self._blind = self._get_or_create("people", "blind-index")
        return self._blind

    def venue_signing_key(self) -> tuple[str, Ed25519PrivateKey]:
        kid = self._pointer("venue", "v", 32)
        return kid, Ed25519PrivateKey.from_private_bytes(self._read("venue", kid))

    def venue_public_keys(self) -> dict[str, Ed25519PublicKey]:
        self._pointer("venue", "v", 32)
        found: dict[str, Ed25519PublicKey] = {}
        for name in self.vault.names("venue"):
            if name.startswith("v"):
                private = Ed25519PrivateKey.from_private_bytes(self._read("venue", name))
                found[name] = private.public_key()
        return found

    def page_token_key(self) -> bytes:
        """The key that seals page tokens (pagination.py): one per installation, so
        a token from one server is good at any other of the same service."""
        return self._get_or_create("server", "page-tokens")

    def ensure_all(self) -> None:
        """Create the long-lived keys (first token, people, blind-index, venue keys)."""
        self.token_keys()
        self.people_key()
        self.blind_index_key()
        self.venue_signing_key()
        self.page_token_key()


def open_keystore(keystore_dir: Path, secrets_dir: Path) -> KeyStore:
    """The installation's key store, unwrapped with its KEK (see load_kek)."""
    return KeyStore(keystore_dir, load_kek(secrets_dir))
