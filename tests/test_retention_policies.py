"""Retention policies, RunExpiry and deletion reports through the typed client,
against the real Retention server and Postgres."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import stopcovid.client as clients
from google.protobuf import duration_pb2, field_mask_pb2
from stopcovid.client import ClientConfig, RetryPolicy
from stopcovid.common.v1 import common_pb2
from stopcovid.retention.v1 import retention_service_pb2 as pb

from services.kernel import errors
from services.kernel.config import Settings
from services.kernel.keys import open_keystore
from services.retention.spans import Span, instant
from services.retention.vocabulary import DATA_CLASSES, OUTCOMES, STATES
from tests.support.database import Query
from tests.support.expiry_helpers import days_ago, partition_days, seed_days
from tests.support.servers import Pki, Servers, running_servers
from tests.support.waits import every_page

DAY = 86400
UPDATE = "stopcovid.retention.v1.RetentionService/UpdateRetentionPolicy"
EXPECTED = [  # class, default, min, max (days), as the proto's DataClass says
    (pb.DATA_CLASS_CHECK_INS, 28, 28, 90),
    (pb.DATA_CLASS_CASE_RECORDS, 90, 28, 90),
    (pb.DATA_CLASS_INACTIVE_ENROLLMENTS, 90, 28, 365),
    (pb.DATA_CLASS_NOTIFICATIONS, 28, 28, 90),
    (pb.DATA_CLASS_GRIEVANCES, 365, 90, 1825),
    (pb.DATA_CLASS_AUDIT_EVENTS, 730, 365, 3650),
    (pb.DATA_CLASS_ENTRY_DECISIONS, 28, 28, 90),
]


@pytest.fixture
def own(settings: Settings, pki: Pki, tmp_path: Path) -> Iterator[Servers]:
    """The servers on a fresh database with a key store of this test's own."""
    mine = replace(settings, keystore_override=tmp_path / "keys")
    with running_servers(mine, pki) as running:
        yield running


def client(servers: Servers, principal: str = "dev-retention-officer") -> clients.RetentionClient:
    config = ClientConfig.from_pki_dir(servers.target("retention"), servers.pki.dir, principal)
    return clients.RetentionClient(replace(config, retry=RetryPolicy(max_attempts=1)))


def days(n: float) -> duration_pb2.Duration:
    out = duration_pb2.Duration()
    out.FromTimedelta(dt.timedelta(days=n))
    return out


def update(
    rpc: clients.RetentionClient, data_class: int, period: duration_pb2.Duration, **kw: str
) -> pb.RetentionPolicy:
    reply = rpc.rpc.UpdateRetentionPolicy(
        pb.UpdateRetentionPolicyRequest(
            retention_policy=pb.RetentionPolicy(data_class=data_class, period=period),  # type: ignore[arg-type]
            reason=kw.get("reason", "synthetic test change"),
            etag=kw.get("etag", ""),
            update_mask=field_mask_pb2.FieldMask(paths=kw["mask"].split(","))
            if "mask" in kw
            else None,
        )
    )
    policy: pb.RetentionPolicy = reply.retention_policy
    return policy


def test_policies_list_in_class_order_with_bounds_and_defaults(own: Servers) -> None:
    with client(own, "dev-auditor") as auditor:
        listed = auditor.rpc.ListRetentionPolicies(pb.ListRetentionPoliciesRequest())
        assert listed.next_page_token == ""
        got = [
            (
                p.data_class,
                p.period.seconds // DAY,
                p.min_period.seconds // DAY,
                p.max_period.seconds // DAY,
            )
            for p in listed.retention_policies
        ]
        assert got == [(c, d, lo, hi) for c, d, lo, hi in EXPECTED]
        assert all(
            p.default_period == p.period and not p.HasField("update_time") and p.etag == "1"
            for p in listed.retention_policies
        )
        first = auditor.rpc.ListRetentionPolicies(pb.ListRetentionPoliciesRequest(page_size=3))
        second = auditor.rpc.ListRetentionPolicies(
            pb.ListRetentionPoliciesRequest(page_size=5, page_token=first.next_page_token)
        )
        assert second.next_page_token == ""
        paged = [p.data_class for p in [*first.retention_policies, *second.retention_policies]]
        assert paged == [e[0] for e in EXPECTED]
        one = auditor.rpc.GetRetentionPolicy(
            pb.GetRetentionPolicyRequest(data_class=pb.DATA_CLASS_GRIEVANCES)
        )
        assert one.retention_policy.period.seconds == 365 * DAY
        with pytest.raises(clients.InvalidArgument) as refused:
            auditor.rpc.GetRetentionPolicy(pb.GetRetentionPolicyRequest())
        assert refused.value.field_violations[0][0] == "data_class"
        with pytest.raises(clients.PermissionDenied):
            update(auditor, pb.DATA_CLASS_CHECK_INS, days(30))


