"""The PKCS#11 key store: data keys in Postgres, wrapped by keys that live in an HSM
and never leave it, so that every host of an installation reaches the same keys.

What it keeps where:

- In the HSM (one token, reached through its PKCS#11 module with the user PIN):
  AES-256 secret keys, sensitive and not extractable. `<ns>/master` wraps the
  long-lived keys (tokens, people, venues), which are never destroyed. Each key
  that expiry destroys, a day's or a case's, has an HSM key of its own,
  `<ns>/day/<YYYY-MM-DD>` or `<ns>/case/<uuid>`. `<ns>` is the database's name
  when the key was made, so installations may share a token.
- In Postgres (`wrapped_keys`, migration 0014_hsm): each data key as AES-GCM
  ciphertext made inside the HSM (bound to its kind and name), with the label and
  id of the HSM key that opens it; `key_pointers` names the current key of a kind.

Why one HSM key per destroyable key: a database backup holds the wrapped copy of a
day key for as long as the backup is kept. Had one long-lived HSM key wrapped it,
that backup and the HSM together would open the day long after expiry. Expiry
destroys the day's own HSM key (C_DestroyObject), so the copy in every backup
then opens with nothing; the tombstone row stops the day from getting a new key.
A per-period KEK would mean fewer HSM objects but would shred late (at the end of
the period), and 90 days plus the open cases is far below a token's capacity.

The vault keeps one PKCS#11 session (every PKCS#11 call of a process is
serialised: the module is initialised for one thread at a time) and one database
connection, owned by a private event-loop thread so that the key store
stays synchronous like the file store: it is asked for a key only on a cache miss.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import threading
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import asyncpg
import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.exceptions import NoSuchKey, PKCS11Error, UserAlreadyLoggedIn
from pkcs11.mechanisms import GCMParams
from pkcs11.types import DecryptMixin, EncryptMixin

from services.kernel import db, keys
from services.kernel.config import Settings

T = TypeVar("T")

_NONCE = 12
_ID_BYTES = 16
DESTROYABLE = frozenset({"day", "case"})
"""The kinds of key that expiry destroys; each has an HSM key of its own."""

_PKCS11 = threading.Lock()
"""Every PKCS#11 call of the process holds it: python-pkcs11 initialises the module
without locking arguments, which lets a module assume one thread at a time."""

_UNAVAILABLE: tuple[type[BaseException], ...] = (*db.TRANSIENT_ERRORS, TimeoutError)

Q = db.load_queries(Path(__file__).with_name("hsm.sql"))


@dataclass(frozen=True)
class Pkcs11Config:
    """Where the HSM is: its PKCS#11 module, its token and the user PIN."""

    module: Path
    token_label: str
    pin: str

    @classmethod
    def from_settings(cls, settings: Settings) -> Pkcs11Config:
        """The PIN from STOPCOVID_PKCS11_PIN, else the file STOPCOVID_PKCS11_PIN_FILE
        (a mounted Secret in production); it is never part of Settings, so never
        printed with them."""
        pin = os.environ.get("STOPCOVID_PKCS11_PIN", "")
        if not pin and settings.pkcs11_pin_file is not None:
            try:
                pin = settings.pkcs11_pin_file.read_text().strip()
            except OSError as exc:
                raise SystemExit(
                    f"configuration error: cannot read STOPCOVID_PKCS11_PIN_FILE "
                    f"({type(exc).__name__})"
                ) from None
        if settings.pkcs11_module is None or not settings.pkcs11_token or not pin:
            raise SystemExit(
                "configuration error: STOPCOVID_KEYSTORE=pkcs11 needs STOPCOVID_PKCS11_MODULE, "
                "STOPCOVID_PKCS11_TOKEN and STOPCOVID_PKCS11_PIN or STOPCOVID_PKCS11_PIN_FILE"
            )
        return cls(settings.pkcs11_module, settings.pkcs11_token, pin)


class _AesKey(EncryptMixin, DecryptMixin):
    """What the token's AES keys are to the type checker (python-pkcs11 builds
    its key classes from mixins at run time)."""


