"""The one writer of private files (services/kernel/atomic_files.py): a crash at any
step leaves the old file or the new one, never an empty or partial one; files are
owner-only from their creation; the data is synced before it is named and the name
after. Crashes are real: a child process writing the file kills itself (SIGKILL)
at the step named, and the file is read afterwards."""

from __future__ import annotations

import base64
import os
import signal
import stat
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from services.kernel import atomic_files, keys
from services.kernel.atomic_files import write_private, write_public
from services.kernel.config import Settings
from services.ops import setup

REPO = Path(__file__).resolve().parents[1]

# Runs write_private(path, data) or, with "kek", the first start's setup.ensure_keys,
# and SIGKILLs itself at the step named: "write" halfway through the data, "fsync"
# before the file is synced, "replace"/"link" before it is named, "unlink" after it
# is named and before the temporary name is dropped, "fsync-dir" before the
# directory is synced.
CRASHING_WRITER = textwrap.dedent(
    """
    import os, signal, stat, sys
    from pathlib import Path

    step, what, path, data, exclusive = sys.argv[1:6]
    real = {name: getattr(os, name) for name in ("write", "fsync", "replace", "link", "unlink")}

    def crash():
        os.kill(os.getpid(), signal.SIGKILL)

    def write(fd, view):
        if step == "write":
            real["write"](fd, bytes(view[: max(1, len(view) // 2)]))
            crash()
        return real["write"](fd, view)

    def fsync(fd):
        directory = stat.S_ISDIR(os.fstat(fd).st_mode)
        if step == ("fsync-dir" if directory else "fsync"):
            crash()
        return real["fsync"](fd)

    def crash_before(name):
        def call(*args, **kwargs):
            if step == name:
                crash()
            return real[name](*args, **kwargs)
        return call

    os.write, os.fsync = write, fsync
    for name in ("replace", "link", "unlink"):
        setattr(os, name, crash_before(name))

    if what == "kek":
        from services.kernel.config import Settings
        from services.ops import setup
        setup.ensure_keys(Settings.from_env())
    else:
        from services.kernel.atomic_files import write_private
        write_private(Path(path), data.encode(), exclusive=exclusive == "1")
    """
)


def crash_while_writing(
    step: str, path: Path, data: str = "", *, exclusive: bool = False, what: str = "file"
) -> None:
    """Run the crashing writer (with "kek", `path` is the state directory); fail
    unless it really died at `step`."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("STOPCOVID_KEK", "STOPCOVID_KEK_FILE", "STOPCOVID_KEYSTORE_DIR")
    }
    if what == "kek":
        env["STOPCOVID_STATE_DIR"] = str(path)
    argv = [step, what, str(path), data, "1" if exclusive else "0"]
    done = subprocess.run(
        [sys.executable, "-c", CRASHING_WRITER, *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == -signal.SIGKILL, (step, done.returncode, done.stderr)


OLD = "old secret " * 1000
NEW = "new secret " * 2000


@pytest.mark.parametrize("step", ["write", "fsync", "replace", "fsync-dir"])
def test_a_crash_while_replacing_leaves_the_old_file_or_the_new_one(
    tmp_path: Path, step: str
) -> None:
    path = tmp_path / "secret"
    write_private(path, OLD.encode())
    crash_while_writing(step, path, NEW)
    assert path.read_text() == (OLD if step != "fsync-dir" else NEW)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # Whatever the crash left beside it does not stand in the way of the next write.
    write_private(path, NEW.encode())
    assert path.read_text() == NEW


@pytest.mark.parametrize("step", ["write", "fsync", "link", "unlink", "fsync-dir"])
def test_a_crash_while_creating_leaves_no_file_or_the_whole_one(tmp_path: Path, step: str) -> None:
    path = tmp_path / "key"
    crash_while_writing(step, path, NEW, exclusive=True)
    if step in ("write", "fsync", "link"):
        assert not path.exists()
        assert write_private(path, OLD.encode(), exclusive=True)
        assert path.read_text() == OLD
    else:
        assert path.read_text() == NEW
        assert not write_private(path, OLD.encode(), exclusive=True)  # the first one stays
        assert path.read_text() == NEW


@pytest.mark.parametrize("step", ["write", "fsync", "link", "fsync-dir"])
def test_a_crash_during_the_first_start_never_leaves_an_empty_kek(
    tmp_path: Path, step: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bug of issue 13: the KEK was written in place, unsynced, so a crash right
    after the first start could leave an empty KEK beside a key store needing it.
    The crash comes at the first write of its kind, which is the KEK's."""
    state = tmp_path / "state"
    crash_while_writing(step, state, what="kek")
    kek = state / "secrets" / "kek"
    assert kek.exists() == (step == "fsync-dir")
    if kek.exists():
        assert len(base64.b64decode(kek.read_text(), validate=True)) == keys.KEK_BYTES
    # The next start finds that whole KEK or makes one, and its key store opens.
    for name in ("STOPCOVID_KEK", "STOPCOVID_KEK_FILE"):
        monkeypatch.delenv(name, raising=False)
    settings = replace(Settings.from_env(), state_dir=state, keystore_override=None)
    made = setup.ensure_keys(settings).token_keys()
    assert keys.open_keystore(settings.keystore_dir, settings.secrets_dir).token_keys() == made


def test_files_are_owner_only_from_creation_and_synced_before_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The order of the steps, watched through the real system calls: the open file
    is 0600 before a byte is written; its data is synced before the rename, and the
    directory after it."""
    seen: list[tuple[str, object]] = []
    real_write, real_fsync, real_replace = os.write, os.fsync, os.replace

    def write(fd: int, data: bytes) -> int:
        seen.append(("write", stat.S_IMODE(os.fstat(fd).st_mode)))
        return real_write(fd, data)

    def fsync(fd: int) -> None:
        seen.append(("fsync", "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"))
        real_fsync(fd)

    def replace(src: Path, dst: Path) -> None:
        seen.append(("replace", Path(src).parent == Path(dst).parent))
        real_replace(src, dst)

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = tmp_path / "private" / "password"
    write_private(path, b"s3cret")
    monkeypatch.undo()
    assert seen == [("write", 0o600), ("fsync", "file"), ("replace", True), ("fsync", "dir")]
    assert path.read_bytes() == b"s3cret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert sorted(p.name for p in path.parent.iterdir()) == ["password"]  # no temporary left


def test_a_public_file_is_replaced_whole_and_readable(tmp_path: Path) -> None:
    path = tmp_path / "ca.pem"
    write_public(path, b"one")
    write_public(path, b"two")
    assert path.read_bytes() == b"two"
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == atomic_files.PUBLIC_MODE & ~umask