@pytest.mark.parametrize(
    ("data_class", "period"),
    [
        (pb.DATA_CLASS_CHECK_INS, days(27)),
        (pb.DATA_CLASS_CHECK_INS, days(91)),
        (pb.DATA_CLASS_CASE_RECORDS, days(0)),
        (pb.DATA_CLASS_CASE_RECORDS, days(365)),
        (pb.DATA_CLASS_NOTIFICATIONS, days(28.5)),  # not a whole number of days
        (pb.DATA_CLASS_ENTRY_DECISIONS, duration_pb2.Duration(seconds=28 * DAY, nanos=1)),
        (pb.DATA_CLASS_INACTIVE_ENROLLMENTS, days(366)),
        (pb.DATA_CLASS_GRIEVANCES, days(89)),
        (pb.DATA_CLASS_AUDIT_EVENTS, days(3651)),
        (pb.DATA_CLASS_CHECK_INS, duration_pb2.Duration(seconds=-30 * DAY)),
    ],
)
def test_out_of_range_periods_are_refused(
    own: Servers, db_conn: Query, data_class: int, period: duration_pb2.Duration
) -> None:
    with client(own) as rpc, pytest.raises(clients.InvalidArgument) as refused:
        update(rpc, data_class, period)
    assert refused.value.reason == "RETENTION_OUT_OF_RANGE"
    assert [f for f, _ in refused.value.field_violations] == ["retention_policy.period"]
    assert db_conn("SELECT count(*) FROM retention_policies WHERE version > 1")[0][0] == 0
    assert db_conn("SELECT count(*) FROM audit_events")[0][0] == 0


def test_entry_decisions_follow_the_check_in_period(own: Servers) -> None:
    """Denials live in the check-in day partitions and go with them: their period
    is the check-ins' period, never one of their own that could not be kept."""
    with client(own) as rpc:
        with pytest.raises(clients.FailedPrecondition):
            update(rpc, pb.DATA_CLASS_ENTRY_DECISIONS, days(60))
        update(rpc, pb.DATA_CLASS_CHECK_INS, days(35))
        reply = rpc.rpc.GetRetentionPolicy(
            pb.GetRetentionPolicyRequest(data_class=pb.DATA_CLASS_ENTRY_DECISIONS)
        )
    assert reply.retention_policy.period.seconds == 35 * 86400


