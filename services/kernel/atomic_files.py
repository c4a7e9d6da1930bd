"""Files written whole or not at all: every private file (the KEK, wrapped keys and
key pointers, database and superuser passwords, PKI private keys) and the
certificates beside them.

One writer, so that a crash at any moment leaves under the final name either the
file as it was or the file as it was meant to be, never an empty or partial one:
a key store beside an empty KEK would be lost for good. The steps, in order:

1. create a temporary file in the same directory (same filesystem, so the rename
   below is atomic), owner-only from its creation (`O_EXCL`, mode 0600: no moment
   when another user could open it), with a random name so concurrent writers do
   not meet;
2. write all of it and `fsync` it: its content is on disk before any name points
   at it;
3. give it the final name: `rename` (replacing what was there) or, for a file
   that must be created once whatever races it (a key, the KEK), `link`, which
   fails when another writer got there first, and then drop the temporary name;
4. `fsync` the directory, so the new name itself survives a power loss.

A crash between the steps can leave a `.NAME.*.tmp` file beside; it is never read
and is owner-only.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644


def write_private(path: Path, data: bytes, *, exclusive: bool = False) -> bool:
    """Write `data` to `path`, readable and writable by the owner only.

    With `exclusive`, `path` is created only if it does not exist yet; returns
    whether this call created it (False: another writer's file is kept as it is).
    Without it, `path` is replaced atomically and the call returns True."""
    return _write(path, data, PRIVATE_MODE, exclusive)


def write_public(path: Path, data: bytes) -> None:
    """Replace `path` atomically with `data`, readable by everyone (a certificate):
    not secret, but a half-written one would stop every process that reads it."""
    _write(path, data, PUBLIC_MODE, exclusive=False)


def _write(path: Path, data: bytes, mode: int, exclusive: bool) -> bool:
    directory = path.parent
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = directory / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
        else:
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    fsync_directory(directory)
    return True


def fsync_directory(directory: Path) -> None:
    """Make the directory's entries (a new, renamed or removed name) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
