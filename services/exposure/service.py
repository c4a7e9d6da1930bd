"""ExposureService: cases, two-person approved access, traces, risk levels,
notifications and the contacts' export.

Nobody's contact data is traced or decrypted without an active access grant
(services/domain/exposure/grants.py): an access request for one case, made by one
principal and approved by another (the schema refuses a decider who is the
requester, too). Every change is audited in its own transaction, under the name of
the RPC that made it; every refusal of access (no grant, expired, revoked, another
case's grant, self-approval) is audited as denied in a transaction of its own,
since the refused call's transaction rolls back.

One part per subject, each a mixin on ExposureBase (services/exposure/base.py, the
state and steps they share):
- reads.py: the RPCs that only read, Get and List (GetCase, ListCases,
  GetAccessRequest, ListAccessRequests, GetTrace, ListTraces, ListNotifications),
  declared by what each reads and answered one way;
- cases.py: ReportCase;
- access.py: CreateAccessRequest, its approval or denial, RevokeAccessGrant;
- traces.py: StartTrace, ListTraceContacts;
- export.py: ExportTraceContacts, the contacts as CSV;
- risk_status.py: GetRiskStatus, ClearRiskStatus.
Each handler checks its request, calls the queries (queries.py: named statements
in, the records of services/domain/exposure/records.py out) and converts
(convert.py).
"""

from __future__ import annotations

from stopcovid.exposure.v1 import exposure_service_pb2_grpc as pb_grpc

from services.exposure import reads
from services.exposure.access import AccessRpcs
from services.exposure.cases import CaseRpcs
from services.exposure.convert import SKIP_REASONS, TRACE_STEPS
from services.exposure.export import ExportRpcs
from services.exposure.reads import ReadRpcs
from services.exposure.risk_status import RiskRpcs
from services.exposure.traces import TraceRpcs

__all__ = ["SERVICE", "SKIP_REASONS", "TRACE_STEPS", "ExposureService"]

SERVICE = reads.SERVICE.full_name
"""The service's full name, which prefixes the audit action of each of its RPCs."""


class ExposureService(
    ReadRpcs,
    CaseRpcs,
    AccessRpcs,
    TraceRpcs,
    ExportRpcs,
    RiskRpcs,
    pb_grpc.ExposureServiceServicer,
):
    pass