def test_an_update_is_audited_and_checks_etag_and_reason(own: Servers, db_conn: Query) -> None:
    with client(own) as rpc:
        with pytest.raises(clients.InvalidArgument) as no_reason:
            update(rpc, pb.DATA_CLASS_CHECK_INS, days(35), reason="")
        assert no_reason.value.field_violations[0][0] == "reason"
        with pytest.raises(clients.InvalidArgument):
            update(rpc, pb.DATA_CLASS_CHECK_INS, days(35), mask="period,updater")
        with pytest.raises(clients.Aborted) as stale:
            update(rpc, pb.DATA_CLASS_CHECK_INS, days(35), etag="7")
        assert stale.value.reason == "ETAG_MISMATCH"

        changed = update(rpc, pb.DATA_CLASS_CHECK_INS, days(35), etag="1", mask="period")
        assert changed.period.seconds == 35 * DAY
        assert changed.etag == "2"
        assert changed.updater == "dev-retention-officer"
        assert changed.HasField("update_time")
        assert changed.default_period.seconds == 28 * DAY
        # The same period again changes nothing and records nothing.
        assert update(rpc, pb.DATA_CLASS_CHECK_INS, days(35)).etag == "2"
    event, follower = db_conn(
        "SELECT principal, action, resource_id, details FROM audit_events ORDER BY sequence"
    )
    assert (event["principal"], event["action"], event["resource_id"]) == (
        "dev-retention-officer",
        UPDATE,
        "check_ins",
    )
    assert json.loads(event["details"]) == {
        "old_period_days": 28,
        "new_period_days": 35,
        "reason": "synthetic test change",
    }
    # Entry decisions follow the check-ins (they are rows of the same days).
    assert follower["resource_id"] == "entry_decisions"
    assert json.loads(follower["details"]) == {"new_period_days": 35, "follows": "check_ins"}


def test_a_changed_policy_takes_effect_at_the_next_run(own: Servers, db_conn: Query) -> None:
    """At 35 days a day 30 days old stays (at 28 it would go), days 36 and 37 go;
    the reports are listed, newest first, and read one by one; a dry run and a
    second run delete nothing."""
    keystore = open_keystore(own.settings.keystore_dir, own.settings.secrets_dir)
    d37, d36, d35, d30 = (days_ago(n) for n in (37, 36, 35, 30))
    seed_days(db_conn, keystore, [d37, d36, d35, d30], per_day=4, denied_per_day=1)
    with client(own) as rpc:
        update(rpc, pb.DATA_CLASS_CHECK_INS, days(35))
        dry = rpc.rpc.RunExpiry(pb.RunExpiryRequest(dry_run=True))
        assert dry.run_id == ""
        assert [(r.data_class, r.row_count, r.dry_run) for r in dry.deletion_reports] == [
            (pb.DATA_CLASS_CHECK_INS, 8, True),
            (pb.DATA_CLASS_ENTRY_DECISIONS, 2, True),
        ]
        assert partition_days(db_conn) >= {d37, d36}

        done = rpc.rpc.RunExpiry(pb.RunExpiryRequest(data_classes=[pb.DATA_CLASS_CHECK_INS]))
        assert done.run_id
        (report,) = done.deletion_reports  # entry decisions were not asked for
        assert (report.data_class, report.row_count, report.period.seconds) == (
            pb.DATA_CLASS_CHECK_INS,
            8,
            35 * DAY,
        )
        assert list(report.destroyed_key_ids) == [f"day-{d37}", f"day-{d36}"]
        assert report.trigger == pb.EXPIRY_TRIGGER_ON_DEMAND
        assert report.requester == "dev-retention-officer"
        assert report.data_range.start_time.ToDatetime(dt.UTC).date() == d37
        assert report.data_range.end_time.ToDatetime(dt.UTC).date() == d35
        assert not partition_days(db_conn) & {d37, d36}
        assert {d35, d30} <= partition_days(db_conn)
        assert not keystore.has_day_key(d37) and keystore.has_day_key(d35)

        again = rpc.rpc.RunExpiry(pb.RunExpiryRequest())
        assert again.run_id and list(again.deletion_reports) == []

        with client(own, "dev-auditor") as auditor:
            listed = auditor.rpc.ListDeletionReports(pb.ListDeletionReportsRequest())
            assert [r.deletion_report_id for r in listed.deletion_reports] == [
                report.deletion_report_id
            ]
            got = auditor.rpc.GetDeletionReport(
                pb.GetDeletionReportRequest(deletion_report_id=report.deletion_report_id)
            ).deletion_report
            assert got == report
            by_run = auditor.rpc.ListDeletionReports(
                pb.ListDeletionReportsRequest(run_id=done.run_id, page_size=1)
            )
            assert len(by_run.deletion_reports) == 1 and by_run.next_page_token == ""
            other = auditor.rpc.ListDeletionReports(
                pb.ListDeletionReportsRequest(data_class=pb.DATA_CLASS_CASE_RECORDS)
            )
            assert list(other.deletion_reports) == []
            with pytest.raises(clients.NotFound):
                auditor.rpc.GetDeletionReport(
                    pb.GetDeletionReportRequest(
                        deletion_report_id="00000000-0000-4000-8000-000000000000"
                    )
                )
            with pytest.raises(clients.InvalidArgument):
                auditor.rpc.ListDeletionReports(
                    pb.ListDeletionReportsRequest(page_token="bm90IGEgdG9rZW4")
                )
            with pytest.raises(clients.PermissionDenied):
                auditor.rpc.RunExpiry(pb.RunExpiryRequest())
        with pytest.raises(clients.InvalidArgument):
            rpc.rpc.RunExpiry(pb.RunExpiryRequest(data_classes=[99]))  # type: ignore[list-item]


