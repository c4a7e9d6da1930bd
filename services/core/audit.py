"""Audit records, written in the same transaction as the change they describe, so
an action and its record commit or vanish together.

Details hold ids and reasons only, never personal data.
"""

from __future__ import annotations

import json
from typing import Any

from services.core.auth import current_principal
from services.core.db import Conn

_INSERT = """
INSERT INTO audit_events (principal, role, action, resource_type, resource_id, details)
VALUES ($1, $2, $3, $4, $5, $6::jsonb)
"""


async def record(
    conn: Conn,
    action: str,
    resource_type: str,
    resource_id: str,
    details: dict[str, Any] | None = None,
) -> None:
    principal = current_principal()
    await conn.execute(
        _INSERT,
        principal.name,
        principal.role,
        action,
        resource_type,
        resource_id,
        json.dumps(details or {}, sort_keys=True),
    )
