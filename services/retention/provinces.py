"""Transparency figures by province (GetTransparencyReport's `by_province`).

Every province appears, in code order, with zeros where nothing happened, so a
report always has the same 25 rows and a reader can compare provinces. Venues
whose stored code is no province (registered before codes were checked; see
services/domain/places/regions.py) are counted together in one more row with an empty
code, present only when there are such venues or figures about them.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from pathlib import Path

from stopcovid.retention.v1 import retention_service_pb2 as pb

from services.domain.places import regions
from services.kernel.db import Conn, load_queries

Q = load_queries(Path(__file__).with_name("provinces.sql"))

FIGURES = {
    "venues": "venue_count",
    "contacts": "contact_count",
    "notifications_sent": "notification_sent_count",
    "entry_denials": "entry_denial_count",
}


async def by_province(conn: Conn, low: dt.datetime, high: dt.datetime) -> list[pb.ProvinceCount]:
    """The figures of [low, high) by province, in the caller's transaction (so they
    agree with the report's other counts)."""
    counts: dict[str, Counter[str]] = {p.code: Counter() for p in regions.PROVINCES}
    for row in await conn.fetch(Q["province_figures"], low, high):
        code = regions.of_stored(row["region_code"])
        counts.setdefault(code, Counter())[FIGURES[row["figure"]]] += row["n"]
    return [
        pb.ProvinceCount(
            region_code=code,
            name_en=regions.BY_CODE[code].name_en if code in regions.BY_CODE else "",
            name_km=regions.BY_CODE[code].name_km if code in regions.BY_CODE else "",
            **figures,
        )
        for code, figures in counts.items()
    ]
