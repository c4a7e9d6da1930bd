"""Named statements: the Exposure server's query file with `:name` parameters.

A query in services/exposure/queries.sql names its parameters (`WHERE case_id =
:case_id`), so nothing counts positions: `load` turns each into asyncpg's `$n`
once, and `Statement.args` lays out the values it is given by name, refusing a
missing or an unexpected one. A name used twice is one parameter. Casts (`::uuid`),
string literals and comments are left as they are.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# A string literal or a comment (left as they are); a :name parameter (a single
# colon, not the second of a cast's two, before an identifier); a $n one (refused).
_TOKEN = re.compile(r"'(?:[^']|'')*'|--[^\n]*|(?<![:\w]):([A-Za-z_]\w*)|(\$\d+)")


@dataclass(frozen=True)
class Statement:
    name: str
    sql: str
    """The query with `$1`, `$2`, ... in place of its names."""
    params: tuple[str, ...]
    """The parameter names, in the order of their numbers."""

    def args(self, values: Mapping[str, Any]) -> list[Any]:
        """The values in parameter order; TypeError unless `values` names exactly
        the statement's parameters."""
        if set(values) != set(self.params):
            missing = sorted(set(self.params) - set(values))
            extra = sorted(set(values) - set(self.params))
            raise TypeError(f"query {self.name}: missing {missing}, unexpected {extra}")
        return [values[name] for name in self.params]


def compile_named(name: str, sql: str) -> Statement:
    """One query's named parameters as positional ones."""
    params: list[str] = []

    def number(match: re.Match[str]) -> str:
        found = match[1]
        if match[2] is not None:
            raise ValueError(f"query {name}: name its parameters (:name), not {match[2]}")
        if found is None:
            return match[0]
        if found not in params:
            params.append(found)
        return f"${params.index(found) + 1}"

    return Statement(name, _TOKEN.sub(number, sql), tuple(params))


def compiled(queries: Mapping[str, str]) -> dict[str, Statement]:
    """Every query of a file loaded with load_queries, compiled."""
    return {name: compile_named(name, sql) for name, sql in queries.items()}
