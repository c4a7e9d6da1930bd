"""The data classes of retention and the bounds of their periods.

Each class is named as in `retention_policies.data_class` (the DataClass enum's
name without its prefix, lower case). The proto documents the same defaults and
bounds, and the CHECK on retention_policies repeats the bounds
(tests/test_contracts.py holds the three together).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ClassBounds:
    default_days: int
    min_days: int
    max_days: int


# In DataClass order (enum numbers 1..7).
CLASSES: dict[str, ClassBounds] = {
    "check_ins": ClassBounds(28, 28, 90),
    "case_records": ClassBounds(90, 28, 90),
    "inactive_enrollments": ClassBounds(90, 28, 365),
    "notifications": ClassBounds(28, 28, 90),
    "grievances": ClassBounds(365, 90, 1825),
    "audit_events": ClassBounds(730, 365, 3650),
    "entry_decisions": ClassBounds(28, 28, 90),
}
