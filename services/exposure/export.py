"""The trace-contacts export for health departments: CSV a spreadsheet can open
safely (ExportTraceContacts).

- UTF-8 with a byte-order mark: without it Excel reads UTF-8 as the local code
  page and Khmer venue names turn to mojibake.
- Formula injection: a cell beginning with =, +, -, @, a tab or a carriage return
  (or their full-width forms, which some spreadsheets accept too), after any
  blanks, is run as a formula by spreadsheets (the attack that hit another
  country's contact-tracing export). Every such cell gets a leading apostrophe,
  which spreadsheets show as text and do not display; no other cell is changed.
  It applies to every cell, ours included, so no future column can forget it.
- Streaming: rows come through a server-side cursor and leave in chunks of about
  CHUNK_BYTES, so memory stays flat whatever the trace's size.
- Accountability: the grant is checked and the export audited with its row count
  in a committed transaction before the first byte leaves, so every row that
  reaches a caller is covered by an audit record even if the stream breaks.

Times are Cambodia time (UTC+07:00) as YYYY-MM-DD HH:MM:SS, which spreadsheets
read as date-times.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import structlog
from cryptography.exceptions import InvalidTag
from stopcovid.common.v1 import common_pb2

from services.domain.exposure import risk
from services.domain.places import regions
from services.kernel import errors
from services.kernel.clock import CAMBODIA
from services.kernel.db import Conn, load_queries
from services.kernel.keys import DataKey

log = structlog.get_logger()

Q = load_queries(Path(__file__).with_name("export.sql"))

CONTENT_TYPE = "text/csv; charset=utf-8"
BOM = "\ufeff"
CHUNK_BYTES = 64 * 1024
CURSOR_PREFETCH = 500

COLUMNS = (
    "contact_ref",
    "risk_level",
    "rule",
    "venue_id",
    "venue_name",
    "venue_address",
    "province_code",
    "province_name_en",
    "province_name_km",
    "case_visit_start",
    "case_visit_end",
    "contact_stay_start",
    "contact_stay_end",
    "overlap_minutes",
    "stay_end_estimated",
)
PERSON_COLUMN = "person_id"

FORMULA_TRIGGERS = frozenset("=+-@\t\r\n\uff1d\uff0b\uff0d\uff20")
"""First characters that make a spreadsheet evaluate a cell (ASCII and full-width)."""
_BLANKS = (
    " \u00a0\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u200b\u3000\ufeff"
)


def neutralise(cell: str) -> str:
    """`cell` as a spreadsheet will show it literally: prefixed with an apostrophe
    when its first character, or its first after leading blanks, would start a
    formula."""
    if cell and (cell[0] in FORMULA_TRIGGERS or cell.lstrip(_BLANKS)[:1] in FORMULA_TRIGGERS):
        return "'" + cell
    return cell


def _time(at: dt.datetime) -> str:
    return at.astimezone(CAMBODIA).strftime("%Y-%m-%d %H:%M:%S")


def _level(rank: int) -> str:
    return common_pb2.RiskLevel.Name(common_pb2.RiskLevel.ValueType(rank)).removeprefix(
        "RISK_LEVEL_"
    )


@dataclass(frozen=True)
class ExportPlan:
    """An export the caller may receive: checked and audited, not yet read."""

    trace_id: uuid.UUID
    min_rank: int
    row_count: int
    key: DataKey | None
    """The case key when person ids are included."""


def _row(record: asyncpg.Record, person_id: str | None) -> list[str]:
    province = regions.BY_CODE.get(record["region_code"])
    cells = [
        record["contact_ref"],
        _level(record["level_rank"]),
        record["rule"],
        str(record["venue_id"]),
        record["venue_name"],
        record["venue_address"],
        record["region_code"],
        province.name_en if province else "",
        province.name_km if province else "",
        _time(record["case_visit_start"]),
        _time(record["case_visit_end"]),
        _time(record["contact_stay_start"]),
        _time(record["contact_stay_end"]),
        str(int(record["overlap"].total_seconds() // 60)),
        "true" if record["stay_end_estimated"] else "false",
    ]
    if person_id is not None:
        cells.append(person_id)
    return [neutralise(c) for c in cells]


async def count_rows(conn: Conn, trace_id: uuid.UUID, min_rank: int) -> int:
    count: int = await conn.fetchval(Q["count_export_rows"], trace_id, min_rank)
    return count


def min_rank(requested: int) -> int:
    """The lowest RiskLevel number exported: `requested`, or LOW when unset."""
    if requested and requested not in risk.LEVELS.values():
        raise errors.InvalidArgument(
            "min_risk_level is not a known RiskLevel", field="min_risk_level"
        )
    return max(requested, common_pb2.RISK_LEVEL_LOW)


async def chunks(pool: asyncpg.Pool, plan: ExportPlan) -> AsyncIterator[tuple[bytes, int]]:
    """(CSV bytes, data rows in them) in order; the first chunk starts with the BOM
    and the header.

    A row whose person id does not decrypt keeps its place with an empty
    person_id, and is counted, as a trace skips and counts bad rows."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    buffer.write(BOM)
    writer.writerow([*COLUMNS, *([PERSON_COLUMN] if plan.key is not None else [])])
    aad = b"contact|" + plan.trace_id.bytes
    rows = pending = undecryptable = 0
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        async for record in conn.cursor(
            Q["export_rows"], plan.trace_id, plan.min_rank, prefetch=CURSOR_PREFETCH
        ):
            person: str | None = None
            if plan.key is not None:
                try:
                    person = str(
                        uuid.UUID(bytes=plan.key.decrypt(bytes(record["person_enc"]), aad))
                    )
                except (InvalidTag, ValueError):
                    person = ""
                    undecryptable += 1
            writer.writerow(_row(record, person))
            rows += 1
            pending += 1
            if buffer.tell() >= CHUNK_BYTES:
                yield buffer.getvalue().encode(), pending
                buffer.seek(0)
                buffer.truncate()
                pending = 0
    yield buffer.getvalue().encode(), pending
    if undecryptable:
        log.warning("export_person_ids_undecryptable", rows=rows, undecryptable=undecryptable)
