"""The operator's command line: certificates and the generated role table."""

from __future__ import annotations

import subprocess
import sys
import uuid
from dataclasses import replace
from pathlib import Path

from services.domain.people.tokens import PersonalTokens
from services.kernel import auth
from services.kernel.config import Settings
from services.ops import setup
from services.ops.cli import roles_markdown

REPO = Path(__file__).resolve().parent.parent


def stopcovid(*args: str, state: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.ops.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"STOPCOVID_STATE_DIR": str(state), "PATH": "/usr/bin:/bin", **env},
    )


def test_roles_doc_matches_the_protos() -> None:
    committed = (REPO / "docs" / "rpc-roles.md").read_text()
    assert committed == roles_markdown(), "run: ./dev stopcovid roles > docs/rpc-roles.md"


def test_certs_issue_makes_a_working_principal_certificate(tmp_path: Path) -> None:
    done = stopcovid(
        "certs",
        "issue",
        "moh-tracer-01",
        "health-official",
        "--out",
        str(tmp_path / "out"),
        state=tmp_path / "state",
    )
    assert done.returncode == 0, done.stderr
    cert = (tmp_path / "out" / "moh-tracer-01.pem").read_bytes()
    key = tmp_path / "out" / "moh-tracer-01.key"
    assert key.stat().st_mode & 0o077 == 0  # the private key is the owner's alone
    principal = auth.principal_from_pem(cert)
    assert (principal.name, principal.role) == ("moh-tracer-01", "ROLE_HEALTH_OFFICIAL")
    # Issued by the CA the servers trust.
    assert (tmp_path / "state" / "pki" / "ca.pem").exists()
    assert (tmp_path / "state" / "pki" / "ca.key").stat().st_mode & 0o077 == 0


def test_certs_issue_refuses_unknown_roles(tmp_path: Path) -> None:
    done = stopcovid("certs", "issue", "someone", "superuser", state=tmp_path / "state")
    assert done.returncode == 2
    assert "unknown role 'superuser'" in done.stderr
    assert "health-official" in done.stderr
    assert not (tmp_path / "state" / "pki" / "someone.pem").exists()


def test_certs_issue_refuses_names_that_are_not_plain(tmp_path: Path) -> None:
    for name in ["../escape", "", "UPPER", "a b"]:
        done = stopcovid("certs", "issue", name, "auditor", state=tmp_path / "state")
        assert done.returncode == 2, name
    assert not (tmp_path / "escape.pem").exists()


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


def test_rotating_the_token_key_keeps_old_tokens_valid(
    session_settings: Settings, tmp_path: Path
) -> None:
    own = replace(session_settings, keystore_override=tmp_path / "keys")
    store = setup.ensure_keys(own)
    person = uuid.uuid4()
    old = PersonalTokens(*store.token_keys(), 60).issue_static(person)
    done = stopcovid(
        "keys",
        "rotate-token",
        state=own.state_dir,
        STOPCOVID_KEYSTORE_DIR=str(own.keystore_dir),
    )
    assert done.returncode == 0, done.stderr
    assert "new personal-token key: t2" in done.stdout
    after = PersonalTokens(*store.token_keys(), 60)
    assert after.current_kid == "t2"
    assert after.issue_static(person).startswith("S1.t2.")
    assert after.verify(old, 0).person_id == person
