"""Certificate revocation as every server sees it: the serials revoked, and the
calls open under each certificate, so that a revocation also ends those.

Revocations are rows of `certificate_revocations` (migration 0008), written by
`stopcovid certs revoke`: a client's certificate, or an issuing CA's, which
revokes every certificate it issued. Its trigger sends the serial on channels.REVOCATION;
each server re-reads the rows named and applies them at once, and reloads the
whole list every `cache_refresh_s`, which also covers notifications lost while
its listening connection was down. The interceptor refuses every call under a
revoked certificate, and cancels the calls already open under it: they end with
UNAUTHENTICATED (CERTIFICATE_REVOKED) within a second of the revocation.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import structlog

from services.kernel import channels, db, errors
from services.kernel.auth import Principal
from services.kernel.config import Settings
from services.kernel.listener import Listener

log = structlog.get_logger()

Q = db.load_queries(Path(__file__).with_name("revocation.sql"))

_RETRY_S = 1.0  # after a failed read of the serials a notification named


def revoked(principal: Principal, *, issuer: bool) -> errors.Unauthenticated:
    """The refusal of a certificate, or of every certificate of an issuing CA, revoked."""
    if issuer:
        return errors.Unauthenticated(
            "the issuing CA of the client certificate was revoked; ask the platform's PKI "
            "operators for a certificate from its successor",
            reason="CERTIFICATE_REVOKED",
            metadata={"issuer_serial": principal.issuer_serial},
        )
    return errors.Unauthenticated(
        "the client certificate was revoked; ask the platform's PKI operators for a new one",
        reason="CERTIFICATE_REVOKED",
        metadata={"certificate_serial": principal.certificate_serial},
    )


class OpenCall:
    """A call being served under a certificate; `refusal` is set once it must end."""

    __slots__ = ("principal", "refusal", "task")

    def __init__(self, task: asyncio.Task[object], principal: Principal) -> None:
        self.task = task
        self.principal = principal
        self.refusal: errors.Unauthenticated | None = None


class Revocations:
    """The revoked serials of this server, and the calls it has open per serial."""

    def __init__(self, pool: asyncpg.Pool, settings: Settings, role: str) -> None:
        self._pool = pool
        self._serials: frozenset[str] = frozenset()
        self._open: dict[str, set[OpenCall]] = {}
        self._named: set[str] = set()
        self._named_event = asyncio.Event()
        self._listener = Listener(
            settings,
            role,
            channels=[channels.REVOCATION],
            notified=self._notified,
            reload=self.reload,
            name="revocation",
        )
        self._applier: asyncio.Task[None] | None = None

    def refusal(self, principal: Principal) -> errors.Unauthenticated | None:
        """Why `principal` may not call: its certificate or its issuing CA revoked."""
        if principal.certificate_serial in self._serials:
            return revoked(principal, issuer=False)
        if principal.issuer_serial in self._serials:
            return revoked(principal, issuer=True)
        return None

    @contextlib.contextmanager
    def watch(self, principal: Principal) -> Iterator[OpenCall]:
        """Register the running task as a call of `principal` while the block runs,
        under its certificate's serial and its issuing CA's.

        Raises the refusal if either is revoked already; the check and the
        registration happen without an await between them, so no revocation falls
        in between."""
        refusal = self.refusal(principal)
        if refusal is not None:
            raise refusal
        task = asyncio.current_task()
        assert task is not None
        call = OpenCall(task, principal)
        serials = (principal.certificate_serial, principal.issuer_serial)
        for serial in serials:
            self._open.setdefault(serial, set()).add(call)
        try:
            yield call
        finally:
            for serial in serials:
                calls = self._open.get(serial)
                if calls is not None:
                    calls.discard(call)
                    if not calls:
                        del self._open[serial]

    # -- lifecycle (called by services.kernel.server) ----------------------------

    async def start(self) -> None:
        await self._listener.start()
        self._applier = asyncio.create_task(self._apply_named(), name="revocation-notify")

    async def close(self) -> None:
        if self._applier is not None:
            self._applier.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._applier
        await self._listener.close()

    async def reload(self) -> None:
        rows = await self._pool.fetch(Q["revoked_serials"])
        self._revoke({r["serial"] for r in rows}, replace=True)

    # -- internals ---------------------------------------------------------------

    def _revoke(self, serials: set[str], *, replace: bool = False) -> None:
        before = self._serials
        self._serials = frozenset(serials) if replace else before | serials
        added = self._serials - before
        if added:
            log.info("certificates_revoked", count=len(added), total=len(self._serials))
        # Every open call under a revoked serial, not only the new ones: a call
        # that raced a reload is caught by the next.
        for serial in self._serials & self._open.keys():
            for call in self._open[serial]:
                if call.refusal is None:
                    call.refusal = self.refusal(call.principal)
                    call.task.cancel()

    def _notified(self, _channel: str, payload: str) -> None:
        self._named.add(payload)
        self._named_event.set()

    async def _apply_named(self) -> None:
        while True:
            await self._named_event.wait()
            self._named_event.clear()
            named, self._named = self._named, set()
            try:
                rows = await self._pool.fetch(Q["revoked_among"], sorted(named))
            except db.TRANSIENT_ERRORS as exc:
                log.warning("revocation_read_failed", error_type=type(exc).__name__)
                self._named |= named
                self._named_event.set()
                await asyncio.sleep(_RETRY_S)
                continue
            self._revoke({r["serial"] for r in rows})
