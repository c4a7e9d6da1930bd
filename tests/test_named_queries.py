"""Every named query (`-- name: x` in a .sql file, loaded by `load_queries`) is defined
once in its file, every name the Python asks a query dict for is defined in the file
that dict was loaded from, and every defined query is asked for somewhere.

The Python is read, not run or listed by hand: each `X = load_queries(<path>)` binds
a dict to a file (the path evaluated from `__file__`), `from m import X` and `m.X`
follow it into other modules, and `X["name"]` (or `X.get("name")`) is a use. A key
that is not a literal is followed back to the string constants it can be (a
parameter, through the calls of its function; a conditional, both ways); what
cannot be followed fails the test, so no use goes unchecked.
"""

from __future__ import annotations

import ast
import functools
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.kernel.db import load_queries

ROOT = Path(__file__).resolve().parent.parent
PYTHON_DIRS = ("services", "workers", "clients", "bench", "tools", "tests")
SQL_DIRS = ("services", "workers", "clients", "bench")
NOT_NAMED = (ROOT / "services" / "sql",)  # migrations and the canonical schema
_WELL_FORMED = re.compile(r"--\s*name:\s*(\w+)\s*")
_LOOKS_LIKE_A_NAME = re.compile(r"\s*--\s*name\s*:", re.IGNORECASE)


class Unresolved(Exception):
    """A query name the reading cannot follow to string constants."""


@dataclass
class Module:
    name: str
    path: Path
    tree: ast.Module
    # Names bound in this module to a query dict: name -> .sql file.
    dicts: dict[str, Path] = field(default_factory=dict)
    # Names bound to a module of the tree: alias -> module name.
    modules: dict[str, str] = field(default_factory=dict)
    parents: dict[ast.AST, ast.AST] = field(default_factory=dict)


