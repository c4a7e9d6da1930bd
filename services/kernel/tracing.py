"""OpenTelemetry traces, on when configured (`STOPCOVID_TRACING`), off by default.

What is traced: every RPC of the servers (grpc_tracing.py, joining the caller's
trace from its `traceparent` metadata), each scan batch of a stream and the group
commit that writes it (the commit's span is in the first batch's trace and links
every batch it carries: one commit serves many), and a trace job's run in the
workers, which continues the trace of the StartTrace call that queued it (the
context travels in the traces row, migration 0012).

Off, `enabled` is False: no interceptor is installed and the hot path's only cost
is reading that flag once per batch. Spans carry counts, outcomes and status codes,
never a person, device, venue or case id.

`STOPCOVID_TRACING=console` prints spans; `package.module:callable` is called with
no arguments and returns the SpanExporter (an OTLP exporter, say, from a package the
deployment adds). Tests install the SDK's in-memory exporter with `install`.
"""

from __future__ import annotations

import atexit
import importlib
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

enabled = False
"""Whether this process records spans (`configure`, `install`)."""

_PROPAGATOR = TraceContextTextMapPropagator()
_provider: TracerProvider | None = None
_tracer: trace.Tracer = trace.NoOpTracer()


def exporter_of(spec: str) -> SpanExporter:
    """The exporter `STOPCOVID_TRACING` names (see the module docstring)."""
    if spec == "console":
        return ConsoleSpanExporter()
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise SystemExit(
            "configuration error: STOPCOVID_TRACING must be empty, console, or "
            f"package.module:callable, got {spec!r}"
        )
    made: SpanExporter = getattr(importlib.import_module(module), name)()
    return made


def configure(spec: str, process: str) -> None:
    """Turn tracing on in this process when `spec` names an exporter; spans are
    exported in batches, and the last ones flushed at exit."""
    if not spec:
        return
    provider = install(exporter_of(spec), process)
    atexit.register(provider.shutdown)


def install(exporter: SpanExporter, process: str, *, batch: bool = True) -> TracerProvider:
    """Record spans of this process into `exporter` (`batch=False`: each at its end,
    as tests want). The provider is this module's own, not OpenTelemetry's global
    one, so a test can install and remove it."""
    global _provider, _tracer, enabled
    provider = TracerProvider(resource=Resource.create({"service.name": f"stopcovid-{process}"}))
    provider.add_span_processor(
        BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
    )
    _provider, _tracer, enabled = provider, provider.get_tracer("stopcovid"), True
    return provider


def uninstall() -> None:
    """Turn tracing off again (tests)."""
    global _provider, _tracer, enabled
    if _provider is not None:
        _provider.shutdown()
    _provider, _tracer, enabled = None, trace.NoOpTracer(), False


def tracer() -> trace.Tracer:
    return _tracer


def traceparent() -> str | None:
    """The W3C `traceparent` of the current span, to carry it elsewhere."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get("traceparent")


def context_of(traceparent: str | None) -> otel_context.Context:
    """The context to continue from a carried `traceparent` (an empty one: a new trace)."""
    if not traceparent:
        return otel_context.Context()
    return _PROPAGATOR.extract({"traceparent": traceparent})


def from_metadata(metadata: Any) -> otel_context.Context:
    """The caller's context from gRPC invocation metadata (its `traceparent`, if any)."""
    carrier = {key: value for key, value in metadata or () if isinstance(value, str)}
    return _PROPAGATOR.extract(carrier)
