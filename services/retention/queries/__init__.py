"""The Retention service's query layer: one `.sql` file of named queries per
subject (policies, grievances, data_subject, audit_log, transparency) beside a
typed module that runs them. Records go in and come out as frozen dataclasses
whose fields are named as the columns, so no caller counts positions.

`record` reads a row into such a dataclass by its field names; `params` lists a
dataclass's fields, in order, as a statement's parameters (the statement's column
list is written in the same order, and tests/test_retention_queries.py holds the
two together).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg

from services.kernel.db import Conn

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

R = TypeVar("R", bound="DataclassInstance")

Db = Conn | asyncpg.Pool
"""Where a query runs: a connection (in the caller's transaction, if any), or the
pool, for a statement that needs none."""


def record(cls: type[R], row: asyncpg.Record | Mapping[str, Any]) -> R:
    """The dataclass `cls` of a row: each field from the column of its name."""
    return cls(**{f.name: row[f.name] for f in dataclasses.fields(cls)})


def params(value: DataclassInstance) -> list[Any]:
    """A dataclass's field values in order, a nested dataclass's flattened in place."""
    found: list[Any] = []
    for f in dataclasses.fields(value):
        item = getattr(value, f.name)
        if dataclasses.is_dataclass(item) and not isinstance(item, type):
            found += params(item)
        else:
            found.append(item)
    return found


def affected(status: str) -> int:
    """The row count of a command's status ("UPDATE 3")."""
    return int(status.rsplit(maxsplit=1)[-1])
