"""The README documents every setting the processes read."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_setting_is_in_the_readme_configuration_table() -> None:
    config = (ROOT / "services/core/config.py").read_text()
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Configuration") :]
    table = table[: table.index("\n## ")]
    names = set(re.findall(r'"(STOPCOVID_[A-Z0-9_]+)"', config))
    assert len(names) > 40
    # A row may name several variables sharing a prefix: `STOPCOVID_X_A`, `_B`.
    documented = set(re.findall(r"STOPCOVID_[A-Z0-9_]+", table))
    shared = re.findall(r"`(STOPCOVID_[A-Z0-9_]+?)_[A-Z0-9]+`((?:, `_[A-Z0-9_]+`)+)", table)
    for first, rest in shared:
        documented |= {first + suffix for suffix in re.findall(r"`(_[A-Z0-9_]+)`", rest)}
    missing = sorted(names - documented)
    assert not missing, f"settings missing from the README's configuration table: {missing}"


def test_every_error_reason_the_servers_give_is_in_the_api() -> None:
    """Callers branch on ErrorInfo.reason, so each one the code gives must be an
    ErrorReason value (without its prefix)."""
    from stopcovid.common.v1 import common_pb2

    names = common_pb2.ErrorReason.DESCRIPTOR.values_by_name
    known = {name.removeprefix("ERROR_REASON_") for name in names}
    given: set[str] = set()
    for path in (ROOT / "services").rglob("*.py"):
        source = path.read_text()
        given |= set(re.findall(r'\breason="([A-Z_]+)"', source))
        given |= set(re.findall(r'^\s+reason(?::\s*str)? = "([A-Z_]+)"', source, re.M))
    assert len(given) > 15
    assert given <= known, f"reasons not in stopcovid.common.v1.ErrorReason: {given - known}"
