"""Shared pieces of the exposure tests: typed Exposure clients per principal, a case
reported for an enrolled person, and access granted under the two-person rule (a
health official requests, a different principal, an approver, approves)."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace
from zoneinfo import ZoneInfo

import stopcovid.client as clients
from google.protobuf import duration_pb2
from stopcovid.client import ClientConfig, RetryPolicy
from stopcovid.common.v1 import common_pb2
from stopcovid.exposure.v1 import exposure_service_pb2 as pb

from tests.support.servers import Pki, Servers

OFFICIAL = "dev-health-official"
APPROVER = "dev-approver"
AUDITOR = "dev-auditor"
REGISTRAR = "dev-registrar"
CAMBODIA = ZoneInfo("Asia/Phnom_Penh")
JUSTIFICATION = "Cluster at a market; contacts must be warned within the day."


def exposure(servers: Servers, principal: str = OFFICIAL) -> clients.ExposureClient:
    """A blocking Exposure client as `principal` that never retries (a refusal is the answer)."""
    config = replace(
        ClientConfig.from_pki_dir(servers.target("exposure"), servers.pki.dir, principal),
        retry=RetryPolicy(max_attempts=1),
    )
    return clients.ExposureClient(config)


def principal(pki: Pki, name: str, role: str) -> str:
    """Issue (once) a certificate for `name` in `role`; returns the file stem to pass
    as a principal. The same name in two roles is the same person for the two-person
    rule: f"{name}@{role}" files, CN `name`."""
    stem = f"{name}@{role}"
    if not (pki.dir / f"{stem}.pem").exists():
        pki.write(stem, pki.issue(name, role))
    return stem


def today() -> dt.date:
    return dt.datetime.now(CAMBODIA).date()


def by_phone(phone: str) -> common_pb2.PersonSelector:
    return common_pb2.PersonSelector(phone_number=phone)


def by_id(person_id: str) -> common_pb2.PersonSelector:
    return common_pb2.PersonSelector(person_id=person_id)


def report_case(
    servers: Servers,
    person: common_pb2.PersonSelector,
    *,
    test_date: dt.date | None = None,
    onset: dt.date | None = None,
    reference: str = "LAB-0001",
    request_id: str = "",
    as_principal: str = OFFICIAL,
) -> pb.Case:
    """Report a case for an enrolled person (default: tested today, onset unknown)."""
    with exposure(servers, as_principal) as client:
        return client.rpc.ReportCase(
            pb.ReportCaseRequest(
                person=person,
                case=pb.Case(
                    test_date=(test_date or today()).isoformat(),
                    symptom_onset_date=onset.isoformat() if onset else "",
                    external_reference=reference,
                ),
                request_id=request_id,
            )
        ).case


def request_access(
    servers: Servers,
    case_id: str,
    *,
    window: common_pb2.TimeRange | None = None,
    as_principal: str = OFFICIAL,
) -> pb.AccessRequest:
    with exposure(servers, as_principal) as client:
        return client.rpc.CreateAccessRequest(
            pb.CreateAccessRequestRequest(
                access_request=pb.AccessRequest(
                    case_id=case_id,
                    outbreak_reference="PP-2021-04-12",
                    justification=JUSTIFICATION,
                    window=window,
                )
            )
        ).access_request


def approve(
    servers: Servers,
    access_request_id: str,
    *,
    duration: dt.timedelta | None = None,
    as_principal: str = APPROVER,
) -> pb.AccessRequest:
    grant_duration = None
    if duration is not None:
        grant_duration = duration_pb2.Duration()
        grant_duration.FromTimedelta(duration)
    with exposure(servers, as_principal) as client:
        return client.rpc.ApproveAccessRequest(
            pb.ApproveAccessRequestRequest(
                access_request_id=access_request_id,
                comment="approved for the outbreak",
                grant_duration=grant_duration,
            )
        ).access_request


def grant_access(
    servers: Servers, case_id: str, *, duration: dt.timedelta | None = None
) -> pb.AccessGrant:
    """Request access as the health official and approve it as the approver."""
    made = request_access(servers, case_id)
    return approve(servers, made.access_request_id, duration=duration).grant


def start_trace(servers: Servers, case_id: str, grant_id: str, request_id: str = "") -> pb.Trace:
    with exposure(servers) as client:
        return client.rpc.StartTrace(
            pb.StartTraceRequest(case_id=case_id, grant_id=grant_id, request_id=request_id)
        ).trace


def revoke(servers: Servers, grant_id: str, *, as_principal: str = APPROVER) -> pb.AccessGrant:
    with exposure(servers, as_principal) as client:
        return client.rpc.RevokeAccessGrant(
            pb.RevokeAccessGrantRequest(grant_id=grant_id, reason="investigation closed")
        ).grant


def risk_status(servers: Servers, person: common_pb2.PersonSelector) -> common_pb2.RiskStatus:
    with exposure(servers) as client:
        return client.rpc.GetRiskStatus(pb.GetRiskStatusRequest(person=person)).risk_status
