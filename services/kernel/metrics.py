"""Prometheus metrics of every process: their definitions, the switch, and the
endpoint each process serves them on.

Every server and the worker pool serve `/metrics` on a port of their own
(`Settings.metrics_ports`; `STOPCOVID_METRICS=off` turns all of it off). The
definitions live here, in one place, so that the names an operator alerts on
(monitoring/alerts.yml) and the ones `stopcovid status` reads are the ones
the code updates.

Label values are bounded and never personal: an outcome, an ErrorReason or
reject reason (enums), a job, a cache, a certificate's role. Never a person,
device, venue, case or grant id.

Cost: the hot path updates these per batch or per commit, never per scan, and
reads what it can at scrape time instead (`set_function`). When metrics are off,
`enabled` is False and the hot path skips its updates altogether.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from threading import Thread
from typing import Any

import structlog
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server

log = structlog.get_logger()

enabled = True
"""Whether this process keeps and serves metrics (`configure`). Hot-path code reads
it per batch; everything else updates its metrics unconditionally (cheap)."""

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_ROWS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 20_000)
_SLOW = (0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0)

# -- CheckIn server -------------------------------------------------------------

SCANS = Counter(
    "stopcovid_checkin_scans",
    "Scans decided, by outcome and (for rejected ones) reject reason.",
    ["outcome", "reason"],
)
BATCH_SCANS = Histogram(
    "stopcovid_checkin_batch_scans", "Scans per batch a device sent.", buckets=_ROWS[:8]
)
COMMIT_SECONDS = Histogram(
    "stopcovid_checkin_group_commit_seconds",
    "Time of one group commit (one transaction), from its start to its end.",
    buckets=_LATENCY,
)
COMMIT_ROWS = Histogram(
    "stopcovid_checkin_group_commit_rows", "Rows written by one group commit.", buckets=_ROWS
)
COMMIT_FAILURES = Counter(
    "stopcovid_checkin_group_commit_failures",
    "Group commits given up (their scans were not acknowledged).",
)
COMMIT_TO_INBOX = Counter(
    "stopcovid_checkin_group_commit_to_inbox",
    "Group commits the store refused that went to the inbox instead.",
)
ACK_SECONDS = Histogram(
    "stopcovid_checkin_ack_seconds",
    "From a batch's arrival to its ack being queued for the device (decision, "
    "backpressure, group commit, and waiting for earlier batches).",
    buckets=_LATENCY,
)
INBOX_LAG_ROWS = Gauge(
    "stopcovid_checkin_inbox_lag_rows", "Inbox rows the workers have not moved yet."
)
INBOX_LAG_SECONDS = Gauge(
    "stopcovid_checkin_inbox_lag_seconds", "Age of the oldest inbox row (0 when empty)."
)
STREAM_ENDINGS = Counter(
    "stopcovid_checkin_stream_endings",
    'How StreamScans calls ended: "OK", "IDLE" (ended by the server for idleness), or the'
    " ErrorReason (or error type) they ended with.",
    ["reason"],
)
OPEN_STREAMS = Gauge("stopcovid_checkin_open_streams", "StreamScans calls open now.")
STREAM_HELD_BYTES = Gauge(
    "stopcovid_checkin_stream_held_bytes_max",
    "The most bytes one open stream holds now (batches in flight and unsent acks).",
)
STREAM_HOLDS = Counter(
    "stopcovid_checkin_stream_holds",
    "Times a stream stopped reading its device at its held-bytes bound.",
)
CACHE_ENTRIES = Gauge(
    "stopcovid_checkin_cache_entries", "Entries of each CheckIn cache.", ["cache"]
)
CACHE_RELOADED = Gauge(
    "stopcovid_checkin_cache_last_reload_timestamp_seconds",
    "When the CheckIn caches last finished a full reload (Unix time).",
)
ADMISSION_WAIT = Counter(
    "stopcovid_checkin_backpressure_wait_seconds",
    "Seconds batches were held back while the inbox lagged past its limit.",
)

# -- Exposure and Retention servers ---------------------------------------------

GRANT_REFUSALS = Counter(
    "stopcovid_grant_refusals",
    "Accesses refused for want of an active grant, by ErrorReason.",
    ["reason"],
)
AUDIT_VERIFICATIONS = Counter(
    "stopcovid_audit_chain_verifications",
    "VerifyAuditChain answers, by result (ok or broken).",
    ["result"],
)
AUDIT_VERIFIED = Gauge(
    "stopcovid_audit_chain_last_verification_timestamp_seconds",
    "When the audit chain was last verified, by result (Unix time).",
    ["result"],
)

# -- every server -----------------------------------------------------------------

CERTIFICATE_EXPIRY = Gauge(
    "stopcovid_certificate_expiry_timestamp_seconds",
    "When a certificate this process relies on expires (Unix time): its own server "
    "certificate, the root, and each issuing CA whose clients it accepts.",
    ["certificate"],
)

# -- workers ------------------------------------------------------------------------

INGEST_ROWS = Counter(
    "stopcovid_ingest_rows",
    "Inbox rows moved into the store (stored), or dropped as already stored (duplicate).",
    ["result"],
)
JOB_BATCHES = Counter(
    "stopcovid_worker_job_batches", "Batches a worker job claimed and ran.", ["worker_job"]
)
JOB_ERRORS = Counter(
    "stopcovid_worker_job_errors",
    "Batches of a worker job that failed and were backed off from, by kind "
    "(transient: the database; bug: anything else the job tolerates).",
    ["worker_job", "kind"],
)
HEARTBEAT = Gauge(
    "stopcovid_worker_heartbeat_timestamp_seconds", "When this worker last beat (Unix time)."
)
TRACES = Counter("stopcovid_traces", "Trace runs that ended, by outcome.", ["outcome"])
TRACE_SECONDS = Histogram(
    "stopcovid_trace_seconds", "Time of one trace run, by outcome.", ["outcome"], buckets=_SLOW
)
TRACES_BY_STATE = Gauge(
    "stopcovid_traces_by_state", "Traces in the database by state (read by the workers).", ["state"]
)
NOTIFICATIONS = Counter(
    "stopcovid_notifications",
    "Notification attempts by what became of them (sent, retry, failed, cancelled...) "
    'and attempt number ("1" to "5", then "6+").',
    ["state", "attempt"],
)
NOTIFICATION_LAG = Gauge(
    "stopcovid_notification_lag_seconds",
    "How long the oldest notification that is due has waited to be sent (0: none due).",
)
NOTIFICATIONS_DUE = Gauge(
    "stopcovid_notifications_due", "Queued notifications whose attempt is due now."
)
EXPIRY_RUNS = Counter("stopcovid_expiry_runs", "Scheduled expiry runs, by result.", ["result"])
EXPIRY_LAST_SUCCESS = Gauge(
    "stopcovid_expiry_last_success_timestamp_seconds",
    "When this worker's last scheduled expiry run succeeded (Unix time).",
)
KEYS_DESTROYED = Counter(
    "stopcovid_expiry_keys_destroyed", "Keys destroyed by expiry runs, by kind.", ["kind"]
)


def attempt_label(attempt: int) -> str:
    """A bounded label for an attempt number."""
    return str(attempt) if attempt <= 5 else "6+"


def scrape_function(gauge: Gauge, read: Callable[[], float], **labels: str) -> None:
    """Make `gauge` (or its child for `labels`) read `read()` at scrape time: the
    figure costs nothing between scrapes. A later call replaces an earlier one."""
    target: Any = gauge.labels(**labels) if labels else gauge
    target.set_function(read)


_OWNERS: list[tuple[frozenset[str], tuple[Any, ...]]] = [
    (
        frozenset({"checkin"}),
        (
            SCANS,
            BATCH_SCANS,
            COMMIT_SECONDS,
            COMMIT_ROWS,
            COMMIT_FAILURES,
            COMMIT_TO_INBOX,
            ACK_SECONDS,
            INBOX_LAG_ROWS,
            INBOX_LAG_SECONDS,
            STREAM_ENDINGS,
            OPEN_STREAMS,
            STREAM_HELD_BYTES,
            STREAM_HOLDS,
            CACHE_ENTRIES,
            CACHE_RELOADED,
            ADMISSION_WAIT,
        ),
    ),
    # Grants are checked by the Exposure server and by the workers' traces and outbox.
    (frozenset({"exposure", "workers"}), (GRANT_REFUSALS,)),
    (frozenset({"retention"}), (AUDIT_VERIFICATIONS, AUDIT_VERIFIED)),
    (frozenset({"checkin", "venue", "exposure", "retention"}), (CERTIFICATE_EXPIRY,)),
    (
        frozenset({"workers"}),
        (
            INGEST_ROWS,
            JOB_BATCHES,
            JOB_ERRORS,
            HEARTBEAT,
            TRACES,
            TRACE_SECONDS,
            TRACES_BY_STATE,
            NOTIFICATIONS,
            NOTIFICATION_LAG,
            NOTIFICATIONS_DUE,
            EXPIRY_RUNS,
            EXPIRY_LAST_SUCCESS,
            KEYS_DESTROYED,
        ),
    ),
]
"""Which processes export which metrics. Every metric is registered at import (a
test runs all four servers in one process); `configure` keeps a process's own, so
a worker does not export a CheckIn server's gauges at zero (which an alert on
their age would take for a server that never reloaded)."""


def configure(on: bool, process: str | None = None) -> None:
    """Turn this process's metrics on or off; with `process` (a name of
    config.PROCESSES), export only the metrics that kind of process keeps."""
    global enabled  # noqa: PLW0603 (one switch per process)
    enabled = on
    if process is None:
        return
    for owners, collectors in _OWNERS:
        if process not in owners:
            for collector in collectors:
                with contextlib.suppress(KeyError):  # already gone
                    REGISTRY.unregister(collector)


def serve(host: str, port: int, process: str) -> int | None:
    """Serve /metrics on `host:port` (0: any free port) in a thread of its own, and
    return the port bound (None when metrics are off). The port is also written to
    STOPCOVID_METRICS_PORT_FILE when set, so a supervisor that asked for 0 learns it."""
    if not enabled:
        return None
    try:
        server, thread = start_http_server(port, addr=host, registry=REGISTRY)
    except OSError as exc:
        # Like a taken gRPC port: the process stops and says which setting to change.
        raise SystemExit(
            f"cannot serve metrics on {host}:{port} ({exc.strerror or exc}); set "
            f"STOPCOVID_{process.upper()}_METRICS_PORT (0: any free port) or STOPCOVID_METRICS=off"
        ) from None
    bound = int(server.server_address[1])
    _keep[process] = (server, thread)
    port_file = os.environ.get("STOPCOVID_METRICS_PORT_FILE")
    if port_file:
        partial = Path(port_file + ".partial")
        partial.write_text(str(bound))
        partial.replace(port_file)
    log.info("metrics_serving", process=process, host=host, port=bound)
    return bound


_keep: dict[str, tuple[Any, Thread]] = {}