class Hsm:
    """One logged-in session with the token: make, use and destroy wrapping keys."""

    def __init__(self, config: Pkcs11Config) -> None:
        self._lock = _PKCS11
        with self._lock:
            try:
                token = pkcs11.lib(str(config.module)).get_token(token_label=config.token_label)
                try:
                    self._session = token.open(user_pin=config.pin, rw=True)
                except UserAlreadyLoggedIn:
                    # Login is per process and token: another store of this process
                    # logged in, and every session of the process shares it.
                    self._session = token.open(rw=True)
            except (PKCS11Error, OSError, RuntimeError) as exc:
                raise keys.KeyError_(f"cannot open the HSM token ({type(exc).__name__})") from None

    def close(self) -> None:
        with self._lock:
            self._session.close()

    def new_key(self, label: str) -> bytes:
        """A new wrapping key under `label`; returns its CKA_ID."""
        key_id = secrets.token_bytes(_ID_BYTES)
        with self._lock:
            self._session.generate_key(
                KeyType.AES,
                256,
                label=label,
                id=key_id,
                store=True,
                template={
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.ENCRYPT: True,
                    Attribute.DECRYPT: True,
                },
            )
        return key_id

    def first_id(self, label: str) -> bytes | None:
        """The CKA_ID of a key under `label` (the lowest, when racing processes made
        several), or None."""
        with self._lock:
            found = [
                bytes(obj[Attribute.ID])
                for obj in self._session.get_objects(
                    {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: label}
                )
            ]
        return min(found) if found else None

    def _secret_key(self, label: str, key_id: bytes) -> _AesKey:
        found = self._session.get_key(object_class=ObjectClass.SECRET_KEY, label=label, id=key_id)
        # python-pkcs11 builds its key classes from mixins at run time; an AES key
        # of the token has both of these.
        assert isinstance(found, EncryptMixin) and isinstance(found, DecryptMixin)
        return cast(_AesKey, found)

    def wrap(self, label: str, key_id: bytes, key: bytes, aad: bytes) -> bytes:
        nonce = secrets.token_bytes(_NONCE)
        with self._lock:
            kek = self._secret_key(label, key_id)
            sealed = kek.encrypt(
                key, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(nonce, aad)
            )
        assert isinstance(sealed, bytes)  # one buffer in, one out
        return nonce + sealed

    def unwrap(self, label: str, key_id: bytes, blob: bytes, aad: bytes) -> bytes:
        with self._lock:
            try:
                kek = self._secret_key(label, key_id)
            except NoSuchKey:
                raise keys.KeyError_(f"the HSM has no key {label}") from None
            try:
                opened = kek.decrypt(
                    blob[_NONCE:],
                    mechanism=Mechanism.AES_GCM,
                    mechanism_param=GCMParams(blob[:_NONCE], aad),
                )
            except PKCS11Error:
                raise keys.KeyError_(f"a key under {label} does not unwrap") from None
        assert isinstance(opened, bytes)
        return opened

    def destroy(self, label: str, key_id: bytes | None = None) -> int:
        """Destroy the keys under `label` (only the one with `key_id`, if given);
        returns how many there were."""
        template: dict[Attribute, Any] = {
            Attribute.CLASS: ObjectClass.SECRET_KEY,
            Attribute.LABEL: label,
        }
        if key_id is not None:
            template[Attribute.ID] = key_id
        with self._lock:
            found = list(self._session.get_objects(template))
            for obj in found:
                obj.destroy()
        return len(found)


class _Unreachable(OSError):
    """No connection to the key store's database could be made (the cause's type)."""


