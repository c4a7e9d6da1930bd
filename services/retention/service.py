"""RetentionService: the platform's accountability.

Two parts, each a mixin on RetentionBase:
- services/retention/expiry.py: retention policies, expiry runs and deletion reports;
- services/retention/accountability.py: grievances, data-subject requests, the
  hash-chained audit log and transparency figures.
"""

from __future__ import annotations

from stopcovid.retention.v1 import retention_service_pb2_grpc as pb_grpc

from services.retention.accountability import AccountabilityRpcs
from services.retention.policies import ExpiryRpcs


class RetentionService(ExpiryRpcs, AccountabilityRpcs, pb_grpc.RetentionServiceServicer):
    pass
