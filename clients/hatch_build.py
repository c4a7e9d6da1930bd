"""Build hook of stopcovid-client: where its generated code comes from.

The generated messages and stubs live in the repository's one generated tree,
`../gen/stopcovid/` (`./dev gen` writes it), not in this project. A wheel or an sdist
built from the repository gets a copy of them beside `stopcovid/client/` (so a wheel
built from that sdist finds them in place); an editable install reads them where they
are, through `dev-mode-dirs`, so that regenerating takes effect at once and no stale
copy in site-packages can shadow the tree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class GeneratedCode(BuildHookInterface):  # type: ignore[type-arg]
    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if version == "editable":
            return
        root = Path(self.root).resolve()
        generated = root.parent / "gen" / "stopcovid"
        if any(generated.glob("*/v*/*_pb2.py")):
            build_data["force_include"][str(generated)] = "stopcovid"
        elif not any((root / "stopcovid").glob("*/v*/*_pb2.py")):
            raise RuntimeError(f"no generated code in {generated}: run ./dev gen")
