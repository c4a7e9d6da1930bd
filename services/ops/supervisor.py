"""What every supervisor of processes shares (the process harness, the embedded
Postgres cluster, the HA cluster): `with` starts it and stops it on the way out,
on an exception as on a normal end, so no process outlives the block."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Self


class Supervisor(ABC):
    """A supervisor of processes, used as `with Supervisor(...) as s:`."""

    def start(self) -> Self:
        """Start what it supervises (by default nothing: the harness starts its
        children one by one as asked)."""
        return self

    @abstractmethod
    def stop(self) -> None:
        """Stop everything it started; safe to call when nothing runs."""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
