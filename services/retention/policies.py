"""Retention policies, expiry runs and deletion reports.

The expiry run itself is shared with the workers (services/domain/retention/expiry_run.py);
RunExpiry runs it on demand with the real clock, audited as the RPC's method.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import asyncpg
import structlog
from google.protobuf import duration_pb2
from stopcovid.common.v1 import common_pb2
from stopcovid.retention.v1 import retention_service_pb2 as pb

from services.domain.retention import expiry_run
from services.kernel import audit, errors, keys, pagination, validation
from services.kernel.auth import current_principal
from services.kernel.db import load_queries, one
from services.kernel.rpc import Context, timestamp
from services.retention.base import RetentionBase

log = structlog.get_logger()

Q = load_queries(Path(__file__).with_name("policies.sql"))

UPDATE_POLICY_METHOD = "stopcovid.retention.v1.RetentionService/UpdateRetentionPolicy"
_PREFIX = "DATA_CLASS_"
_DAY = 86400
MAX_POLICY_PAGE = 100

# DataClass number <-> the class's name in the database ("check_ins", ...).
CLASS_NAMES: dict[int, str] = {
    number: name.removeprefix(_PREFIX).lower()
    for name, number in pb.DataClass.items()
    if number != pb.DATA_CLASS_UNSPECIFIED
}
CLASS_NUMBERS = {name: number for number, name in CLASS_NAMES.items()}
assert set(CLASS_NUMBERS) == set(expiry_run.CLASSES), "DataClass and expiry_run.CLASSES disagree"

_TRIGGERS = {
    expiry_run.SCHEDULED: pb.EXPIRY_TRIGGER_SCHEDULED,
    expiry_run.ON_DEMAND: pb.EXPIRY_TRIGGER_ON_DEMAND,
}


def _days(n: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=n * _DAY)


def policy_to_proto(row: asyncpg.Record) -> pb.RetentionPolicy:
    bounds = expiry_run.CLASSES[row["data_class"]]
    policy = pb.RetentionPolicy(
        data_class=CLASS_NUMBERS[row["data_class"]],  # type: ignore[arg-type]
        period=_days(row["period_days"]),
        min_period=_days(bounds.min_days),
        max_period=_days(bounds.max_days),
        default_period=_days(bounds.default_days),
        updater=row["updater"],
        etag=str(row["version"]),
    )
    if row["update_time"] is not None:
        policy.update_time.CopyFrom(timestamp(row["update_time"]))
    return policy


def _time_range(start: dt.datetime | None, end: dt.datetime | None) -> common_pb2.TimeRange:
    found = common_pb2.TimeRange()
    if start is not None:
        found.start_time.CopyFrom(timestamp(start))
    if end is not None:
        found.end_time.CopyFrom(timestamp(end))
    return found


def deletion_to_proto(
    deletion: expiry_run.Deletion, run: expiry_run.ExpiryRun
) -> pb.DeletionReport:
    """One of a run's reports (stored, or a dry run's)."""
    report = pb.DeletionReport(
        deletion_report_id=str(deletion.deletion_report_id or ""),
        run_id=str(run.run_id or ""),
        data_class=CLASS_NUMBERS[deletion.data_class],  # type: ignore[arg-type]
        period=_days(deletion.period_days),
        row_count=deletion.row_count,
        data_range=_time_range(deletion.data_start, deletion.data_end),
        destroyed_key_ids=deletion.destroyed_key_ids,
        trigger=_TRIGGERS[run.trigger],
        requester=run.requester,
        dry_run=run.dry_run,
    )
    if deletion.create_time is not None:
        report.create_time.CopyFrom(timestamp(deletion.create_time))
    return report


def report_to_proto(row: asyncpg.Record) -> pb.DeletionReport:
    """A stored report (a deletion_reports row)."""
    return pb.DeletionReport(
        deletion_report_id=str(row["deletion_report_id"]),
        run_id=str(row["run_id"]),
        data_class=CLASS_NUMBERS[row["data_class"]],  # type: ignore[arg-type]
        period=_days(row["period_days"]),
        row_count=row["row_count"],
        data_range=_time_range(row["data_start"], row["data_end"]),
        destroyed_key_ids=list(row["destroyed_key_ids"]),
        trigger=_TRIGGERS[row["trigger"]],
        requester=row["requester"],
        create_time=timestamp(row["create_time"]),
    )


def _class_name(value: int, field: str) -> str:
    name = CLASS_NAMES.get(value)
    if name is None:
        raise errors.InvalidArgument(f"{field} must be a known DataClass", field=field)
    return name


class ExpiryRpcs(RetentionBase):
    # -- policies --------------------------------------------------------------------

    async def GetRetentionPolicy(
        self, request: pb.GetRetentionPolicyRequest, context: Context
    ) -> pb.GetRetentionPolicyResponse:
        name = _class_name(request.data_class, "data_class")
        row = one(await self._pool.fetchrow(Q["get_policy"], name))
        return pb.GetRetentionPolicyResponse(retention_policy=policy_to_proto(row))

    async def ListRetentionPolicies(
        self, request: pb.ListRetentionPoliciesRequest, context: Context
    ) -> pb.ListRetentionPoliciesResponse:
        if not 0 <= request.page_size <= MAX_POLICY_PAGE:
            raise errors.InvalidArgument(
                f"page_size must be between 0 and {MAX_POLICY_PAGE}", field="page_size"
            )
        size = request.page_size or MAX_POLICY_PAGE
        start = pagination.int_key(request.page_token, {}) or 0
        rows = sorted(
            (r for r in await self._pool.fetch(Q["all_policies"])),
            key=lambda r: CLASS_NUMBERS[r["data_class"]],
        )
        rows = [r for r in rows if CLASS_NUMBERS[r["data_class"]] > start]
        rows, token = pagination.page(
            rows, size, {}, lambda last: [CLASS_NUMBERS[last["data_class"]]]
        )
        return pb.ListRetentionPoliciesResponse(
            retention_policies=[policy_to_proto(r) for r in rows], next_page_token=token
        )

    async def UpdateRetentionPolicy(
        self, request: pb.UpdateRetentionPolicyRequest, context: Context
    ) -> pb.UpdateRetentionPolicyResponse:
        given = request.retention_policy
        name = _class_name(given.data_class, "retention_policy.data_class")
        paths = list(request.update_mask.paths) or ["period"]
        if set(paths) != {"period"}:
            raise errors.InvalidArgument("update_mask may name only period", field="update_mask")
        reason = validation.text(request.reason, "reason", max_len=500)
        bounds = expiry_run.CLASSES[name]
        field = "retention_policy.period"
        out_of_range = errors.InvalidArgument(
            f"period must be a whole number of days between {bounds.min_days} and "
            f"{bounds.max_days} for this class",
            reason="RETENTION_OUT_OF_RANGE",
            field=field,
            metadata={
                "min_period_days": str(bounds.min_days),
                "max_period_days": str(bounds.max_days),
            },
        )
        period = given.period
        if (
            not given.HasField("period")
            or period.nanos != 0
            or period.seconds % _DAY != 0
            or not bounds.min_days <= period.seconds // _DAY <= bounds.max_days
        ):
            raise out_of_range
        days = period.seconds // _DAY
        if name == "entry_decisions":
            # Denials are rows of the check-in store and go with their day; a period
            # of their own could be set but not kept, so it is not offered.
            raise errors.FailedPrecondition(
                "entry decisions are kept with their check-in day: change the period of "
                "DATA_CLASS_CHECK_INS, which entry decisions follow",
                metadata={"follows": "DATA_CLASS_CHECK_INS"},
            )
        principal = current_principal()
        async with self._pool.acquire() as conn, conn.transaction():
            current = one(await conn.fetchrow(Q["get_policy_for_update"], name))
            if request.etag and request.etag != str(current["version"]):
                raise errors.Aborted(
                    "the policy changed since it was read; get it again and retry",
                    metadata={"current_etag": str(current["version"])},
                )
            if current["period_days"] == days:
                return pb.UpdateRetentionPolicyResponse(retention_policy=policy_to_proto(current))
            row = one(await conn.fetchrow(Q["update_policy"], name, days, principal.name))
            await audit.record(
                conn,
                UPDATE_POLICY_METHOD,
                "retention_policy",
                name,
                {
                    "old_period_days": current["period_days"],
                    "new_period_days": days,
                    "reason": reason,
                },
            )
            if name == "check_ins":
                await conn.fetchrow(Q["update_policy"], "entry_decisions", days, principal.name)
                await audit.record(
                    conn,
                    UPDATE_POLICY_METHOD,
                    "retention_policy",
                    "entry_decisions",
                    {"new_period_days": days, "follows": "check_ins"},
                )
        log.info("retention_policy_updated", data_class=name, period_days=days)
        return pb.UpdateRetentionPolicyResponse(retention_policy=policy_to_proto(row))

    # -- expiry ----------------------------------------------------------------------

    async def RunExpiry(
        self, request: pb.RunExpiryRequest, context: Context
    ) -> pb.RunExpiryResponse:
        classes = sorted(
            {_class_name(c, "data_classes") for c in request.data_classes},
            key=CLASS_NUMBERS.__getitem__,
        )
        try:
            keystore = self._keystore
        except (SystemExit, keys.KeyError_, OSError, ValueError) as exc:
            log.error("expiry_keystore_unavailable", error_type=type(exc).__name__)
            raise errors.FailedPrecondition(
                "this Retention server cannot destroy keys: its key store or KEK is not "
                "available; see the server log",
                metadata={"missing": "keystore"},
            ) from None
        run = await expiry_run.run_expiry(
            self._pool,
            keystore,
            now=dt.datetime.now(dt.UTC),
            classes=classes,
            trigger=expiry_run.ON_DEMAND,
            requester=current_principal(),
            dry_run=request.dry_run,
        )
        return pb.RunExpiryResponse(
            run_id=str(run.run_id or ""),
            deletion_reports=[deletion_to_proto(r, run) for r in run.reports],
        )

    # -- deletion reports ------------------------------------------------------------

    async def GetDeletionReport(
        self, request: pb.GetDeletionReportRequest, context: Context
    ) -> pb.GetDeletionReportResponse:
        report_id = validation.uuid_id(request.deletion_report_id, "deletion_report_id")
        row = await self._pool.fetchrow(Q["get_report"], report_id)
        if row is None:
            raise errors.NotFound(
                "no deletion report with this id", metadata={"resource": "deletion_report"}
            )
        return pb.GetDeletionReportResponse(deletion_report=report_to_proto(row))

    async def ListDeletionReports(
        self, request: pb.ListDeletionReportsRequest, context: Context
    ) -> pb.ListDeletionReportsResponse:
        size = pagination.page_size(request.page_size)
        data_class = _class_name(request.data_class, "data_class") if request.data_class else None
        start = end = None
        if request.HasField("create_time_range"):
            span = request.create_time_range
            start = span.start_time.ToDatetime(dt.UTC) if span.HasField("start_time") else None
            end = span.end_time.ToDatetime(dt.UTC) if span.HasField("end_time") else None
            if start is not None and end is not None and end < start:
                raise errors.InvalidArgument(
                    "create_time_range.end_time must not be before its start_time",
                    field="create_time_range",
                )
        run_id = validation.optional_uuid(request.run_id, "run_id")
        filters = {
            "data_class": data_class,
            "start": start.isoformat() if start else None,
            "end": end.isoformat() if end else None,
            "run_id": str(run_id) if run_id else None,
        }
        after_time, after_id = pagination.time_and_id(request.page_token, filters)
        rows = await self._pool.fetch(
            Q["list_reports"], data_class, start, end, run_id, after_time, after_id, size + 1
        )
        rows, token = pagination.page(
            rows, size, filters, pagination.time_id_key("create_time", "deletion_report_id")
        )
        return pb.ListDeletionReportsResponse(
            deletion_reports=[report_to_proto(r) for r in rows], next_page_token=token
        )
