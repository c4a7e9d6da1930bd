"""The trace-contacts export for health departments (ExportTraceContacts): CSV a
spreadsheet can open safely.

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
read as date-times. The rows are the ones ListTraceContacts lists, found and
checked the same way (ExposureBase._succeeded_trace), but always under a grant.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import structlog
from cryptography.exceptions import InvalidTag
from stopcovid.common.v1 import common_pb2
from stopcovid.exposure.v1 import exposure_service_pb2 as pb

from services.domain.exposure import risk
from services.domain.exposure.records import ExportRow
from services.domain.places import regions
from services.exposure import convert, queries
from services.exposure.base import ExposureBase
from services.kernel import validation
from services.kernel.clock import CAMBODIA
from services.kernel.keys import DataKey, Sealed
from services.kernel.rpc import Context

log = structlog.get_logger()

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
    return risk.LEVELS_BACK[common_pb2.RiskLevel.ValueType(rank)].upper()


@dataclass(frozen=True)
class ExportPlan:
    """An export the caller may receive: checked and audited, not yet read."""

    trace_id: uuid.UUID
    min_rank: int
    row_count: int
    key: DataKey | None
    """The case key when person ids are included."""


def _row(row: ExportRow, person_id: str | None) -> list[str]:
    province = regions.BY_CODE.get(row.region_code)
    cells = [
        row.contact_ref,
        _level(row.level_rank),
        row.rule,
        str(row.venue_id),
        row.venue_name,
        row.venue_address,
        row.region_code,
        province.name_en if province else "",
        province.name_km if province else "",
        _time(row.case_visit_start),
        _time(row.case_visit_end),
        _time(row.contact_stay_start),
        _time(row.contact_stay_end),
        str(int(row.overlap.total_seconds() // 60)),
        "true" if row.stay_end_estimated else "false",
    ]
    if person_id is not None:
        cells.append(person_id)
    return [neutralise(c) for c in cells]


async def chunks(pool: asyncpg.Pool, plan: ExportPlan) -> AsyncIterator[tuple[bytes, int]]:
    """(CSV bytes, data rows in them) in order; the first chunk starts with the BOM
    and the header.

    A row whose person id does not decrypt keeps its place with an empty
    person_id, and is counted, as a trace skips and counts bad rows."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    buffer.write(BOM)
    writer.writerow([*COLUMNS, *([PERSON_COLUMN] if plan.key is not None else [])])
    rows = pending = undecryptable = 0
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        async for row in queries.export_rows(conn, plan.trace_id, plan.min_rank, CURSOR_PREFETCH):
            person: str | None = None
            if plan.key is not None:
                try:
                    opened = Sealed.CONTACT_PERSON.open(plan.key, plan.trace_id, row.person_enc)
                    person = str(uuid.UUID(bytes=opened))
                except (InvalidTag, ValueError):
                    person = ""
                    undecryptable += 1
            writer.writerow(_row(row, person))
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


async def _responses(
    pieces: AsyncIterator[tuple[bytes, int]], audited_rows: int
) -> AsyncIterator[pb.ExportTraceContactsResponse]:
    """The chunks as messages: the first names the content type, the last carries
    the row count (so each is held back one step)."""
    held: bytes | None = None
    first = True
    sent = 0
    async for content, rows in pieces:
        if held is not None:
            yield pb.ExportTraceContactsResponse(
                content=held, content_type=CONTENT_TYPE if first else ""
            )
            first = False
        held = content
        sent += rows
    yield pb.ExportTraceContactsResponse(
        content=held or b"", content_type=CONTENT_TYPE if first else "", row_count=sent
    )
    log.info("trace_contacts_exported", rows=sent, audited_rows=audited_rows)


class ExportRpcs(ExposureBase):
    async def ExportTraceContacts(
        self, request: pb.ExportTraceContactsRequest, context: Context
    ) -> AsyncIterator[pb.ExportTraceContactsResponse]:
        """The contacts as CSV chunks, under an active grant, audited with the row
        count before the first byte leaves."""
        plan = await self._plan(
            validation.uuid_id(request.trace_id, "trace_id"),
            convert.min_risk_rank(request.min_risk_level),
            identify=request.include_person_ids,
        )
        async for response in _responses(chunks(self._pool, plan), plan.row_count):
            yield response

    async def _plan(self, trace_id: uuid.UUID, min_rank: int, *, identify: bool) -> ExportPlan:
        """The export the caller may receive, its row count audited and committed."""
        async with self._pool.acquire() as conn, conn.transaction():
            trace, grant = await self._succeeded_trace(conn, trace_id, grant_needed=True)
            assert grant is not None
            key = self._case_key(trace.case_id) if identify else None
            count = await queries.count_export_rows(conn, trace_id, min_rank)
            await self._audit(
                conn,
                ("trace", trace_id),
                {"rows": count, "person_ids_decrypted": count if key else 0, "format": "csv"},
                case_id=trace.case_id,
                grant_id=grant.grant_id,
            )
        return ExportPlan(trace_id, min_rank, count, key)
