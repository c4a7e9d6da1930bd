"""The test suite's own structure: helpers live in tests/support, test modules
import only from there (never from one another or from conftest), and conftest
holds fixtures and pytest hooks, nothing a test could import."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).parent


def _imported_modules(tree: ast.Module) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.lineno, node.module))
            # `from tests import test_x` names the module in the alias.
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def _is_test_code(module: str) -> bool:
    parts = module.split(".")
    return (
        parts[0] == "tests"
        and len(parts) > 1
        and (parts[1] == "conftest" or parts[1].startswith("test_"))
    )


def test_no_module_imports_a_test_module_or_conftest() -> None:
    wrong = [
        f"{path.relative_to(TESTS.parent)}:{line} imports {module}"
        for path in sorted(TESTS.rglob("*.py"))
        for line, module in _imported_modules(ast.parse(path.read_text()))
        if _is_test_code(module)
    ]
    assert not wrong, "import helpers from tests/support instead:\n" + "\n".join(wrong)


def test_helpers_live_in_support() -> None:
    """Beside conftest, every module directly in tests/ is a test module."""
    others = [
        p.name
        for p in TESTS.glob("*.py")
        if not p.name.startswith("test_") and p.name not in ("conftest.py", "__init__.py")
    ]
    assert not others, f"move these to tests/support: {others}"


def _is_fixture(decorator: ast.expr) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return isinstance(target, ast.Attribute) and target.attr == "fixture"


def test_conftest_defines_fixtures_only() -> None:
    tree = ast.parse((TESTS / "conftest.py").read_text())
    wrong = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            if not (node.name.startswith("pytest_") or any(map(_is_fixture, node.decorator_list))):
                wrong.append(f"function {node.name}")
        elif isinstance(node, ast.ClassDef | ast.AsyncFunctionDef):
            wrong.append(f"{type(node).__name__} {node.name}")
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            wrong.append(f"assignment on line {node.lineno}")
    assert not wrong, f"conftest.py defines non-fixtures (move them to tests/support): {wrong}"
