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
