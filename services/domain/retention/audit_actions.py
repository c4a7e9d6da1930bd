"""The audit actions of retention work, named once for the Retention server and the
workers: an RPC by its full method name ("stopcovid.retention.v1.RetentionService/
RunExpiry"), scheduled expiry by its step ("worker.expiry.drop_partition"), the two
conventions of services/kernel/audit.py.

The RPC names are read from the services' descriptors at import, so a misspelt or
removed method fails when the module loads, not in the middle of an audited change.
"""

from __future__ import annotations

from google.protobuf.descriptor import ServiceDescriptor
from stopcovid.exposure.v1 import exposure_service_pb2
from stopcovid.retention.v1 import retention_service_pb2

RETENTION_SERVICE = retention_service_pb2.DESCRIPTOR.services_by_name["RetentionService"]
EXPOSURE_SERVICE = exposure_service_pb2.DESCRIPTOR.services_by_name["ExposureService"]


def rpc(method: str, service: ServiceDescriptor = RETENTION_SERVICE) -> str:
    """The action of an RPC of `service`; KeyError for a method it does not have."""
    return f"{service.full_name}/{service.methods_by_name[method].name}"


def expiry_step(step: str) -> str:
    """The action of one step of a scheduled expiry run (no RPC is served)."""
    return f"worker.expiry.{step}"


UPDATE_RETENTION_POLICY = rpc("UpdateRetentionPolicy")
RUN_EXPIRY = rpc("RunExpiry")
FILE_GRIEVANCE = rpc("FileGrievance")
ASSIGN_GRIEVANCE = rpc("AssignGrievance")
RESPOND_TO_GRIEVANCE = rpc("RespondToGrievance")
RESOLVE_GRIEVANCE = rpc("ResolveGrievance")
EXPORT_PERSON_DATA = rpc("ExportPersonData")
WITHDRAW_CONSENT = rpc("WithdrawConsent")

START_TRACE = rpc("StartTrace", EXPOSURE_SERVICE)
"""The access an export lists for each trace that used the person's data."""
