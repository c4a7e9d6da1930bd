"""Reading this process's Prometheus metrics in tests: a snapshot of one metric's
samples, and what changed between two snapshots (the registry is the process's,
shared by every test, so tests assert on changes, never on totals)."""

from __future__ import annotations

from prometheus_client import REGISTRY

Labels = tuple[tuple[str, str], ...]


def samples(name: str) -> dict[Labels, float]:
    """Every sample called `name` (with its suffix: `..._total`, `..._count`), by labels."""
    found: dict[Labels, float] = {}
    for family in REGISTRY.collect():
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def changes(before: dict[Labels, float], after: dict[Labels, float]) -> dict[Labels, float]:
    """The samples whose value moved, by how much."""
    moved = {key: value - before.get(key, 0.0) for key, value in after.items()}
    return {key: delta for key, delta in moved.items() if delta}
