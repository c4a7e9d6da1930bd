"""Grievances, data-subject requests, the audit log and transparency figures."""

from __future__ import annotations

from services.retention.base import RetentionBase


class AccountabilityRpcs(RetentionBase):
    pass
