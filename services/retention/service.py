"""RetentionService: the platform's accountability.

One mixin on RetentionBase (base.py) per subject, each a thin layer of handlers
that validate, call the domain or the query layer (queries/) and convert:

- policies.py: retention policies, expiry runs on demand, deletion reports;
- grievances.py: grievances and denied-entry appeals (tracking.py, appeals.py);
- data_subject.py: a person's export and the withdrawal of their consent;
- audit_log.py: the hash-chained audit log and its verification;
- transparency.py: the transparency figures, also by province.
"""

from __future__ import annotations

from stopcovid.retention.v1 import retention_service_pb2_grpc as pb_grpc

from services.retention.audit_log import AuditLogRpcs
from services.retention.data_subject import DataSubjectRpcs
from services.retention.grievances import GrievanceRpcs
from services.retention.policies import PolicyRpcs
from services.retention.transparency import TransparencyRpcs


class RetentionService(
    PolicyRpcs,
    GrievanceRpcs,
    DataSubjectRpcs,
    AuditLogRpcs,
    TransparencyRpcs,
    pb_grpc.RetentionServiceServicer,
):
    pass
