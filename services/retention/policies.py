"""Retention policies, expiry runs on demand, and deletion reports.

A policy's period is a whole number of days within its class's bounds
(services/domain/retention/periods.py); entry decisions follow the check-ins'
period, as they are rows of the same days. The expiry run itself is shared with
the workers (services/domain/retention/expiry_run.py); RunExpiry runs it with the
real clock, audited as the RPC's method.
"""

from __future__ import annotations

import datetime as dt
import uuid

import structlog
from google.protobuf import duration_pb2
from stopcovid.retention.v1 import retention_service_pb2 as pb

from services.domain.retention import audit_actions, expiry_run
from services.kernel import audit, errors, pagination, validation
from services.kernel.auth import current_principal
from services.kernel.rpc import Context
from services.retention.base import RetentionBase
from services.retention.queries import policies as store
from services.retention.queries.policies import Policy, ReportFilter, StoredReport
from services.retention.spans import Span, instant
from services.retention.vocabulary import DATA_CLASSES, TRIGGERS

log = structlog.get_logger()

_DAY = 86400
MAX_POLICY_PAGE = 100


def _days(n: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=n * _DAY)


def policy_to_proto(policy: Policy) -> pb.RetentionPolicy:
    bounds = expiry_run.CLASSES[policy.data_class]
    return pb.RetentionPolicy(
        data_class=DATA_CLASSES.number(policy.data_class),
        period=_days(policy.period_days),
        min_period=_days(bounds.min_days),
        max_period=_days(bounds.max_days),
        default_period=_days(bounds.default_days),
        updater=policy.updater,
        etag=str(policy.version),
        update_time=instant(policy.update_time),
    )


def deletion_to_proto(
    deletion: expiry_run.Deletion,
    run_id: uuid.UUID | None,
    trigger: str,
    requester: str,
    dry_run: bool = False,
) -> pb.DeletionReport:
    """One report of a run: stored, or a dry run's (no id, no time)."""
    return pb.DeletionReport(
        deletion_report_id=str(deletion.deletion_report_id or ""),
        run_id=str(run_id or ""),
        data_class=DATA_CLASSES.number(deletion.data_class),
        period=_days(deletion.period_days),
        row_count=deletion.row_count,
        data_range=Span(deletion.data_start, deletion.data_end).to_proto(),
        destroyed_key_ids=deletion.destroyed_key_ids,
        trigger=TRIGGERS.number(trigger),
        requester=requester,
        dry_run=dry_run,
        create_time=instant(deletion.create_time),
    )


def stored_to_proto(stored: StoredReport) -> pb.DeletionReport:
    return deletion_to_proto(stored.deletion(), stored.run_id, stored.trigger, stored.requester)


def _period_days(given: pb.RetentionPolicy, data_class: str, field: str) -> int:
    """The period asked for, in whole days within the class's bounds."""
    bounds = expiry_run.CLASSES[data_class]
    period = given.period
    if (
        not given.HasField("period")
        or period.nanos != 0
        or period.seconds % _DAY != 0
        or not bounds.min_days <= period.seconds // _DAY <= bounds.max_days
    ):
        raise errors.InvalidArgument(
            f"period must be a whole number of days between {bounds.min_days} and "
            f"{bounds.max_days} for this class",
            reason="RETENTION_OUT_OF_RANGE",
            field=field,
            metadata={
                "min_period_days": str(bounds.min_days),
                "max_period_days": str(bounds.max_days),
            },
        )
    return period.seconds // _DAY


