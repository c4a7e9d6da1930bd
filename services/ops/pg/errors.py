"""What goes wrong with an embedded cluster, as exceptions: one base class, so a
caller (`up`, the benchmarks) can report any of them without a traceback."""

from __future__ import annotations


class PostgresError(RuntimeError):
    """The embedded cluster could not be initialised, started or stopped."""


class PostgresNotFoundError(PostgresError):
    """No usable PostgreSQL server binaries were found."""


class PortInUse(PostgresError):
    """The port the postmaster was to listen on is taken (another one may be tried)."""
