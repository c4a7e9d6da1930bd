"""The floors of the tree, as DESIGN and the README's layout table state them:
the kernel needs nothing above it, the domain needs only the kernel, the servers
and the workers build on both, and no shipped code imports the workers, the
benchmarks or the tests."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
SERVERS = ("services.checkin", "services.venue", "services.exposure", "services.retention")

# (package, what it must never import)
RULES = [
    ("services", ("workers", "bench", "tests", "tools")),
    ("workers", ("bench", "tests", "tools", *SERVERS)),
    ("services.kernel", ("services.domain", "services.ops", *SERVERS)),
    ("services.domain", ("services.ops", *SERVERS)),
]


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package.replace(".", "/")).rglob("*.py"))


def _imports(path: Path) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module))
    return found


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


@pytest.mark.parametrize(("package", "forbidden"), RULES, ids=[rule[0] for rule in RULES])
def test_a_floor_never_imports_what_stands_on_it(package: str, forbidden: tuple[str, ...]) -> None:
    breaches = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in _modules(package)
        for line, module in _imports(path)
        if any(_under(module, other) for other in forbidden)
    ]
    assert not breaches, "\n".join(breaches)


def test_the_rules_see_imports() -> None:
    """The walk finds the imports a breach would be: the rules above cannot pass
    by reading nothing."""
    pool = [module for _, module in _imports(ROOT / "workers" / "pool.py")]
    assert any(_under(m, "services.kernel") for m in pool)
    assert any(_under(m, "workers") for m in pool)
    assert len(_modules("services.kernel")) > 10
