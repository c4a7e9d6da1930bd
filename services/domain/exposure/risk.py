"""Risk status rows (risk_status, risk_history) as the API shows them: one place for
the level, reason and clear-reason names and for RiskStatus and RiskBasis, shared
by the Exposure service (GetRiskStatus, ClearRiskStatus) and the Retention service
(exports, denied-entry appeals). Each takes a row or its record
(records.RiskStatus). A basis never names the case."""

from __future__ import annotations

import datetime as dt
from typing import Any

from stopcovid.common.v1 import common_pb2

from services.domain.exposure.records import column
from services.kernel import rpc
from services.kernel.rpc import timestamp

# The risk vocabulary: risk_status.level, risk_history.level, trace_contacts.level,
# notifications.level and the message templates all use these words (the schema's
# CHECKs name them too: tests/test_contracts.py).
NONE, LOW, MEDIUM, HIGH = "none", "low", "medium", "high"
RAISED = (HIGH, MEDIUM, LOW)
"""The levels a trace can give, highest first."""

# risk_status.level <-> RiskLevel.
LEVELS = {
    NONE: common_pb2.RISK_LEVEL_NONE,
    LOW: common_pb2.RISK_LEVEL_LOW,
    MEDIUM: common_pb2.RISK_LEVEL_MEDIUM,
    HIGH: common_pb2.RISK_LEVEL_HIGH,
}
LEVELS_BACK = {v: k for k, v in LEVELS.items()}
# risk_status.reason <-> RiskReason.
REASONS = {
    "confirmed_case": common_pb2.RISK_REASON_CONFIRMED_CASE,
    "venue_contact": common_pb2.RISK_REASON_VENUE_CONTACT,
}
# RiskClearReason <-> risk_status.clear_reason (the enum name without its prefix, lower case).
CLEAR_REASONS = {
    common_pb2.RISK_CLEAR_REASON_NEGATIVE_TEST: "negative_test",
    common_pb2.RISK_CLEAR_REASON_ISOLATION_COMPLETED: "isolation_completed",
    common_pb2.RISK_CLEAR_REASON_RECORDED_IN_ERROR: "recorded_in_error",
    common_pb2.RISK_CLEAR_REASON_APPEAL_UPHELD: "appeal_upheld",
    common_pb2.RISK_CLEAR_REASON_OTHER: "other",
}
CLEAR_REASONS_BACK = {v: k for k, v in CLEAR_REASONS.items()}


def basis_to_proto(row: Any, prefix: str = "") -> common_pb2.RiskBasis:
    """A RiskBasis from the columns reason, exposure_time, venue_id,
    venue_display_name, overlap and rule (each optionally prefixed)."""

    def col(name: str) -> Any:
        return column(row, prefix + name)

    basis = common_pb2.RiskBasis(rule=col("rule") or "")
    basis.reason = REASONS.get(col("reason") or "", common_pb2.RISK_REASON_UNSPECIFIED)
    if col("exposure_time") is not None:
        basis.exposure_time.CopyFrom(timestamp(col("exposure_time")))
    if col("venue_id") is not None:
        basis.venue_id = str(col("venue_id"))
    basis.venue_display_name = col("venue_display_name") or ""
    if col("overlap") is not None:
        basis.overlap.CopyFrom(rpc.duration(col("overlap")))
    return basis


def status_to_proto(row: Any | None, now: dt.datetime) -> common_pb2.RiskStatus:
    """A person's status from their risk_status row: NONE without a row, once
    expired, or after clearing (with when and why it was cleared)."""
    status = common_pb2.RiskStatus(level=common_pb2.RISK_LEVEL_NONE)
    if row is None:
        return status
    status.update_time.CopyFrom(timestamp(column(row, "update_time")))
    if column(row, "clear_time") is not None:
        status.clear_time.CopyFrom(timestamp(column(row, "clear_time")))
        status.clear_reason = CLEAR_REASONS_BACK.get(
            column(row, "clear_reason") or "", common_pb2.RISK_CLEAR_REASON_UNSPECIFIED
        )
    level = column(row, "level")
    if level == NONE or column(row, "expire_time") <= now:
        return status
    status.level = LEVELS[level]
    status.expire_time.CopyFrom(timestamp(column(row, "expire_time")))
    status.basis.CopyFrom(basis_to_proto(row))
    return status
