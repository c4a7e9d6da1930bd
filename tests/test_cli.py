"""The operator's command line: migrations, keys and the generated role table (the
certificate commands: tests/test_certs.py)."""

from __future__ import annotations

import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from services.domain.people.tokens import PersonalTokens
from services.kernel.config import Settings
from services.ops import setup
from services.ops.cli import roles_markdown
from tests.support.cli import stopcovid

REPO = Path(__file__).resolve().parent.parent


def test_roles_doc_matches_the_protos() -> None:
    committed = (REPO / "docs" / "rpc-roles.md").read_text()
    assert committed == roles_markdown(), "run: ./dev stopcovid roles > docs/rpc-roles.md"


def test_migrate_applies_nothing_twice(settings: Settings) -> None:
    done = stopcovid(
        "migrate",
        state=settings.state_dir,
        STOPCOVID_DATABASE_URL=str(settings.database_url),
        STOPCOVID_DATABASE_NAME=settings.database_name,
    )
    assert done.returncode == 0, done.stderr
    assert "applied migrations: none (up to date)" in done.stdout


def test_migrate_without_a_database_says_how_to_get_one(tmp_path: Path) -> None:
    done = stopcovid("migrate", state=tmp_path)
    assert done.returncode == 2
    assert "no database configured" in done.stderr


@pytest.fixture
def own(session_settings: Settings, tmp_path: Path) -> Settings:
    """The session's settings with a key store of the test's own."""
    return replace(session_settings, keystore_override=tmp_path / "keys")


def _keys(own: Settings, command: str) -> str:
    """`stopcovid keys COMMAND` on `own`'s key store; what it printed."""
    done = stopcovid(
        "keys", command, state=own.state_dir, STOPCOVID_KEYSTORE_DIR=str(own.keystore_dir)
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_rotating_the_token_key_keeps_old_tokens_valid(own: Settings) -> None:
    store = setup.ensure_keys(own)
    person = uuid.uuid4()
    old = PersonalTokens(*store.token_keys(), 60).issue_static(person)
    assert "new personal-token key: t2" in _keys(own, "rotate-token")
    after = PersonalTokens(*store.token_keys(), 60)
    assert after.current_kid == "t2"
    assert after.issue_static(person).startswith("S1.t2.")
    assert after.verify(old, 0).person_id == person


def test_rotating_the_people_key_keeps_old_data_readable(own: Settings) -> None:
    old = setup.ensure_keys(own).people_key()
    sealed = old.encrypt(b"+85512345678", b"phone|test")
    printed = _keys(own, "rotate-people")
    after = setup.ensure_keys(own)
    current = after.people_key()
    assert current.key_id != old.key_id
    assert f"new people key: {current.key_id} " in printed
    assert "Restart the CheckIn and Retention servers" in printed
    assert after.people_key(old.key_id).decrypt(sealed, b"phone|test") == b"+85512345678"
