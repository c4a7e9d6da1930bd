"""Expiry of case records, with their case keys.

A case not yet purged whose last report, trace or case record is older than the
CASE_RECORDS period (and with no trace queued or running) loses its trace
contacts, case records and encrypted person; its case key is destroyed and
cases.purge_time set. The case row stays (ids, dates, counts).

Key first, as for check-in days (check_in_expiry.py): a crash between destroying
the keys and deleting the rows leaves rows nobody can read, and the next run
deletes them.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

import structlog

from services.domain.retention.run_context import Deletion, Q, RunContext
from services.kernel.db import one
from services.kernel.keys import KeyStore

log = structlog.get_logger()


def _destroy_case_keys(keystore: KeyStore, case_ids: Sequence[uuid.UUID]) -> None:
    for case_id in case_ids:
        keystore.destroy_case_key(case_id)


async def expire(run: RunContext, data_class: str = "case_records") -> None:
    period = run.policies[data_class]
    cases = await run.conn.fetch(Q["expirable_cases"], run.cutoff(data_class))
    if not cases:
        return
    ids = [r["case_id"] for r in cases]
    rows = sum(r["contact_count"] + r["record_count"] for r in cases)
    starts = [r["data_start"] for r in cases if r["data_start"] is not None]
    ends = [r["data_end"] for r in cases if r["data_end"] is not None]
    span = (min(starts, default=None), max(ends, default=None))
    key_ids = [f"case-{c}" for c in ids]
    if run.dry_run:
        await run.report(Deletion(data_class, period, rows, *span, key_ids))
        return
    with run.timed("destroy_case_keys_s"):
        await asyncio.to_thread(_destroy_case_keys, run.keystore, ids)
    async with run.conn.transaction():
        done = one(await run.conn.fetchrow(Q["purge_cases"], ids))
        for r in cases:
            await run.audit(
                "purge_case_records",
                "case",
                str(r["case_id"]),
                {"contact_count": r["contact_count"], "record_count": r["record_count"]},
                case_id=r["case_id"],
            )
            await run.audit(
                "destroy_case_key", "case_key", f"case-{r['case_id']}", {}, case_id=r["case_id"]
            )
        deleted = done["contact_count"] + done["record_count"]
        await run.report(Deletion(data_class, period, deleted, *span, key_ids))
    log.info("expiry_case_records", cases=len(ids), rows=deleted)
