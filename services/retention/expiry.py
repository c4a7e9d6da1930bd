"""Retention policies, expiry runs and deletion reports."""

from __future__ import annotations

from services.retention.base import RetentionBase


class ExpiryRpcs(RetentionBase):
    pass
