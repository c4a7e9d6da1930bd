"""Client configuration: where a service is, the TLS material to reach it, and call policy."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ClientConfig", "RetryPolicy"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How idempotent unary calls are retried when the server answers UNAVAILABLE.

    Only RPCs whose proto declares `idempotency_level` NO_SIDE_EFFECTS or IDEMPOTENT are
    retried; every attempt, and every pause between attempts, stays within the call's
    deadline.
    """

    max_attempts: int = 4
    """Attempts in all, the first one included; 1 disables retrying."""

    initial_backoff: float = 0.1
    """Seconds to wait before the second attempt."""

    max_backoff: float = 2.0
    """Upper bound, in seconds, of any one wait between attempts."""

    multiplier: float = 2.0
    """Factor by which the wait grows after each failed attempt."""

    jitter: float = 0.2
    """Fraction of each wait drawn at random (a wait `b` becomes uniform in
    `[b * (1 - jitter), b * (1 + jitter)]`), so that many clients cut off by the same
    outage do not all come back at the same instant."""

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.initial_backoff < 0 or self.max_backoff < 0:
            raise ValueError("backoffs must not be negative")
        if self.multiplier < 1:
            raise ValueError("multiplier must be at least 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be within [0, 1]")

    def backoff(self, retry: int) -> float:
        """The wait, before jitter, ahead of retry number `retry` (1 for the second attempt)."""
        return min(self.max_backoff, self.initial_backoff * self.multiplier ** (retry - 1))


_MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """Everything a client needs to reach one Stop COVID service over mutual TLS.

    Build it from PEM files with `from_files` or from a directory the platform's
    certificate command filled with `from_pki_dir`; change single settings with
    `dataclasses.replace`.
    """

    target: str
    """The service's address as "host:port", or several, comma separated, to balance
    over (round robin: see clients/_channel.py)."""

    ca_cert_pem: bytes
    """PEM of the platform CA that signed the server's certificate (the trust root)."""

    client_cert_pem: bytes | None = None
    """PEM of this principal's client certificate. None connects without one, which the
    server answers with UNAUTHENTICATED; useful only for tests of exactly that."""

    client_key_pem: bytes | None = field(default=None, repr=False)
    """PEM of the private key of `client_cert_pem`; given exactly when the certificate is.
    Never shown in the config's repr."""

    server_name_override: str | None = None
    """Name to verify the server certificate against instead of the host in `target`;
    rarely needed (for example when connecting by an address the certificate does not
    name). Sets the `grpc.ssl_target_name_override` channel option."""

    timeout: float = 10.0
    """Default deadline in seconds for a unary call when the caller passes no `timeout`.
    Retries happen within it."""

    stream_timeout: float | None = None
    """Default deadline in seconds for a streaming call when the caller passes no
    `timeout`; None means none, since a device's check-in stream stays open for hours."""

    retry: RetryPolicy = field(default_factory=RetryPolicy)
    """Retrying of idempotent unary calls on UNAVAILABLE."""

    keepalive_time: float | None = None
    """Seconds of inactivity after which the client pings the server to check the
    connection; None sends no pings. Set it only as low as the server permits
    (`grpc.http2.min_ping_interval_without_data_ms`, five minutes unless changed), or the
    server closes the connection for pinging too often."""

    keepalive_timeout: float = 20.0
    """Seconds to wait for a ping's answer before the connection is considered dead."""

    keepalive_without_calls: bool = False
    """Whether to ping even while no call is open."""

    max_send_message_bytes: int = 4 * _MIB
    """Largest message the client sends; larger ones fail locally with RESOURCE_EXHAUSTED."""

    max_receive_message_bytes: int = 16 * _MIB
    """Largest message the client accepts (rendered posters can be a few MiB)."""

    def __post_init__(self) -> None:
        if (self.client_cert_pem is None) != (self.client_key_pem is None):
            raise ValueError("client_cert_pem and client_key_pem go together")
        if self.timeout <= 0:
            raise ValueError("timeout must be positive")
        if self.stream_timeout is not None and self.stream_timeout <= 0:
            raise ValueError("stream_timeout must be positive or None")

    @classmethod
    def from_files(
        cls,
        target: str,
        ca_path: str | Path,
        cert_path: str | Path | None = None,
        key_path: str | Path | None = None,
    ) -> ClientConfig:
        """A config reading the CA certificate and, if given, the client certificate and key
        from PEM files."""
        return cls(
            target=target,
            ca_cert_pem=Path(ca_path).read_bytes(),
            client_cert_pem=None if cert_path is None else Path(cert_path).read_bytes(),
            client_key_pem=None if key_path is None else Path(key_path).read_bytes(),
        )

    @classmethod
    def from_pki_dir(cls, target: str, pki_dir: str | Path, principal: str | None) -> ClientConfig:
        """A config from a PKI directory: `<pki_dir>/ca.pem`, and for `principal`
        `<pki_dir>/<principal>.pem` and `<pki_dir>/<principal>.key`. A `principal` of None
        gives a config without a client certificate."""
        directory = Path(pki_dir)
        if principal is None:
            return cls.from_files(target, directory / "ca.pem")
        return cls.from_files(
            target,
            directory / "ca.pem",
            directory / f"{principal}.pem",
            directory / f"{principal}.key",
        )
