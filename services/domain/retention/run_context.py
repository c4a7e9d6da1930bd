"""An expiry run in progress, as its steps share it: the run's record and reports,
the policies it read, and how each step audits and reports what it deleted.

The steps (check_in_expiry.py, case_expiry.py, row_expiry.py) each take a
RunContext; expiry_run.py makes one per run, under the run's lock.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.domain.retention import audit_actions
from services.kernel import audit
from services.kernel.auth import Principal
from services.kernel.db import Conn, load_queries, one
from services.kernel.keys import KeyStore

Q = load_queries(Path(__file__).with_name("expiry_run.sql"))

SCHEDULED, ON_DEMAND = "scheduled", "on_demand"


@dataclass
class Deletion:
    """One class's deletion report (stored unless the run is a dry run)."""

    data_class: str
    period_days: int
    row_count: int
    data_start: dt.datetime | None
    data_end: dt.datetime | None
    destroyed_key_ids: list[str] = field(default_factory=list)
    deletion_report_id: uuid.UUID | None = None
    create_time: dt.datetime | None = None


@dataclass
class ExpiryRun:
    run_id: uuid.UUID | None  # None for a dry run
    trigger: str
    requester: str
    dry_run: bool
    reports: list[Deletion] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per step (for the benchmark and the logs)."""


@dataclass
class RunContext:
    conn: Conn
    keystore: KeyStore
    now: dt.datetime
    run: ExpiryRun
    principal: Principal
    policies: dict[str, int]
    """Each class's period in days, read once under the lock."""
    wanted: Sequence[str]
    """The classes this run expires."""

    @property
    def dry_run(self) -> bool:
        return self.run.dry_run

    def cutoff(self, data_class: str) -> dt.datetime:
        """Rows of `data_class` whose own time is at or before this are past their period."""
        return self.now - dt.timedelta(days=self.policies[data_class])

    async def audit(
        self,
        step: str,
        resource_type: str,
        resource_id: str,
        details: dict[str, Any],
        case_id: uuid.UUID | None = None,
    ) -> None:
        """Audit one step: as the worker's step when scheduled, as RunExpiry on demand."""
        assert self.run.run_id is not None
        scheduled = self.run.trigger == SCHEDULED
        await audit.record(
            self.conn,
            audit_actions.expiry_step(step) if scheduled else audit_actions.RUN_EXPIRY,
            resource_type,
            resource_id,
            {"step": step, "run_id": str(self.run.run_id), **details},
            case_id=case_id,
            principal=self.principal,
        )

    async def report(self, deletion: Deletion) -> None:
        """Store the report (inside the class's transaction) unless dry run."""
        if not self.run.dry_run:
            row = one(
                await self.conn.fetchrow(
                    Q["insert_report"],
                    uuid.uuid4(),
                    self.run.run_id,
                    deletion.data_class,
                    deletion.period_days,
                    deletion.row_count,
                    deletion.data_start,
                    deletion.data_end,
                    deletion.destroyed_key_ids,
                    self.run.trigger,
                    self.run.requester,
                )
            )
            deletion.deletion_report_id = row["deletion_report_id"]
            deletion.create_time = row["create_time"]
        self.run.reports.append(deletion)

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Add the seconds the block takes to the run's timing `name`."""
        began = time.perf_counter()
        yield
        self.run.timings[name] = self.run.timings.get(name, 0.0) + time.perf_counter() - began