@dataclass
class Reading:
    loaded: set[Path] = field(default_factory=set)
    uses: dict[Path, set[str]] = field(default_factory=lambda: defaultdict(set))
    # (file, name) -> where it was asked for, for the failure message.
    where: dict[tuple[Path, str], str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def python_files() -> Iterator[Path]:
    """Every module, but this one: its own load_queries calls read any file."""
    for top in PYTHON_DIRS:
        yield from (p for p in sorted((ROOT / top).rglob("*.py")) if p != Path(__file__))


def sql_files() -> list[Path]:
    return [
        path
        for top in SQL_DIRS
        for path in sorted((ROOT / top).rglob("*.sql"))
        if not any(path.is_relative_to(skip) for skip in NOT_NAMED)
    ]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_load_queries(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    return (isinstance(func, ast.Name) and func.id == "load_queries") or (
        isinstance(func, ast.Attribute) and func.attr == "load_queries"
    )


def _path_value(module: Module, node: ast.expr, depth: int = 0) -> Any:
    """The value of a path expression built from `__file__` (or a constant)."""
    if depth > 20:
        raise Unresolved("too deep")

    def again(inner: ast.expr) -> Any:
        return _path_value(module, inner, depth + 1)

    if isinstance(node, ast.Constant) and isinstance(node.value, str | int):
        return node.value
    if isinstance(node, ast.Name):
        if node.id == "__file__":
            return module.path
        for statement in module.tree.body:  # a module-level constant such as ROOT
            if isinstance(statement, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == node.id for t in statement.targets
            ):
                return again(statement.value)
        raise Unresolved(f"the name {node.id}")
    if isinstance(node, ast.Call):
        func = node.func
        if isinstance(func, ast.Name) and func.id == "Path" and len(node.args) == 1:
            return Path(again(node.args[0]))
        if isinstance(func, ast.Attribute):
            base = again(func.value)
            if func.attr == "resolve" and not node.args:
                return Path(base).resolve()
            if func.attr == "with_name" and len(node.args) == 1:
                return Path(base).with_name(again(node.args[0]))
            if func.attr == "joinpath":
                return Path(base).joinpath(*map(again, node.args))
    if isinstance(node, ast.Attribute) and node.attr in ("parent", "parents"):
        return getattr(Path(again(node.value)), node.attr)
    if isinstance(node, ast.Subscript):
        return again(node.value)[again(node.slice)]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
        return Path(again(node.left)) / again(node.right)
    raise Unresolved(ast.unparse(node))


def read_modules() -> dict[str, Module]:
    modules: dict[str, Module] = {}
    for path in python_files():
        tree = ast.parse(path.read_text(), str(path))
        module = Module(module_name(path), path, tree)
        for parent in ast.walk(tree):
            for child in ast.iter_child_nodes(parent):
                module.parents[child] = parent
        modules[module.name] = module
    return modules


def bind(modules: dict[str, Module], reading: Reading) -> None:
    """Which names are query dicts, in the module that loads them and where imported."""
    for module in modules.values():
        for node in ast.walk(module.tree):
            if not _is_load_queries(node):
                continue
            parent = module.parents[node]
            if isinstance(parent, ast.Call) and parent.args == [node]:
                parent = module.parents[parent]  # X = compiled(load_queries(path))
            assert isinstance(node, ast.Call)
            target = (
                parent.targets[0]
                if isinstance(parent, ast.Assign) and len(parent.targets) == 1
                else parent.target
                if isinstance(parent, ast.AnnAssign)
                else None
            )
            if not isinstance(target, ast.Name) or module.parents[parent] is not module.tree:
                reading.problems.append(
                    f"{module.name}:{node.lineno}: load_queries must be assigned to a"
                    " module-level name, so its uses can be found"
                )
                continue
            try:
                module.dicts[target.id] = Path(_path_value(module, node.args[0])).resolve()
                reading.loaded.add(module.dicts[target.id])
            except (Unresolved, IndexError, TypeError) as err:
                reading.problems.append(
                    f"{module.name}:{node.lineno}: cannot tell which file load_queries reads"
                    f" ({err})"
                )
    for module in modules.values():
        for node in ast.walk(module.tree):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                source = modules.get(node.module)
                for alias in node.names:
                    local = alias.asname or alias.name
                    if source is not None and alias.name in source.dicts:
                        module.dicts[local] = source.dicts[alias.name]
                    elif f"{node.module}.{alias.name}" in modules:
                        module.modules[local] = f"{node.module}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname and alias.name in modules:
                        module.modules[alias.asname] = alias.name


def _dict_of(module: Module, modules: dict[str, Module], node: ast.AST) -> Path | None:
    """The file of the query dict `node` names (X, or m.X), if it names one."""
    if isinstance(node, ast.Name):
        return module.dicts.get(node.id)
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        other = modules.get(module.modules.get(node.value.id, ""))
        if other is not None:
            return other.dicts.get(node.attr)
    return None


def _enclosing_functions(module: Module, node: ast.AST) -> Iterator[ast.FunctionDef]:
    while node in module.parents:
        node = module.parents[node]
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node  # type: ignore[misc]


def _calls_of(module: Module, function: ast.FunctionDef) -> Iterator[ast.Call]:
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            if name == function.name:
                yield node


def _is_method(module: Module, function: ast.FunctionDef) -> bool:
    return isinstance(module.parents.get(function), ast.ClassDef) and not any(
        isinstance(d, ast.Name) and d.id == "staticmethod" for d in function.decorator_list
    )


def names_of(module: Module, node: ast.expr, depth: int = 0) -> set[str]:
    """Every string a query key expression can be; Unresolved if that is unknowable."""
    if depth > 10:
        raise Unresolved("too deep")
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, ast.IfExp):
        return names_of(module, node.body, depth + 1) | names_of(module, node.orelse, depth + 1)
    if isinstance(node, ast.Name):
        for function in _enclosing_functions(module, node):
            params = [a.arg for a in function.args.posonlyargs + function.args.args]
            if node.id not in params:
                continue
            index = params.index(node.id)
            found: set[str] = set()
            for call in _calls_of(module, function):
                keyword = next((k.value for k in call.keywords if k.arg == node.id), None)
                shift = (
                    1
                    if _is_method(module, function) and isinstance(call.func, ast.Attribute)
                    else 0
                )
                if keyword is not None:
                    found |= names_of(module, keyword, depth + 1)
                elif 0 <= index - shift < len(call.args):
                    found |= names_of(module, call.args[index - shift], depth + 1)
                else:
                    raise Unresolved(f"{function.name}() called without {node.id}")
            if not found:
                raise Unresolved(f"{function.name}() is never called in its module")
            return found
        raise Unresolved(f"the name {node.id}")
    raise Unresolved(ast.unparse(node))


def read_uses(modules: dict[str, Module], reading: Reading) -> None:
    for module in modules.values():
        asked: set[ast.AST] = set()
        for node in ast.walk(module.tree):
            key: ast.expr | None = None
            if isinstance(node, ast.Subscript) and _dict_of(module, modules, node.value):
                target, key = node.value, node.slice
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "get"
                and _dict_of(module, modules, node.func.value)
                and node.args
            ):
                target, key = node.func.value, node.args[0]
            if key is None:
                continue
            asked.add(target)
            line = getattr(node, "lineno", 0)
            sql = _dict_of(module, modules, target)
            assert sql is not None
            try:
                names = names_of(module, key)
            except Unresolved as err:
                reading.problems.append(
                    f"{module.name}:{line}: cannot tell which query"
                    f" {ast.unparse(node)} names ({err}); name it with a string literal"
                )
                continue
            for name in names:
                reading.uses[sql].add(name)
                reading.where.setdefault((sql, name), f"{module.name}:{line}")
        if module.name.startswith("tests."):
            continue  # a test may read a whole dict (every statement): it uses none
        for node in ast.walk(module.tree):
            loaded = isinstance(node, ast.Name | ast.Attribute) and isinstance(node.ctx, ast.Load)
            if loaded and node not in asked and _dict_of(module, modules, node):
                reading.problems.append(
                    f"{module.name}:{getattr(node, 'lineno', 0)}: {ast.unparse(node)} is used"
                    " other than by a query's name, so its uses cannot be checked"
                )


