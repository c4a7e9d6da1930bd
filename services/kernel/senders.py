"""Senders: how an SMS leaves the platform: the notification outbox's messages
(workers/notify.py) and the CheckIn server's enrollment codes
(services/domain/people/verification.py).

A sender has one method, `async send(notification_id, phone, text)`, which returns
when the message is accepted and raises `SendError` otherwise (`permanent` when
retrying cannot help). It must be idempotent by notification id: the outbox
(workers/notify.py) sends at least once - a worker that dies after the gateway
accepted a message but before recording it sends it again after the lease - so
"no message sent twice" rests on the sender recognising the id.

- `FileSender` (the default) appends one JSON line per message to a file (mode
  0600), under an exclusive lock, synced to disk; it reads the ids already in the
  file first, so a resend (from this or any other process) writes nothing.
- `HttpSender` POSTs JSON to an SMS gateway with the header `Idempotency-Key:
  <notification id>`; 2xx is accepted, 429, 5xx, timeouts and connection errors
  are retried, other 4xx are permanent. The gateway dedupes on the key.
- `module:callable` names a custom one: `callable(settings)` returns the sender.

Error messages name a status or an error type, never the phone or the text.

What a contact is told is in services/domain/exposure/messages.py.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import importlib
import json
import os
import threading
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Protocol

import trio

from services.kernel.config import Settings


class SendError(Exception):
    """The message was not accepted. `permanent`: retrying cannot help."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.permanent = permanent


class Sender(Protocol):
    async def send(self, notification_id: uuid.UUID, phone: str, text: str) -> None: ...


class FileSender:
    """One JSON line per message in `path`; a notification id is written once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sent: set[str] = set()
        self._offset = 0  # how far this process has read the file
        self._lock = threading.Lock()

    def _send_sync(self, notification_id: uuid.UUID, phone: str, text: str) -> None:
        key = str(notification_id)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self._lock:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._catch_up(fd)
                if key in self._sent:
                    return
                end = os.lseek(fd, 0, os.SEEK_END)
                # A torn last line (a crash mid-write) must not swallow this one.
                torn = end > 0 and os.pread(fd, 1, end - 1) != b"\n"
                line = json.dumps(
                    {
                        "notification_id": key,
                        "to": phone,
                        "text": text,
                        "time": dt.datetime.now(dt.UTC).isoformat(),
                    },
                    ensure_ascii=False,
                ).encode()
                os.write(fd, (b"\n" if torn else b"") + line + b"\n")
                os.fsync(fd)
                self._sent.add(key)
                self._offset = os.lseek(fd, 0, os.SEEK_END)
            finally:
                os.close(fd)  # releases the lock

    def _catch_up(self, fd: int) -> None:
        """Read the lines other processes (or an earlier life of this one) wrote
        since we last looked. A torn last line (a crash mid-write) is ignored: its
        message never counted as sent."""
        end = os.lseek(fd, 0, os.SEEK_END)
        if end < self._offset:  # the file was replaced
            self._sent.clear()
            self._offset = 0
        if end == self._offset:
            return
        os.lseek(fd, self._offset, os.SEEK_SET)
        data = b""
        while len(data) < end - self._offset:
            chunk = os.read(fd, end - self._offset - len(data))
            if not chunk:
                break
            data += chunk
        for raw in data.split(b"\n"):
            try:
                self._sent.add(str(json.loads(raw)["notification_id"]))
            except (ValueError, KeyError, TypeError):
                continue
        self._offset = end

    async def send(self, notification_id: uuid.UUID, phone: str, text: str) -> None:
        try:
            await trio.to_thread.run_sync(self._send_sync, notification_id, phone, text)
        except OSError as exc:
            raise SendError(f"file sender: {type(exc).__name__}") from None


class HttpSender:
    """POST {"notification_id", "to", "text"} to an SMS gateway."""

    def __init__(self, url: str, timeout: float) -> None:
        if not url.startswith(("http://", "https://")):
            raise SystemExit(
                "configuration error: STOPCOVID_NOTIFY_HTTP_URL must be an http(s) URL "
                "when STOPCOVID_NOTIFY_SENDER is http"
            )
        self.url = url
        self.timeout = timeout

    def _send_sync(self, notification_id: uuid.UUID, phone: str, text: str) -> None:
        body = json.dumps(
            {"notification_id": str(notification_id), "to": phone, "text": text},
            ensure_ascii=False,
        ).encode()
        request = urllib.request.Request(  # noqa: S310 - the scheme is checked above
            self.url,
            data=body,
            method="POST",
            headers={
                "Content-Type": "application/json; charset=utf-8",
                "Idempotency-Key": str(notification_id),
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as reply:  # noqa: S310
                reply.read()
        except urllib.error.HTTPError as exc:
            status = exc.code
            exc.close()
            retry = status == 429 or status >= 500
            raise SendError(f"gateway answered HTTP {status}", permanent=not retry) from None
        except TimeoutError:
            raise SendError("gateway timed out") from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            kind = type(reason).__name__ if isinstance(reason, BaseException) else "URLError"
            if isinstance(reason, TimeoutError):
                raise SendError("gateway timed out") from None
            raise SendError(f"gateway unreachable: {kind}") from None
        except OSError as exc:
            raise SendError(f"gateway connection failed: {type(exc).__name__}") from None

    async def send(self, notification_id: uuid.UUID, phone: str, text: str) -> None:
        # abandon_on_cancel: a stopping worker does not wait for a stalled gateway;
        # the message is resent after the lease with the same Idempotency-Key.
        await trio.to_thread.run_sync(
            self._send_sync, notification_id, phone, text, abandon_on_cancel=True
        )


def make_sender(settings: Settings) -> Sender:
    """The sender `settings.notify_sender` names."""
    kind = settings.notify_sender
    if kind == "file":
        return FileSender(settings.notify_file)
    if kind == "http":
        return HttpSender(settings.notify_http_url, settings.notify_http_timeout_s)
    module_name, sep, attr = kind.partition(":")
    if not sep or not module_name or not attr:
        raise SystemExit(
            "configuration error: STOPCOVID_NOTIFY_SENDER must be file, http or "
            f"package.module:callable, got {kind!r}"
        )
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise SystemExit(
            f"configuration error: STOPCOVID_NOTIFY_SENDER {kind!r} cannot be loaded: "
            f"{type(exc).__name__}"
        ) from None
    sender: Sender = factory(settings)
    return sender
