"""structlog setup shared by every process.

Events have stable names (`rpc_refused`, `venue_created`) and keys; no personal
data is ever passed to a logger, only ids and counts. Exceptions are the one
place data could slip in (an exception's message, a frame's local variables), so
they are logged as their type and the code locations they passed through only.
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import MutableMapping
from typing import Any

import structlog


def redact_exception(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Replace `exc_info` with the exception's type and stack: no message, no locals."""
    exc_info = event.pop("exc_info", None)
    if not exc_info:
        return event
    if exc_info is True:
        exc_info = sys.exc_info()
    exc = exc_info if isinstance(exc_info, BaseException) else exc_info[1]
    if exc is None:
        return event
    chain = []
    while exc is not None:
        frames = traceback.extract_tb(exc.__traceback__)
        chain.append(
            {
                "type": type(exc).__qualname__,
                "frames": [f"{f.filename}:{f.lineno} in {f.name}" for f in frames],
            }
        )
        exc = exc.__cause__ or exc.__context__
    event["exception"] = chain
    return event


def configure(level: str = "info", fmt: str = "auto", process: str = "") -> None:
    """JSON lines when not on a terminal (for collectors), readable output on one."""
    numeric = getattr(logging, level.upper(), logging.INFO)
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    if process:
        structlog.contextvars.bind_contextvars(process=process)
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer(colors=True)
        if use_console
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_exception,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Libraries (asyncpg's pool, grpc, asyncio) log through the standard library;
    # render their records the same way, with exceptions redacted the same way,
    # instead of Python's bare fallback that prints exception messages.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.contextvars.merge_contextvars,
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                structlog.stdlib.add_logger_name,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                redact_exception,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.WARNING))