class Database:
    """A synchronous face on one asyncpg connection, which lives on an event loop of
    its own thread: callers may be threads or the event loop of a server, which
    blocks for one round trip (a cache miss, as the file store blocks on a read)."""

    def __init__(self, connect: Callable[[], Awaitable[asyncpg.Connection]]) -> None:
        self._connect = connect
        self._conn: asyncpg.Connection | None = None
        self._lock = threading.Lock()
        # Not asyncio.new_event_loop(): where trio-asyncio is imported (the workers)
        # its policy would make a trio loop, which cannot run in a thread of its own.
        self._loop = asyncio.SelectorEventLoop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="keystore-db", daemon=True
        )
        self._thread.start()

    def _submit(self, work: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(work, self._loop)

    def run(self, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """`work` on the connection (made, or made again after a broken one, here);
        a database that cannot answer becomes KeyError_ (a key is unavailable)."""
        with self._lock:
            pending = self._submit(self._call(work))
            try:
                return pending.result(timeout=60)
            except _UNAVAILABLE as exc:
                # A call that timed out must not hold the connection for the next.
                pending.cancel()
                refused = isinstance(exc, asyncpg.PostgresError) and not isinstance(
                    exc, asyncpg.PostgresConnectionError
                )
                what = "refused a statement" if refused else "is unavailable"
                kind = str(exc) if isinstance(exc, _Unreachable) else type(exc).__name__
                raise keys.KeyError_(f"the key store's database {what} ({kind})") from exc

    async def _call(self, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        if self._conn is None or self._conn.is_closed():
            try:
                self._conn = await self._connect()
            except _UNAVAILABLE as exc:
                raise _Unreachable(type(exc).__name__) from exc
        try:
            return await work(self._conn)
        except (OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError):
            await self._drop()
            raise

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            conn.terminate()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._submit(self._close_conn()).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()

    async def _close_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()


def _aad(kind: str, name: str) -> bytes:
    return f"stopcovid/wrapped-key/v1|{kind}/{name}".encode()


class HsmVault:
    """keys.Vault over `wrapped_keys` and an HSM (see the module docstring)."""

    def __init__(self, hsm: Hsm, database: Database, namespace: str) -> None:
        self._hsm = hsm
        self._db = database
        self._ns = namespace

    def close(self) -> None:
        self._db.close()
        self._hsm.close()

    def _label(self, kind: str, name: str) -> str:
        return f"{self._ns}/{kind}/{name}" if kind in DESTROYABLE else f"{self._ns}/master"

    def _row(self, kind: str, name: str) -> asyncpg.Record | None:
        return self._db.run(lambda conn: conn.fetchrow(Q["wrapped_key"], kind, name))

    def read(self, kind: str, name: str) -> bytes:
        row = self._row(kind, name)
        if row is None:
            raise keys.KeyError_(f"no key {kind}/{name} in the key store")
        if row["destroy_time"] is not None:
            raise keys.KeyDestroyed(f"the key {kind}/{name} was destroyed")
        return self._hsm.unwrap(
            row["kek_label"], bytes(row["kek_id"]), bytes(row["wrapped"]), _aad(kind, name)
        )

    def exists(self, kind: str, name: str) -> bool:
        row = self._row(kind, name)
        return row is not None and row["destroy_time"] is None

    def create(self, kind: str, name: str, key: bytes) -> bytes:
        label = self._label(kind, name)
        own = kind in DESTROYABLE
        kek_id = self._hsm.new_key(label) if own else self._master_id(label)
        wrapped = self._hsm.wrap(label, kek_id, key, _aad(kind, name))
        won = self._db.run(
            lambda conn: conn.fetchval(Q["insert_wrapped_key"], kind, name, label, kek_id, wrapped)
        )
        if won is None and own:
            # Another process stored its key first; ours wraps nothing stored.
            self._hsm.destroy(label, kek_id)
        return self.read(kind, name)

    def _master_id(self, label: str) -> bytes:
        found = self._hsm.first_id(label)
        return found if found is not None else self._hsm.new_key(label)

    def names(self, kind: str) -> list[str]:
        rows = self._db.run(lambda conn: conn.fetch(Q["live_key_names"], kind))
        return [row["name"] for row in rows]

    def pointer(self, kind: str) -> str | None:
        found: str | None = self._db.run(lambda conn: conn.fetchval(Q["key_pointer"], kind))
        return found

    def set_pointer(self, kind: str, name: str, *, exclusive: bool) -> None:
        query = Q["insert_key_pointer"] if exclusive else Q["move_key_pointer"]
        self._db.run(lambda conn: conn.execute(query, kind, name))

    def destroyed(self, kind: str, name: str) -> bool:
        row = self._row(kind, name)
        return row is not None and row["destroy_time"] is not None

    def shred(self, kind: str, name: str) -> bool:
        """Tombstone the row (no process may use or remake the key), then destroy
        every HSM key under its label. A repeat after a crash between the two
        finds the tombstone and still destroys what the HSM holds."""
        if kind not in DESTROYABLE:
            # Their HSM key is the master, which wraps every long-lived key.
            raise ValueError(f"keys of kind {kind} are never destroyed")
        label = self._label(kind, name)
        live: bool = self._db.run(lambda conn: conn.fetchval(Q["tombstone_key"], kind, name, label))
        return self._hsm.destroy(label) > 0 or live


def open_keystore(settings: Settings, role: str) -> keys.KeyStore:
    """The PKCS#11 key store, reached as the process's own database role."""
    args = db.connect_args(settings, role)

    async def connect() -> asyncpg.Connection:
        return await asyncpg.connect(
            **args.kwargs(),
            server_settings={"application_name": f"{role}-keystore", "statement_timeout": "30s"},
        )

    vault = HsmVault(Hsm(Pkcs11Config.from_settings(settings)), Database(connect), args.database)
    return keys.KeyStore.over(vault)