@functools.cache
def read() -> Reading:
    """The whole tree's query dicts and their uses (read once per session)."""
    reading = Reading()
    modules = read_modules()
    bind(modules, reading)
    read_uses(modules, reading)
    return reading


def defined(path: Path) -> set[str]:
    """The names a query file defines, even one that defines a name twice."""
    return {m[1] for line in path.read_text().splitlines() if (m := _WELL_FORMED.fullmatch(line))}


def _relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_every_query_file_defines_each_name_once_and_well() -> None:
    wrong = []
    for path in sql_files():
        where = _relative(path)
        wrong += [
            f"{where}: {line!r} is not read as a query name"
            for line in path.read_text().splitlines()
            if _LOOKS_LIKE_A_NAME.match(line) and not _WELL_FORMED.fullmatch(line)
        ]
        try:
            queries = load_queries(path)
        except ValueError as err:  # a name defined twice
            wrong.append(f"{where}: {err}")
            continue
        assert set(queries) == defined(path), "this test reads names as load_queries does"
        wrong += [f"{where}: {name} is empty" for name, sql in queries.items() if not sql]
        if not queries:
            wrong.append(f"{where}: no named queries")
    assert not wrong, "\n".join(wrong)


def test_every_query_asked_for_is_defined_in_the_file_its_dict_loads() -> None:
    reading = read()
    missing = [
        f"{where}: {name!r} is not defined in {_relative(sql)}"
        for (sql, name), where in sorted(reading.where.items())
        if name not in defined(sql)
    ]
    assert not reading.problems + missing, "\n".join(reading.problems + missing)


def test_every_query_file_is_loaded_and_every_query_used() -> None:
    reading = read()
    unloaded = [_relative(p) for p in sql_files() if p.resolve() not in reading.loaded]
    assert not unloaded, f"query files no module loads: {unloaded}"
    unused = [
        f"{_relative(sql)}: {name}"
        for sql in sql_files()
        for name in sorted(defined(sql))
        if name not in reading.uses[sql.resolve()]
    ]
    assert not unused, "queries nothing uses:\n" + "\n".join(unused)