def test_deletion_reports_page_newest_first(own: Servers, db_conn: Query) -> None:
    keystore = open_keystore(own.settings.keystore_dir, own.settings.secrets_dir)
    seed_days(db_conn, keystore, [days_ago(n) for n in (33, 32, 31)], per_day=2)
    with client(own) as rpc:
        runs = []
        for n in (33, 32, 31):
            # One more day expires at each run: the policy shortens by a day.
            update(rpc, pb.DATA_CLASS_CHECK_INS, days(n - 1))
            runs.append(rpc.rpc.RunExpiry(pb.RunExpiryRequest()).run_id)
        seen: list[str] = []
        for page in every_page(
            lambda token: rpc.rpc.ListDeletionReports(
                pb.ListDeletionReportsRequest(
                    page_size=2, page_token=token, data_class=pb.DATA_CLASS_CHECK_INS
                )
            )
        ):
            seen += [r.run_id for r in page.deletion_reports]
        assert seen == runs[::-1]
        with pytest.raises(clients.InvalidArgument) as wrong:
            rpc.rpc.ListDeletionReports(
                pb.ListDeletionReportsRequest(page_size=2, page_token=page_token_of(rpc))
            )
        assert wrong.value.reason == "INVALID_PAGE_TOKEN"


def page_token_of(rpc: clients.RetentionClient) -> str:
    """A token of a query with a class filter (to be refused without it)."""
    first = rpc.rpc.ListDeletionReports(
        pb.ListDeletionReportsRequest(page_size=1, data_class=pb.DATA_CLASS_CHECK_INS)
    )
    token: str = first.next_page_token
    assert token
    return token


# -- the seams shared by every part: enum words, time ranges ------------------------


def test_enum_words_and_refusals() -> None:
    assert DATA_CLASSES.word(pb.DATA_CLASS_ENTRY_DECISIONS, "data_class") == "entry_decisions"
    assert DATA_CLASSES.number("check_ins") == pb.DATA_CLASS_CHECK_INS
    assert STATES.filter(0, "state") is None
    assert STATES.filter(pb.GRIEVANCE_STATE_IN_PROGRESS, "state") == "in_progress"
    assert OUTCOMES.number_or(None, pb.GRIEVANCE_OUTCOME_UNSPECIFIED) == 0
    for number, read in ((0, DATA_CLASSES.word), (99, DATA_CLASSES.word), (99, STATES.filter)):
        with pytest.raises(errors.InvalidArgument) as refused:
            read(number, "data_class")
        assert refused.value.field == "data_class"


def test_time_ranges_are_read_and_written_alike() -> None:
    start = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    end = start + dt.timedelta(days=3)
    span = Span(start, end)
    assert Span.of(span.to_proto(), "period") == span
    assert Span.of(Span(start).to_proto(), "period") == Span(start, None)
    assert Span.of(common_pb2.TimeRange(), "period") == Span()
    assert span.filters() == {"start": start.isoformat(), "end": end.isoformat()}
    with pytest.raises(errors.InvalidArgument) as backwards:
        Span.of(Span(end, start).to_proto(), "create_time_range")
    assert backwards.value.field == "create_time_range"
    assert instant(None) is None and instant(start) == Span(start).to_proto().start_time
