"""The alert rules (monitoring/alerts.yml) pass their unit tests
(monitoring/alerts_test.yml) under `promtool test rules`, and name only metrics
the processes export."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

import services.kernel.grpc_metrics
import services.kernel.metrics  # noqa: F401 (defines the metrics)

MONITORING = Path(__file__).parents[1] / "monitoring"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is not installed (Debian: apt-get install prometheus; ./dev test "
    "installs it when it runs as root with apt-get)",
)


@needs_promtool
def test_the_rules_are_valid_and_their_unit_tests_pass() -> None:
    _promtool("check", "rules", "alerts.yml")
    assert "SUCCESS" in _promtool("test", "rules", "alerts_test.yml")


def _promtool(*args: str) -> str:
    """What promtool printed, run on a file of monitoring/; fails when it fails."""
    assert PROMTOOL is not None
    ran = subprocess.run(
        [PROMTOOL, *args[:-1], str(MONITORING / args[-1])],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    return ran.stdout


def test_every_alert_names_metrics_the_processes_export() -> None:
    """A metric renamed in the code must not leave an alert watching nothing."""
    text = (MONITORING / "alerts.yml").read_text()
    exprs = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    named = set(re.findall(r"\b((?:stopcovid|grpc_server)_[a-z_]+)", exprs))
    assert len(named) > 10
    base = {re.sub(r"_(total|count|sum|bucket)$", "", name) for name in named}
    exported = {family.name for family in REGISTRY.collect()}
    assert base - exported == set()


def test_every_alert_has_a_unit_test_that_fires_it() -> None:
    rules = (MONITORING / "alerts.yml").read_text()
    tests = (MONITORING / "alerts_test.yml").read_text()
    alerts = set(re.findall(r"^\s*- alert: (\w+)$", rules, re.MULTILINE))
    # A case that expects the alert lists exp_labels right after its name.
    fired = set(re.findall(r"alertname: (\w+)\n\s*exp_alerts:\n\s*- exp_labels", tests))
    assert len(alerts) >= 10
    assert alerts == fired