class PolicyRpcs(RetentionBase):
    # -- policies --------------------------------------------------------------------

    async def GetRetentionPolicy(
        self, request: pb.GetRetentionPolicyRequest, context: Context
    ) -> pb.GetRetentionPolicyResponse:
        data_class = DATA_CLASSES.word(request.data_class, "data_class")
        policy = await store.get(self._pool, data_class)
        return pb.GetRetentionPolicyResponse(retention_policy=policy_to_proto(policy))

    async def ListRetentionPolicies(
        self, request: pb.ListRetentionPoliciesRequest, context: Context
    ) -> pb.ListRetentionPoliciesResponse:
        if not 0 <= request.page_size <= MAX_POLICY_PAGE:
            raise errors.InvalidArgument(
                f"page_size must be between 0 and {MAX_POLICY_PAGE}", field="page_size"
            )
        size = request.page_size or MAX_POLICY_PAGE
        after = pagination.int_key(request.page_token, {}) or 0
        found = await store.all_policies(self._pool)
        # Seven rows, in DataClass order: paged by class number.
        numbered = sorted((DATA_CLASSES.number(p.data_class), p) for p in found)
        shown, token = pagination.page(
            [(n, p) for n, p in numbered if n > after], size, {}, lambda last: [last[0]]
        )
        return pb.ListRetentionPoliciesResponse(
            retention_policies=[policy_to_proto(p) for _, p in shown], next_page_token=token
        )

    async def UpdateRetentionPolicy(
        self, request: pb.UpdateRetentionPolicyRequest, context: Context
    ) -> pb.UpdateRetentionPolicyResponse:
        given = request.retention_policy
        data_class = DATA_CLASSES.word(given.data_class, "retention_policy.data_class")
        if set(request.update_mask.paths or ["period"]) != {"period"}:
            raise errors.InvalidArgument("update_mask may name only period", field="update_mask")
        reason = validation.text(request.reason, "reason", max_len=500)
        days = _period_days(given, data_class, "retention_policy.period")
        if data_class == "entry_decisions":
            # Denials are rows of the check-in store and go with their day; a period
            # of their own could be set but not kept, so it is not offered.
            raise errors.FailedPrecondition(
                "entry decisions are kept with their check-in day: change the period of "
                "DATA_CLASS_CHECK_INS, which entry decisions follow",
                metadata={"follows": "DATA_CLASS_CHECK_INS"},
            )
        principal = current_principal()
        async with self._pool.acquire() as conn, conn.transaction():
            current = await store.get(conn, data_class, lock=True)
            if request.etag and request.etag != str(current.version):
                raise errors.Aborted(
                    "the policy changed since it was read; get it again and retry",
                    metadata={"current_etag": str(current.version)},
                )
            if current.period_days == days:
                return pb.UpdateRetentionPolicyResponse(retention_policy=policy_to_proto(current))
            changed = await store.update(conn, data_class, days, principal.name)
            await audit.record(
                conn,
                audit_actions.UPDATE_RETENTION_POLICY,
                "retention_policy",
                data_class,
                {"old_period_days": current.period_days, "new_period_days": days, "reason": reason},
            )
            if data_class == "check_ins":
                await store.update(conn, "entry_decisions", days, principal.name)
                await audit.record(
                    conn,
                    audit_actions.UPDATE_RETENTION_POLICY,
                    "retention_policy",
                    "entry_decisions",
                    {"new_period_days": days, "follows": "check_ins"},
                )
        log.info("retention_policy_updated", data_class=data_class, period_days=days)
        return pb.UpdateRetentionPolicyResponse(retention_policy=policy_to_proto(changed))

    # -- expiry ----------------------------------------------------------------------

    async def RunExpiry(
        self, request: pb.RunExpiryRequest, context: Context
    ) -> pb.RunExpiryResponse:
        classes = {DATA_CLASSES.word(c, "data_classes") for c in request.data_classes}
        run = await expiry_run.run_expiry(
            self._pool,
            self._keystore_or_refuse(),
            now=dt.datetime.now(dt.UTC),
            classes=sorted(classes, key=DATA_CLASSES.number),
            trigger=expiry_run.ON_DEMAND,
            requester=current_principal(),
            dry_run=request.dry_run,
        )
        return pb.RunExpiryResponse(
            run_id=str(run.run_id or ""),
            deletion_reports=[
                deletion_to_proto(d, run.run_id, run.trigger, run.requester, run.dry_run)
                for d in run.reports
            ],
        )

    # -- deletion reports ------------------------------------------------------------

    async def GetDeletionReport(
        self, request: pb.GetDeletionReportRequest, context: Context
    ) -> pb.GetDeletionReportResponse:
        report_id = validation.uuid_id(request.deletion_report_id, "deletion_report_id")
        stored = await store.report(self._pool, report_id)
        if stored is None:
            raise errors.NotFound(
                "no deletion report with this id", metadata={"resource": "deletion_report"}
            )
        return pb.GetDeletionReportResponse(deletion_report=stored_to_proto(stored))

    async def ListDeletionReports(
        self, request: pb.ListDeletionReportsRequest, context: Context
    ) -> pb.ListDeletionReportsResponse:
        size = pagination.page_size(request.page_size)
        data_class = (
            DATA_CLASSES.word(request.data_class, "data_class") if request.data_class else None
        )
        span = Span.of(request.create_time_range, "create_time_range")
        where = ReportFilter(
            data_class=data_class,
            start=span.start,
            end=span.end,
            run_id=validation.optional_uuid(request.run_id, "run_id"),
        )
        filters = {
            "data_class": where.data_class,
            **span.filters(),
            "run_id": str(where.run_id) if where.run_id else None,
        }
        after = pagination.time_and_id(request.page_token, filters)
        found = await store.reports(self._pool, where, after, size + 1)
        shown, token = pagination.page(
            found, size, filters, lambda r: [r.create_time.isoformat(), str(r.deletion_report_id)]
        )
        return pb.ListDeletionReportsResponse(
            deletion_reports=[stored_to_proto(r) for r in shown], next_page_token=token
        )
