"""Settings from the environment: each variable parsed as its field says, the built-in
defaults the same whether a process reads an empty environment or code builds
`Settings` directly, and a bad value stops the process with the variable's name."""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path

import pytest

from services.kernel.config import DEFAULT_METRICS_PORTS, DEFAULT_PORTS, Settings


@pytest.fixture
def empty_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith(("STOPCOVID_", "PG")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def test_an_empty_environment_gives_the_fields_defaults(empty_env: pytest.MonkeyPatch) -> None:
    read = Settings.from_env()
    built = Settings(state_dir=Path(".stopcovid").resolve(), database_url=None)
    differ = [f.name for f in fields(Settings) if getattr(read, f.name) != getattr(built, f.name)]
    assert not differ, f"from_env and the field defaults disagree on {differ}"
    assert read.grace_seconds == 10.0
    assert read.ports == DEFAULT_PORTS
    assert read.metrics_ports == DEFAULT_METRICS_PORTS
    assert read.server_hosts == ("localhost", "127.0.0.1")


def test_each_kind_of_variable_is_parsed(empty_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name, value in {
        "STOPCOVID_STATE_DIR": "state",
        "STOPCOVID_DB_POOL_MAX": "25",
        "STOPCOVID_GRACE_SECONDS": "2.5",
        "STOPCOVID_COMMIT_MAX_ROWS": "",  # empty: the default
        "STOPCOVID_LOG_LEVEL": "DEBUG",
        "STOPCOVID_KEYSTORE": " PKCS11 ",
        "STOPCOVID_NOTIFY_HTTP_URL": " https://sms.example/send ",
        "STOPCOVID_KEYSTORE_DIR": "keys",
        "STOPCOVID_TLS_CERT": "server.pem",
        "STOPCOVID_VENUE_PORT": "0",
        "STOPCOVID_WORKERS_METRICS_PORT": "9999",
        "STOPCOVID_METRICS": " OFF",
        "STOPCOVID_SERVER_HOSTS": "checkin.example, ,127.0.0.1",
        "STOPCOVID_ADMIN_DATABASE_URL": "",
        "PGHOST": "db.example",
    }.items():
        empty_env.setenv(name, value)
    settings = Settings.from_env()
    assert settings.state_dir == tmp_path / "state"
    assert settings.db_pool_max == 25
    assert isinstance(settings.db_pool_max, int)
    assert settings.grace_seconds == 2.5
    assert settings.commit_max_rows == 5000
    assert settings.log_level == "debug"
    assert settings.keystore_backend == "pkcs11"
    assert settings.notify_http_url == "https://sms.example/send"
    assert settings.keystore_dir == tmp_path / "keys"
    assert settings.tls_files == (None, tmp_path / "server.pem", None)
    assert settings.ports == {**DEFAULT_PORTS, "venue": 0}
    assert settings.metrics_ports == {**DEFAULT_METRICS_PORTS, "workers": 9999}
    assert settings.metrics is False
    assert settings.server_hosts == ("checkin.example", "127.0.0.1")
    assert settings.admin_database_url is None
    assert settings.database_url == "postgresql://"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("STOPCOVID_DB_POOL_MIN", "1.5", "STOPCOVID_DB_POOL_MIN must be an integer, got '1.5'"),
        ("STOPCOVID_GRACE_SECONDS", "soon", "STOPCOVID_GRACE_SECONDS must be a number"),
        ("STOPCOVID_CHECKIN_PORT", "x", "STOPCOVID_CHECKIN_PORT must be an integer"),
        ("STOPCOVID_METRICS", "maybe", "STOPCOVID_METRICS must be on or off"),
        ("STOPCOVID_KEYSTORE", "vault", "STOPCOVID_KEYSTORE must be one of file, pkcs11"),
        ("STOPCOVID_GRPC_MAX_CONNECTIONS", "0", "STOPCOVID_GRPC_MAX_CONNECTIONS must be at least"),
    ],
)
def test_a_bad_value_stops_the_process_naming_its_variable(
    empty_env: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    empty_env.setenv(name, value)
    with pytest.raises(SystemExit, match=f"^configuration error: {message}"):
        Settings.from_env()
