"""Transparency figures: counts of what the platform did in a period (access
requests and their decisions, traces, notifications, entry denials, grievances by
state, deletions, withdrawals), never personal data, and the same by province.

By province, every province appears, in code order, with zeros where nothing
happened, so a report always has the same 25 rows and a reader can compare
provinces. Venues whose stored code is no province (registered before codes were
checked; see services/domain/places/regions.py) are counted together in one more
row with an empty code, present only when there are such venues or figures about
them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections import Counter
from collections.abc import Mapping, Sequence

from stopcovid.retention.v1 import retention_service_pb2 as pb

from services.domain.places import regions
from services.kernel.rpc import Context, timestamp
from services.retention.base import RetentionBase
from services.retention.queries import transparency as store
from services.retention.queries.transparency import ClassDeletions
from services.retention.spans import Span
from services.retention.vocabulary import DATA_CLASSES, STATES

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def by_province(by_region: Mapping[str, Mapping[str, int]]) -> list[pb.ProvinceCount]:
    """Every province's figures in code order, then those of the venues whose stored
    code is no province, together."""
    counts: dict[str, Counter[str]] = {p.code: Counter() for p in regions.PROVINCES}
    for stored, figures in by_region.items():
        counts.setdefault(regions.of_stored(stored), Counter()).update(figures)
    return [
        pb.ProvinceCount(
            region_code=code,
            name_en=regions.BY_CODE[code].name_en if code in regions.BY_CODE else "",
            name_km=regions.BY_CODE[code].name_km if code in regions.BY_CODE else "",
            **figures,
        )
        for code, figures in counts.items()
    ]


def _deletions(found: Sequence[ClassDeletions]) -> list[pb.DataClassDeletionCount]:
    """By class, in DataClass order."""
    return sorted(
        (
            pb.DataClassDeletionCount(
                data_class=DATA_CLASSES.number(d.data_class),
                report_count=d.report_count,
                row_count=d.row_count,
                destroyed_key_count=d.destroyed_key_count,
            )
            for d in found
        ),
        key=lambda d: d.data_class,
    )


class TransparencyRpcs(RetentionBase):
    async def GetTransparencyReport(
        self, request: pb.GetTransparencyReportRequest, context: Context
    ) -> pb.GetTransparencyReportResponse:
        span = Span.of(request.period, "period")
        now = dt.datetime.now(dt.UTC)
        low, high = span.start or _EPOCH, span.end or now
        async with (
            self._pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            found = await store.figures(conn, low, high)
        return pb.GetTransparencyReportResponse(
            period=Span(span.start, high).to_proto(),
            generate_time=timestamp(now),
            grievances_by_state=[
                pb.GrievanceStateCount(state=number, count=found.grievances_by_state.get(word, 0))
                for number, word in STATES.items()
            ],
            deletions=_deletions(found.deletions),
            by_province=by_province(found.by_region),
            **dataclasses.asdict(found.counts),
        )
