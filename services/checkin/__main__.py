import gc
import time
from typing import Any

import structlog

from services.checkin.server import SPEC
from services.kernel.server import main

# The hot path makes thousands of short-lived objects per batch. Objects made at
# start-up (modules, descriptors) are frozen out of every collection, and young
# collections run less often, so pauses stay short and rare.
gc.freeze()
gc.set_threshold(20_000, 20, 20)

_GC_PAUSE_LOGGED_MS = 20.0
_gc_started = 0.0


def _report_long_collections(phase: str, info: dict[str, Any]) -> None:
    """A collection that stops the server this long is worth a line: every stream
    of this process waits for it (the check-in benchmark reads these)."""
    global _gc_started  # noqa: PLW0603 - the callback's only state
    if phase == "start":
        _gc_started = time.perf_counter()
        return
    ms = (time.perf_counter() - _gc_started) * 1000
    if ms >= _GC_PAUSE_LOGGED_MS:
        structlog.get_logger().info(
            "gc_pause", generation=info["generation"], ms=round(ms, 1), collected=info["collected"]
        )


gc.callbacks.append(_report_long_collections)

main(SPEC)
