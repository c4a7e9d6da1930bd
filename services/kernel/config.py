"""Configuration from the environment, with documented defaults.

Every process reads the same variables; each setting below names its variable.
Nothing here is secret except what the files under `state_dir` hold.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TypeVar

SERVICES = ("checkin", "venue", "exposure", "retention")

DEFAULT_PORTS = {"checkin": 50051, "venue": 50052, "exposure": 50053, "retention": 50054}
KEYSTORE_BACKENDS = ("file", "pkcs11")

PROCESSES = (*SERVICES, "workers")
"""Every kind of process, each with a metrics port of its own."""

DEFAULT_METRICS_PORTS = {
    "checkin": 9451,
    "venue": 9452,
    "exposure": 9453,
    "retention": 9454,
    "workers": 9450,
}


_READ = "read"
"""The field metadata key of a setting's reader: how `Settings.from_env` gets its value."""

_T = TypeVar("_T")
_N = TypeVar("_N", int, float)


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _env_number(name: str, default: _N) -> _N:
    """A numeric setting, parsed as the default's type; a bad value stops the process."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return type(default)(raw)
    except ValueError:
        kind = "an integer" if isinstance(default, int) else "a number"
        raise SystemExit(f"configuration error: {name} must be {kind}, got {raw!r}") from None


def _env_path(name: str) -> Path | None:
    raw = os.environ.get(name)
    return Path(raw).resolve() if raw else None


def _setting(read: Callable[[], _T], default: _T) -> _T:
    """A field whose value `from_env` takes from `read()`; `default` when built directly."""
    return field(default=default, metadata={_READ: read})


def _number(name: str, default: _N) -> _N:
    """The variable `name`, an int or a float as `default` is (unset or empty: `default`)."""
    return _setting(lambda: _env_number(name, default), default)


def _text(name: str, default: str, *, strip: bool = False, lower: bool = False) -> str:
    """The variable `name` as text (unset: `default`), stripped and lowercased if asked."""

    def read() -> str:
        value = _env(name, default)
        value = value.strip() if strip else value
        return value.lower() if lower else value

    return _setting(read, default)


def _path(name: str) -> Path | None:
    """The variable `name` as an absolute path (unset or empty: None, the built-in place)."""
    return _setting(lambda: _env_path(name), None)


def _read_state_dir() -> Path:
    return Path(_env("STOPCOVID_STATE_DIR", ".stopcovid")).resolve()


def _read_database_url() -> str | None:
    url = os.environ.get("STOPCOVID_DATABASE_URL") or None
    if url is None and any(os.environ.get(v) for v in ("PGHOST", "PGPORT", "PGSERVICE")):
        # asyncpg completes an empty DSN from the libpq PG* variables.
        url = "postgresql://"
    return url


def _read_ports(variable: str, defaults: dict[str, int]) -> Callable[[], dict[str, int]]:
    """One port per name, each from STOPCOVID_<NAME>_<variable>."""
    return lambda: {
        name: _env_number(f"STOPCOVID_{name.upper()}_{variable}", default)
        for name, default in defaults.items()
    }


def _read_metrics() -> bool:
    metrics = _env("STOPCOVID_METRICS", "on").strip().lower()
    if metrics not in ("on", "off"):
        raise SystemExit(
            f"configuration error: STOPCOVID_METRICS must be on or off, got {metrics!r}"
        )
    return metrics == "on"


def _names(name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """The variable `name` as a comma-separated list (unset: `default`)."""

    def read() -> tuple[str, ...]:
        items = _env(name, ",".join(default)).split(",")
        return tuple(item.strip() for item in items if item.strip())

    return _setting(read, default)


_TlsFiles = tuple[Path | None, Path | None, Path | None]
_NO_TLS_FILES: _TlsFiles = (None, None, None)


def _read_tls_files() -> _TlsFiles:
    return (
        _env_path("STOPCOVID_TLS_CA"),
        _env_path("STOPCOVID_TLS_CERT"),
        _env_path("STOPCOVID_TLS_KEY"),
    )


@dataclass(frozen=True)
class Settings:
    """Process settings. Build with `Settings.from_env()`.

    Each field names its variable and default once, in its reader (`_number`, `_text`,
    `_names`, `_path`, or a `_read_*` function); `from_env` calls every field's reader.
    A new setting is one field here, its docstring, and a row in the README's table.
    """

    state_dir: Path = field(metadata={_READ: _read_state_dir})
    """STOPCOVID_STATE_DIR (default `./.stopcovid`): PKI, secrets and the embedded
    Postgres cluster live here, readable by the owner only."""

    database_url: str | None = field(metadata={_READ: _read_database_url})
    """STOPCOVID_DATABASE_URL, or libpq PGHOST/PGPORT/... when set: the cluster to use.
    Unset: the embedded cluster in `state_dir/pg` is used."""

    admin_database_url: str | None = _setting(
        lambda: os.environ.get("STOPCOVID_ADMIN_DATABASE_URL") or None, None
    )
    """STOPCOVID_ADMIN_DATABASE_URL: a role with CREATEROLE and CREATEDB, used by `up` and
    `migrate` to create the roles and the database. Unset: `up` uses `database_url`
    (or the embedded superuser), `migrate` only applies migrations."""

    database_name: str = _text("STOPCOVID_DATABASE_NAME", "stopcovid")
    """STOPCOVID_DATABASE_NAME (default `stopcovid`): the database in that cluster."""

    bind_host: str = _text("STOPCOVID_BIND_HOST", "127.0.0.1")
    """STOPCOVID_BIND_HOST (default `127.0.0.1`): address the gRPC servers listen on."""

    ports: dict[str, int] = field(
        default_factory=lambda: dict(DEFAULT_PORTS),
        metadata={_READ: _read_ports("PORT", DEFAULT_PORTS)},
    )
    """STOPCOVID_<SERVICE>_PORT (defaults checkin 50051, venue 50052, exposure 50053,
    retention 50054). 0 picks a free port (tests)."""

    metrics: bool = _setting(_read_metrics, True)
    """STOPCOVID_METRICS (default `on`; `off`): whether each process keeps Prometheus
    metrics and serves them (services/kernel/metrics.py)."""

    metrics_ports: dict[str, int] = field(
        default_factory=lambda: dict(DEFAULT_METRICS_PORTS),
        metadata={_READ: _read_ports("METRICS_PORT", DEFAULT_METRICS_PORTS)},
    )
    """STOPCOVID_<PROCESS>_METRICS_PORT (defaults workers 9450, checkin 9451, venue 9452,
    exposure 9453, retention 9454): where each process serves /metrics, on
    `metrics_host`. 0 picks a free port; a second worker process on one host needs
    one of its own."""

    metrics_host: str = _text("STOPCOVID_METRICS_HOST", "127.0.0.1")
    """STOPCOVID_METRICS_HOST (default `127.0.0.1`): the address /metrics is served on
    (plain HTTP: expose it only to the monitoring network)."""

    tracing: str = _text("STOPCOVID_TRACING", "", strip=True)
    """STOPCOVID_TRACING (default empty: off): OpenTelemetry spans of RPCs, scan batches,
    group commits and worker jobs. `console` prints them; `package.module:callable` is
    called with no arguments and returns the SpanExporter to use (an OTLP exporter, say:
    services/kernel/tracing.py). Off, the hot path does no tracing work at all."""

    server_hosts: tuple[str, ...] = _names("STOPCOVID_SERVER_HOSTS", ("localhost", "127.0.0.1"))
    """STOPCOVID_SERVER_HOSTS (comma separated, default `localhost,127.0.0.1`): names
    the server certificate is valid for."""

    grace_seconds: float = _number("STOPCOVID_GRACE_SECONDS", 10.0)
    """STOPCOVID_GRACE_SECONDS (default 10): how long in-flight RPCs may finish at shutdown."""

    db_pool_min: int = _number("STOPCOVID_DB_POOL_MIN", 1)
    """STOPCOVID_DB_POOL_MIN (default 1): connections each process keeps open."""

    db_pool_max: int = _number("STOPCOVID_DB_POOL_MAX", 10)
    """STOPCOVID_DB_POOL_MAX (default 10): connections each process may open."""

    log_level: str = _text("STOPCOVID_LOG_LEVEL", "info", lower=True)
    """STOPCOVID_LOG_LEVEL (default `info`): debug, info, warning or error."""

    log_format: str = _text("STOPCOVID_LOG_FORMAT", "auto", lower=True)
    """STOPCOVID_LOG_FORMAT (default `auto`): `json`, `console`, or `auto` (console on a
    terminal, JSON otherwise)."""

    max_message_bytes: int = _number("STOPCOVID_MAX_MESSAGE_BYTES", 4 * 1024 * 1024)
    """STOPCOVID_MAX_MESSAGE_BYTES (default 4 MiB): larger requests are refused."""

    tls_files: _TlsFiles = _setting(_read_tls_files, _NO_TLS_FILES)
    """STOPCOVID_TLS_CA, STOPCOVID_TLS_CERT, STOPCOVID_TLS_KEY: the platform's root CA
    certificate (what every certificate must chain to), and the server's certificate
    chain and key. Unset: the files in `state_dir/pki` (ca.pem, server.pem,
    server.key). See docs/pki.md."""

    tls_issuers_file: Path | None = _path("STOPCOVID_TLS_ISSUERS")
    """STOPCOVID_TLS_ISSUERS (default `state_dir/pki/issuers.pem`): the certificates of
    the issuing CAs whose client certificates the servers accept (devices and staff;
    during a rotation, old and new). A client certificate from any other CA under the
    root is refused (UNAUTHENTICATED, CERTIFICATE_CHAIN_INVALID)."""

    pki_ca_override: Path | None = _path("STOPCOVID_PKI_CA_DIR")
    """STOPCOVID_PKI_CA_DIR (default `state_dir/pki-ca`): where `stopcovid certs` finds
    the staff and servers issuing CAs' keys and its record of the certificates they
    issued. Only the PKI operators' machine has it; no server reads it."""

    keystore_override: Path | None = _path("STOPCOVID_KEYSTORE_DIR")
    """STOPCOVID_KEYSTORE_DIR (default `state_dir/keys`): the key store, outside the
    database (see services/kernel/keys.py). The KEK comes from STOPCOVID_KEK (base64)
    or the file STOPCOVID_KEK_FILE (default `state_dir/secrets/kek`)."""

    keystore_backend: str = _text("STOPCOVID_KEYSTORE", "file", strip=True, lower=True)
    """STOPCOVID_KEYSTORE (default `file`): `file` keeps the keys in the key-store
    directory under a KEK from the environment or a file (one machine, or hosts that
    share the directory); `pkcs11` keeps them in Postgres, wrapped by keys in an HSM
    that never leave it, so every host reaches them (services/kernel/hsm.py,
    docs/production.md)."""

    pkcs11_module: Path | None = _path("STOPCOVID_PKCS11_MODULE")
    """STOPCOVID_PKCS11_MODULE: the HSM vendor's PKCS#11 library (SoftHSM2's
    libsofthsm2.so in tests). Only with STOPCOVID_KEYSTORE=pkcs11."""

    pkcs11_token: str = _text("STOPCOVID_PKCS11_TOKEN", "", strip=True)
    """STOPCOVID_PKCS11_TOKEN: the label of the token that holds the wrapping keys.
    The user PIN comes from STOPCOVID_PKCS11_PIN or the file
    STOPCOVID_PKCS11_PIN_FILE, never from these settings."""

    pkcs11_pin_file: Path | None = _path("STOPCOVID_PKCS11_PIN_FILE")
    """STOPCOVID_PKCS11_PIN_FILE: a file holding the token's user PIN."""

    commit_interval_ms: float = _number("STOPCOVID_COMMIT_INTERVAL_MS", 5.0)
    """STOPCOVID_COMMIT_INTERVAL_MS (default 5): the longest a scan waits for its group
    commit once the CheckIn server has it."""

    commit_max_rows: int = _number("STOPCOVID_COMMIT_MAX_ROWS", 5000)
    """STOPCOVID_COMMIT_MAX_ROWS (default 5000): a group commit starts at once when this
    many scans wait. 1 makes every scan its own commit (the naive design)."""

    max_scans_per_batch: int = _number("STOPCOVID_MAX_SCANS_PER_BATCH", 1000)
    """STOPCOVID_MAX_SCANS_PER_BATCH (default 1000): the largest batch a device may send."""

    max_in_flight_batches: int = _number("STOPCOVID_MAX_IN_FLIGHT_BATCHES", 8)
    """STOPCOVID_MAX_IN_FLIGHT_BATCHES (default 8): unacknowledged batches per stream."""

    stream_write_timeout_s: float = _number("STOPCOVID_STREAM_WRITE_TIMEOUT_S", 30.0)
    """STOPCOVID_STREAM_WRITE_TIMEOUT_S (default 30): how long the CheckIn server waits
    for a device to take an ack off the wire before it ends the stream with
    RESOURCE_EXHAUSTED (SLOW_READER). A device that sends but does not read would
    otherwise hold its window's acks in the server's memory for as long as it likes."""

    stream_buffer_bytes: int = _number("STOPCOVID_STREAM_BUFFER_BYTES", 512 * 1024)
    """STOPCOVID_STREAM_BUFFER_BYTES (default 524288): the most ack bytes a CheckIn
    stream may hold unsent; a device past it has stopped reading and is ended with
    RESOURCE_EXHAUSTED (SLOW_READER) at once, so a slow reader is bounded in memory
    as well as in time."""

    stream_held_bytes: int = _number("STOPCOVID_STREAM_HELD_BYTES", 32 * 1024)
    """STOPCOVID_STREAM_HELD_BYTES (default 32768): the most bytes a CheckIn stream
    holds for its device: the batches it is deciding and committing (as received)
    plus the acks the device has not taken yet. At the bound the server reads the
    device's next batch only once an ack went out, so HTTP/2 flow control holds the
    device back (a device that does not read its acks waits until the write timeout
    ends it); nothing is dropped and nothing acknowledged is lost. A stream holding
    nothing always takes its next batch, however large."""

    stream_idle_s: float = _number("STOPCOVID_STREAM_IDLE_S", 120.0)
    """STOPCOVID_STREAM_IDLE_S (default 120; 0: never): how long a CheckIn stream may
    hold nothing (no batch in flight, no ack unsent) and receive nothing before the
    server ends it, with status OK and the trailer `stopcovid-stream-end: idle`. The
    connection stays open (until STOPCOVID_GRPC_MAX_CONNECTION_IDLE_S without a
    call); the device SDK opens its next stream on it when it has scans to send. A
    quiet venue then costs the server a connection rather than a connection and a
    stream. Older SDKs reopen at once, so a lower value costs reopenings."""

    grpc_max_streams_per_connection: int = _number("STOPCOVID_GRPC_MAX_STREAMS_PER_CONNECTION", 100)
    """STOPCOVID_GRPC_MAX_STREAMS_PER_CONNECTION (default 100): concurrent calls one
    connection may have open (HTTP/2 MAX_CONCURRENT_STREAMS); more wait."""

    grpc_stream_window_bytes: int = _number("STOPCOVID_GRPC_STREAM_WINDOW_BYTES", 64 * 1024)
    """STOPCOVID_GRPC_STREAM_WINDOW_BYTES (default 65536): the HTTP/2 window each call
    of every server grants its caller (BDP probing off): what a caller may send
    before the handler reads it. A CheckIn stream that stops reading at its held
    bytes holds the device back at this many more; uploads are paced by it (a
    window per round trip), downloads not."""

    grpc_max_concurrent_rpcs: int = _number("STOPCOVID_GRPC_MAX_CONCURRENT_RPCS", 20000)
    """STOPCOVID_GRPC_MAX_CONCURRENT_RPCS (default 20000): calls one server process
    runs at once, over all connections; beyond it a call is refused with
    RESOURCE_EXHAUSTED before any handler runs."""

    grpc_max_connections: int = _number("STOPCOVID_GRPC_MAX_CONNECTIONS", 20000)
    """STOPCOVID_GRPC_MAX_CONNECTIONS (default 20000): connections one server process
    holds at once, open or still in their TLS handshake. One more is closed as soon
    as it is accepted, before its handshake costs anything: the caller sees
    UNAVAILABLE and comes back after its backoff, so a flood of connections cannot
    take the process's memory or file descriptors (an idle device connection costs
    a CheckIn server about 115 KB, `./dev bench connections`: 20,000 are about
    2.3 GB). The process's `ulimit -n` must be above it."""

    grpc_max_connection_idle_s: float = _number("STOPCOVID_GRPC_MAX_CONNECTION_IDLE_S", 300.0)
    """STOPCOVID_GRPC_MAX_CONNECTION_IDLE_S (default 300): a connection without any
    call this long is closed (GOAWAY); a client reconnects when it needs to."""

    grpc_max_connection_age_s: float = _number("STOPCOVID_GRPC_MAX_CONNECTION_AGE_S", 600.0)
    """STOPCOVID_GRPC_MAX_CONNECTION_AGE_S (default 600, with 10 % jitter from gRPC; 0:
    never): a connection this old is asked to go away (HTTP/2 GOAWAY), so long-lived
    device streams spread over a CheckIn server that joined since (clients balance
    round robin over several addresses); its calls get
    STOPCOVID_GRPC_MAX_CONNECTION_AGE_GRACE_S (default 30) to finish, after which a
    stream ends UNAVAILABLE and the device reconnects and resends what was not acked."""

    grpc_max_connection_age_grace_s: float = _number(
        "STOPCOVID_GRPC_MAX_CONNECTION_AGE_GRACE_S", 30.0
    )
    """See grpc_max_connection_age_s."""

    grpc_keepalive_s: float = _number("STOPCOVID_GRPC_KEEPALIVE_S", 60.0)
    """STOPCOVID_GRPC_KEEPALIVE_S (default 60): the server pings a connection quiet
    this long and closes it when no answer comes within 20 s, so a device that
    vanished (power, network) does not hold its stream and memory for ever. Clients
    may ping at most every 10 s; a client pinging faster is disconnected."""

    max_scan_age_s: float = _number("STOPCOVID_MAX_SCAN_AGE_S", 3 * 86400.0)
    """STOPCOVID_MAX_SCAN_AGE_S (default 259200, 3 days; at most 7 days): older scans are
    rejected. Kept well below the shortest retention (28 days)."""

    max_clock_skew_s: float = _number("STOPCOVID_MAX_CLOCK_SKEW_S", 300.0)
    """STOPCOVID_MAX_CLOCK_SKEW_S (default 300): scans this far ahead are rejected."""

    token_window_s: int = _number("STOPCOVID_TOKEN_WINDOW_S", 60)
    """STOPCOVID_TOKEN_WINDOW_S (default 60): the time window of rotating tokens."""

    rotating_token_offline_s: float = _number("STOPCOVID_ROTATING_TOKEN_OFFLINE_S", 3600.0)
    """STOPCOVID_ROTATING_TOKEN_OFFLINE_S (default 3600; at most the max scan age): how long
    after a rotating token's window ended a scan of it may still reach the server, for
    scans a device buffered while offline. Judged by the server's clock at receipt, so a
    photographed phone code cannot be replayed later by back-dating the scan. Static
    cards are not affected."""

    enrollment_code_ttl_s: float = _number("STOPCOVID_ENROLLMENT_CODE_TTL_S", 600.0)
    """STOPCOVID_ENROLLMENT_CODE_TTL_S (default 600; 60 to 3600): how long the one-time
    code EnrollPerson sends to a number works (services/checkin/enrollment.py)."""

    enrollment_code_attempts: int = _number("STOPCOVID_ENROLLMENT_CODE_ATTEMPTS", 5)
    """STOPCOVID_ENROLLMENT_CODE_ATTEMPTS (default 5; 1 to 10): wrong codes after which a
    challenge is dead (VERIFICATION_FAILED from then on, even for the right code)."""

    enrollment_codes_per_number: int = _number("STOPCOVID_ENROLLMENT_CODES_PER_NUMBER", 3)
    """STOPCOVID_ENROLLMENT_CODES_PER_NUMBER (default 3): codes an organisation may have
    outstanding (neither used nor expired) for one number; one more is RESOURCE_EXHAUSTED
    (VERIFICATION_LIMIT). With the TTL, it bounds the SMS a front-end can make a number
    receive and the codes it can guess at (attempts x this, per TTL)."""

    enrollment_codes_per_organization: int = _number(
        "STOPCOVID_ENROLLMENT_CODES_PER_ORGANIZATION", 2000
    )
    """STOPCOVID_ENROLLMENT_CODES_PER_ORGANIZATION (default 2000): codes an organisation may
    have outstanding in all; one more is RESOURCE_EXHAUSTED (VERIFICATION_LIMIT). Bounds
    what one careless or compromised front-end can make the gateway send."""

    inbox_lag_limit: int = _number("STOPCOVID_INBOX_LAG_LIMIT", 200_000)
    """STOPCOVID_INBOX_LAG_LIMIT (default 200000): inbox rows not yet moved by the workers
    above which the CheckIn servers slow their acks (backpressure)."""

    cache_refresh_s: float = _number("STOPCOVID_CACHE_REFRESH_S", 60.0)
    """STOPCOVID_CACHE_REFRESH_S (default 60): full reload of the CheckIn servers' risk,
    device and venue caches, and of every server's list of revoked certificates, on
    top of LISTEN/NOTIFY (which covers changes within a second)."""

    ingest_batch_rows: int = _number("STOPCOVID_INGEST_BATCH_ROWS", 20_000)
    """STOPCOVID_INGEST_BATCH_ROWS (default 20000): inbox rows a worker moves per transaction."""

    ingest_workers: int = _number("STOPCOVID_INGEST_WORKERS", 2)
    """STOPCOVID_INGEST_WORKERS (default 2): ingest tasks per worker process."""

    # -- traces: risk rules (services/domain/exposure/tracing.py) ---------------------------

    risk_high_overlap_min: int = _number("STOPCOVID_RISK_HIGH_OVERLAP_MIN", 15)
    """STOPCOVID_RISK_HIGH_OVERLAP_MIN (default 15): an indoor overlap this long or longer
    with a case is HIGH (denied entry); shorter indoor is MEDIUM; outdoors, this long is
    MEDIUM and shorter LOW."""

    risk_after_case_min: int = _number("STOPCOVID_RISK_AFTER_CASE_MIN", 30)
    """STOPCOVID_RISK_AFTER_CASE_MIN (default 30): arriving indoors within this many
    minutes after a case left is LOW."""

    trace_max_stay_h: float = _number("STOPCOVID_TRACE_MAX_STAY_H", 12.0)
    """STOPCOVID_TRACE_MAX_STAY_H (default 12): an exit scan ends a stay only if it is at
    most this many hours after the entry; otherwise the venue's default stay applies."""

    # -- exposure: cases, access grants, risk levels ---------------------------

    infectious_days_before: int = _number("STOPCOVID_INFECTIOUS_DAYS_BEFORE", 2)
    """STOPCOVID_INFECTIOUS_DAYS_BEFORE (default 2, 0 to 14): a case's infectious window
    starts at 00:00 Cambodia time this many days before symptom onset (or before the
    test date when onset is unknown) and ends at the report."""

    grant_default_hours: float = _number("STOPCOVID_GRANT_DEFAULT_HOURS", 72.0)
    """STOPCOVID_GRANT_DEFAULT_HOURS (default 72): how long an access grant lasts when the
    approver gives no grant_duration."""

    grant_max_hours: float = _number("STOPCOVID_GRANT_MAX_HOURS", 168.0)
    """STOPCOVID_GRANT_MAX_HOURS (default 168, one week): the longest grant_duration an
    approver may give; longer is refused (INVALID_ARGUMENT)."""

    risk_expiry_days: float = _number("STOPCOVID_RISK_EXPIRY_DAYS", 14.0)
    """STOPCOVID_RISK_EXPIRY_DAYS (default 14): a risk status falls back to none this long
    after its exposure (a contact's overlap, or a case's infectious window start)."""

    # -- notifications/traces: the worker jobs (domain/exposure/trace_job.py, outbox.py) --

    notify_sender: str = _text("STOPCOVID_NOTIFY_SENDER", "file", strip=True)
    """STOPCOVID_NOTIFY_SENDER (default `file`): how notifications leave the platform:
    `file` appends one JSON line per message to `notify_file`; `http` POSTs each to
    `notify_http_url` (an SMS gateway); `package.module:callable` is a custom sender,
    `callable(settings)` returning an object with `async send(notification_id, phone,
    text)` (services/kernel/senders.py)."""

    notify_file_override: Path | None = _path("STOPCOVID_NOTIFY_FILE")
    """STOPCOVID_NOTIFY_FILE (default `state_dir/notifications.jsonl`): the file sender's
    output, readable by the owner only. It holds phone numbers: it is the delivery."""

    notify_http_url: str = _text("STOPCOVID_NOTIFY_HTTP_URL", "", strip=True)
    """STOPCOVID_NOTIFY_HTTP_URL: the SMS gateway the `http` sender POSTs to, with the
    header Idempotency-Key set to the notification id (the gateway must dedupe on it)."""

    notify_http_timeout_s: float = _number("STOPCOVID_NOTIFY_HTTP_TIMEOUT_S", 10.0)
    """STOPCOVID_NOTIFY_HTTP_TIMEOUT_S (default 10): an HTTP send that takes longer is
    retried later (with the same Idempotency-Key)."""

    notify_max_attempts: int = _number("STOPCOVID_NOTIFY_MAX_ATTEMPTS", 8)
    """STOPCOVID_NOTIFY_MAX_ATTEMPTS (default 8): delivery attempts before a notification
    is given up (state failed)."""

    notify_backoff_base_s: float = _number("STOPCOVID_NOTIFY_BACKOFF_BASE_S", 30.0)
    """STOPCOVID_NOTIFY_BACKOFF_BASE_S (default 30): the wait after a first failed attempt;
    it doubles with each further one (with jitter) up to `notify_backoff_cap_s`."""

    notify_backoff_cap_s: float = _number("STOPCOVID_NOTIFY_BACKOFF_CAP_S", 3600.0)
    """STOPCOVID_NOTIFY_BACKOFF_CAP_S (default 3600): the longest wait between attempts."""

    notify_lease_s: float = _number("STOPCOVID_NOTIFY_LEASE_S", 120.0)
    """STOPCOVID_NOTIFY_LEASE_S (default 120): a claimed notification is not claimed again
    for this long, so a worker that dies mid-send leaves it to another after the lease.
    Must exceed the HTTP timeout; the sender's idempotency makes the resend harmless."""

    notify_batch: int = _number("STOPCOVID_NOTIFY_BATCH", 100)
    """STOPCOVID_NOTIFY_BATCH (default 100): notifications claimed per transaction."""

    sms_max_segments: int = _number("STOPCOVID_SMS_MAX_SEGMENTS", 4)
    """STOPCOVID_SMS_MAX_SEGMENTS (default 4): the most SMS segments a notification may
    take (Khmer is UCS-2, 67 characters a segment); longer venue names are shortened
    to fit. A value some message cannot meet even without its venue name (Khmer
    needs 3) stops the workers at start-up."""

    trace_lease_s: float = _number("STOPCOVID_TRACE_LEASE_S", 300.0)
    """STOPCOVID_TRACE_LEASE_S (default 300): a running trace whose worker has not
    reported progress for this long (it died) is claimed again and re-run."""

    trace_max_attempts: int = _number("STOPCOVID_TRACE_MAX_ATTEMPTS", 3)
    """STOPCOVID_TRACE_MAX_ATTEMPTS (default 3): runs of one trace (each after a worker
    died or the database failed mid-way) before it is marked failed."""

    # -- grievances (services/retention/grievances.py) -----------------------------

    grievance_due_days_committee: float = _number("STOPCOVID_GRIEVANCE_DUE_DAYS_COMMITTEE", 30.0)
    """STOPCOVID_GRIEVANCE_DUE_DAYS_COMMITTEE (default 30): days the Committee has to
    resolve a grievance routed to it (misuse of data, denied entry without an appeal)."""

    grievance_due_days_mptc: float = _number("STOPCOVID_GRIEVANCE_DUE_DAYS_MPTC", 30.0)
    """STOPCOVID_GRIEVANCE_DUE_DAYS_MPTC (default 30): days the MPTC has to resolve a
    grievance routed to it (wrong data, other)."""

    grievance_due_days_regulator: float = _number("STOPCOVID_GRIEVANCE_DUE_DAYS_REGULATOR", 45.0)
    """STOPCOVID_GRIEVANCE_DUE_DAYS_REGULATOR (default 45): days the regulator has to
    resolve a grievance routed to it (privacy)."""

    grievance_appeal_due_days: float = _number("STOPCOVID_GRIEVANCE_APPEAL_DUE_DAYS", 3.0)
    """STOPCOVID_GRIEVANCE_APPEAL_DUE_DAYS (default 3): days to resolve an appeal against
    a denied entry, shorter because the person is excluded meanwhile. Fractions are
    allowed (0.5 is twelve hours)."""

    # -- retention: scheduled expiry (domain/retention/expiry_run.py, workers/expiry_schedule.py)

    expiry_interval_s: float = _number("STOPCOVID_EXPIRY_INTERVAL_S", 3600.0)
    """STOPCOVID_EXPIRY_INTERVAL_S (default 3600): how often each worker process runs
    expiry (policies, partitions, keys: see services/domain/retention/expiry_run.py); the
    first run is `expiry_first_delay_s` after start. 0 turns scheduled expiry off in this process
    (RunExpiry still works). Runs are serialized cluster-wide, so many workers are safe."""

    expiry_first_delay_s: float = _number("STOPCOVID_EXPIRY_FIRST_DELAY_S", 60.0)
    """STOPCOVID_EXPIRY_FIRST_DELAY_S (default 60): the wait before a worker's first
    scheduled expiry run, so a restarting pool does not run expiry at once every time."""

    def __post_init__(self) -> None:
        # A scan may be accepted only while its day still exists: the shortest
        # retention is 28 days, and a day's key must never be needed after expiry.
        if not 0 < self.max_scan_age_s <= 7 * 86400:
            raise SystemExit(
                "configuration error: STOPCOVID_MAX_SCAN_AGE_S must be between 1 and 604800 "
                "(7 days)"
            )
        if not 0 <= self.rotating_token_offline_s <= self.max_scan_age_s:
            raise SystemExit(
                "configuration error: STOPCOVID_ROTATING_TOKEN_OFFLINE_S must be between 0 and "
                "STOPCOVID_MAX_SCAN_AGE_S"
            )
        if not 0 <= self.infectious_days_before <= 14:
            raise SystemExit(
                "configuration error: STOPCOVID_INFECTIOUS_DAYS_BEFORE must be between 0 and 14"
            )
        if not 0 < self.grant_default_hours <= self.grant_max_hours:
            raise SystemExit(
                "configuration error: STOPCOVID_GRANT_DEFAULT_HOURS must be above 0 and at "
                "most STOPCOVID_GRANT_MAX_HOURS"
            )
        if self.risk_expiry_days <= 0:
            raise SystemExit("configuration error: STOPCOVID_RISK_EXPIRY_DAYS must be above 0")
        if (
            min(
                self.grievance_due_days_committee,
                self.grievance_due_days_mptc,
                self.grievance_due_days_regulator,
                self.grievance_appeal_due_days,
            )
            <= 0
        ):
            raise SystemExit("configuration error: STOPCOVID_GRIEVANCE_*_DAYS must be above 0")
        if not 60 <= self.enrollment_code_ttl_s <= 3600:
            raise SystemExit(
                "configuration error: STOPCOVID_ENROLLMENT_CODE_TTL_S must be 60 to 3600"
            )
        if not 1 <= self.enrollment_code_attempts <= 10:
            raise SystemExit(
                "configuration error: STOPCOVID_ENROLLMENT_CODE_ATTEMPTS must be 1 to 10"
            )
        if self.enrollment_codes_per_number < 1 or self.enrollment_codes_per_organization < 1:
            raise SystemExit(
                "configuration error: STOPCOVID_ENROLLMENT_CODES_PER_NUMBER and "
                "STOPCOVID_ENROLLMENT_CODES_PER_ORGANIZATION must be at least 1"
            )
        if self.expiry_interval_s < 0 or self.expiry_first_delay_s < 0:
            raise SystemExit(
                "configuration error: STOPCOVID_EXPIRY_INTERVAL_S and "
                "STOPCOVID_EXPIRY_FIRST_DELAY_S must not be negative"
            )
        if self.keystore_backend not in KEYSTORE_BACKENDS:
            raise SystemExit(
                f"configuration error: STOPCOVID_KEYSTORE must be one of "
                f"{', '.join(KEYSTORE_BACKENDS)}"
            )
        if self.grpc_max_connections < 1:
            raise SystemExit(
                "configuration error: STOPCOVID_GRPC_MAX_CONNECTIONS must be at least 1"
            )
        if self.stream_idle_s < 0:
            raise SystemExit("configuration error: STOPCOVID_STREAM_IDLE_S must not be negative")
        if self.stream_held_bytes < 1 or self.grpc_stream_window_bytes < 1024:
            raise SystemExit(
                "configuration error: STOPCOVID_STREAM_HELD_BYTES must be above 0 and"
                " STOPCOVID_GRPC_STREAM_WINDOW_BYTES at least 1024"
            )
        if self.max_scans_per_batch < 1 or self.max_in_flight_batches < 1:
            raise SystemExit(
                "configuration error: STOPCOVID_MAX_SCANS_PER_BATCH and "
                "STOPCOVID_MAX_IN_FLIGHT_BATCHES must be at least 1"
            )

    @property
    def keystore_dir(self) -> Path:
        return self.keystore_override or self.state_dir / "keys"

    @property
    def notify_file(self) -> Path:
        return self.notify_file_override or self.state_dir / "notifications.jsonl"

    @property
    def pki_dir(self) -> Path:
        return self.state_dir / "pki"

    @property
    def tls_paths(self) -> tuple[Path, Path, Path]:
        ca, cert, key = self.tls_files
        return (
            ca or self.pki_dir / "ca.pem",
            cert or self.pki_dir / "server.pem",
            key or self.pki_dir / "server.key",
        )

    @property
    def tls_issuers_path(self) -> Path:
        return self.tls_issuers_file or self.pki_dir / "issuers.pem"

    @property
    def pki_ca_dir(self) -> Path:
        return self.pki_ca_override or self.state_dir / "pki-ca"

    @property
    def secrets_dir(self) -> Path:
        return self.state_dir / "secrets"

    @property
    def pg_dir(self) -> Path:
        return self.state_dir / "pg"

    @classmethod
    def from_env(cls) -> Settings:
        return cls(**{f.name: f.metadata[_READ]() for f in fields(cls)})
