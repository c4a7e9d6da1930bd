"""Logs are structured and never carry what an exception might hold."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest
import structlog

from services.kernel import logging as sc_logging

PHONE = "+85512345678"


@pytest.fixture
def json_logs(capsys: pytest.CaptureFixture[str]) -> Iterator[pytest.CaptureFixture[str]]:
    """Log configuration as a JSON-logging process has it; the test must call
    `configure()` itself, because pytest swaps sys.stderr between setup and call."""
    yield capsys
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def configure() -> None:
    sc_logging.configure("info", "json", process="test")


def _explode(phone: str) -> None:
    secret_local = phone  # a frame local that must not be logged
    raise KeyError(f"no person with phone {secret_local}")


def test_exceptions_are_logged_as_type_and_stack_only(
    json_logs: pytest.CaptureFixture[str],
) -> None:
    configure()
    try:
        try:
            _explode(PHONE)
        except KeyError as inner:
            raise RuntimeError(f"lookup failed for {PHONE}") from inner
    except RuntimeError as exc:
        structlog.get_logger().error("rpc_internal_error", exc_info=exc)
    line = json_logs.readouterr().err.strip()
    assert PHONE not in line
    event = json.loads(line)
    # Not even the country code, anywhere but in the clock's digits.
    assert "855" not in json.dumps({k: v for k, v in event.items() if k != "timestamp"})
    assert event["event"] == "rpc_internal_error"
    assert event["process"] == "test"
    assert [e["type"] for e in event["exception"]] == ["RuntimeError", "KeyError"]
    assert any("in _explode" in frame for frame in event["exception"][1]["frames"])


def test_events_are_json_lines_with_stable_keys(json_logs: pytest.CaptureFixture[str]) -> None:
    configure()
    structlog.get_logger().info("venue_created", venue_id="v-1")
    event = json.loads(json_logs.readouterr().err)
    assert {"event", "venue_id", "level", "timestamp", "process"} <= set(event)
    assert event["level"] == "info"


def test_library_logs_are_json_and_redacted_too() -> None:
    """asyncpg, grpc and asyncio log through the standard library; their records
    come out as JSON lines, and an exception's message (which could carry data)
    is dropped like ours."""
    code = (
        "import logging\n"
        "from services.kernel import logging as sc\n"
        "sc.configure('info', 'json', process='t')\n"
        "try:\n"
        "    raise ValueError('+85512345678')\n"
        "except ValueError:\n"
        "    logging.getLogger('asyncpg.pool').warning('connection lost', exc_info=True)\n"
        "logging.getLogger('grpc').info('not shown: below warning')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert len(lines) == 1
    (line,) = lines
    assert line["event"] == "connection lost"
    assert line["logger"] == "asyncpg.pool"
    assert line["level"] == "warning"
    assert line["exception"][0]["type"] == "ValueError"
    assert "85512345678" not in done.stderr
