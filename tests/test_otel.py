"""OpenTelemetry traces (services/kernel/tracing.py), recorded by the SDK's in-memory
exporter: an RPC continues its caller's trace; a scan batch is a child of its
stream's span and its group commit is in the batch's trace, linked to it; a trace
job run by a worker continues the trace of the StartTrace call that queued it,
through the traces row. Off by default, with nothing recorded or stored."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from stopcovid.exposure.v1 import exposure_service_pb2 as epb

from services.domain.exposure.trace_job import TraceRunner
from services.kernel import db, tracing
from services.kernel.config import Settings
from services.kernel.keys import open_keystore
from tests.support.checkin_helpers import add_device, batch, create_venue, enroll, open_stream, scan
from tests.support.database import Query
from tests.support.exposure_helpers import by_id, exposure, grant_access, report_case
from tests.support.servers import Pki, Servers, running_servers


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracing.install(exporter, "test", batch=False)
    try:
        yield exporter
    finally:
        tracing.uninstall()


@pytest.fixture
def traced(spans: InMemorySpanExporter, settings: Settings, pki: Pki) -> Iterator[Servers]:
    """The servers, started while tracing is on (the interceptor is installed at start)."""
    with running_servers(settings, pki) as servers:
        yield servers


def _named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def _caller() -> tuple[str, int, int]:
    """A caller's W3C traceparent, and its trace and span ids."""
    trace_id, span_id = secrets.randbits(128) | 1, secrets.randbits(64) | 1
    return f"00-{trace_id:032x}-{span_id:016x}-01", trace_id, span_id


def _start_trace(servers: Servers, case_id: str, grant_id: str, traceparent: str) -> epb.Trace:
    """StartTrace, as a caller whose own trace is `traceparent`."""
    with exposure(servers) as client:
        trace: epb.Trace = client.rpc.StartTrace(
            epb.StartTraceRequest(case_id=case_id, grant_id=grant_id),
            metadata=(("traceparent", traceparent),),
        ).trace
        return trace


def test_a_scan_batch_is_traced_through_its_group_commit(
    spans: InMemorySpanExporter, traced: Servers, db_conn: Query
) -> None:
    venue = create_venue(traced)
    device = add_device(traced, db_conn, venue)
    token = enroll(traced, "+85512001701").personal_token.token
    stream = open_stream(traced, device)
    stream.send(batch("b1", scan(1, token), scan(2, token)))
    stream.ack()
    assert stream.end() is None

    [rpc] = _named(spans, "stopcovid.checkin.v1.CheckInService/StreamScans")
    [batch_span] = _named(spans, "checkin.scan_batch")
    commits = _named(spans, "checkin.group_commit")
    assert rpc.context is not None and batch_span.context is not None
    assert batch_span.parent is not None and batch_span.parent.span_id == rpc.context.span_id
    assert batch_span.attributes == {
        "stopcovid.scans": 2,
        "stopcovid.rows": 2,
        "stopcovid.acked": True,
    }
    [commit] = [c for c in commits if any(link.context == batch_span.context for link in c.links)]
    assert commit.context is not None
    assert commit.context.trace_id == batch_span.context.trace_id
    assert commit.attributes is not None and commit.attributes["stopcovid.rows"] == 2
    # The batch's span ends with its ack, after the commit that made it durable.
    assert commit.end_time is not None and batch_span.end_time is not None
    assert commit.end_time <= batch_span.end_time


def test_a_trace_job_continues_the_trace_of_the_start_trace_call(
    spans: InMemorySpanExporter, traced: Servers, settings: Settings, db_conn: Query
) -> None:
    person = enroll(traced, "+85512001702")
    case = report_case(traced, by_id(person.person_id))
    grant = grant_access(traced, case.case_id)
    traceparent, trace_id, caller_span = _caller()
    started = _start_trace(traced, case.case_id, grant.grant_id, traceparent)
    [rpc] = _named(spans, "stopcovid.exposure.v1.ExposureService/StartTrace")
    assert rpc.context is not None and rpc.parent is not None
    assert (rpc.context.trace_id, rpc.parent.span_id) == (trace_id, caller_span)
    stored = db_conn("SELECT traceparent FROM traces WHERE trace_id = $1", started.trace_id)
    assert stored[0]["traceparent"].split("-")[1:3] == [
        f"{trace_id:032x}",
        f"{rpc.context.span_id:016x}",
    ]

    outcome = asyncio.run(_run_one_trace(settings))
    [run] = _named(spans, "exposure.trace_run")
    assert run.context is not None and run.parent is not None
    assert (run.context.trace_id, run.parent.span_id) == (trace_id, rpc.context.span_id)
    assert run.attributes is not None and run.attributes["stopcovid.outcome"] == outcome


async def _run_one_trace(settings: Settings) -> str:
    """Claim and run the waiting trace as a worker does (in this process, so the
    in-memory exporter sees its span)."""
    pool = await db.create_pool(settings, db.SERVICE_ROLES["worker"])
    try:
        keystore = open_keystore(settings.keystore_dir, settings.secrets_dir)
        runner = TraceRunner.from_settings(pool, keystore, "worker-test", settings)
        claimed = await runner.claim()
        assert claimed is not None
        ended = await runner.run(claimed)
        return ended.outcome
    finally:
        await pool.close()


def test_tracing_is_off_by_default_and_then_records_and_stores_nothing(
    servers: Servers, db_conn: Query
) -> None:
    assert Settings(state_dir=Path("."), database_url=None).tracing == ""
    assert tracing.enabled is False
    assert tracing.traceparent() is None
    person = enroll(servers, "+85512001703")
    case = report_case(servers, by_id(person.person_id))
    grant = grant_access(servers, case.case_id)
    started = _start_trace(servers, case.case_id, grant.grant_id, _caller()[0])
    stored = db_conn("SELECT traceparent FROM traces WHERE trace_id = $1", started.trace_id)
    assert stored[0]["traceparent"] is None
