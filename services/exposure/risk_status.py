"""Risk status: GetRiskStatus and ClearRiskStatus.

A person's level, its basis (never the case) and its expiry, as every CheckIn
server sees it; NONE without a status, once it expired, or once cleared. Every
read is audited. Clearing (a negative test, say) sets the level back to NONE
with its reason; the risk_status_notify trigger admits the person at every door
within a second. Clearing a status that is already NONE changes nothing.
"""

from __future__ import annotations

import datetime as dt
import uuid

import structlog
from stopcovid.common.v1 import common_pb2
from stopcovid.exposure.v1 import exposure_service_pb2 as pb

from services.domain.exposure import risk
from services.exposure import queries
from services.exposure.base import ExposureBase
from services.kernel import errors, validation
from services.kernel.rpc import Context

log = structlog.get_logger()


class RiskRpcs(ExposureBase):
    async def GetRiskStatus(
        self, request: pb.GetRiskStatusRequest, context: Context
    ) -> pb.GetRiskStatusResponse:
        person_id = await self._person(request.person)
        async with self._pool.acquire() as conn, conn.transaction():
            found = await queries.get_risk_status(conn, person_id)
            status = risk.status_to_proto(found, dt.datetime.now(dt.UTC))
            await self._audit(
                conn, ("person", person_id), {"risk_level": common_pb2.RiskLevel.Name(status.level)}
            )
        return pb.GetRiskStatusResponse(risk_status=status)

    async def ClearRiskStatus(
        self, request: pb.ClearRiskStatusRequest, context: Context
    ) -> pb.ClearRiskStatusResponse:
        reason = risk.CLEAR_REASONS.get(request.reason)
        if reason is None:
            raise errors.InvalidArgument("reason must be a known RiskClearReason", field="reason")
        note = validation.text(
            request.note, "note", min_len=1 if reason == "other" else 0, max_len=500
        )
        person_id = await self._person(request.person)
        return pb.ClearRiskStatusResponse(risk_status=await self._clear(person_id, reason, note))

    async def _clear(self, person_id: uuid.UUID, reason: str, note: str) -> common_pb2.RiskStatus:
        """The person's status, cleared for `reason` (audited with `note`) unless it
        is NONE already."""
        async with self._pool.acquire() as conn, conn.transaction():
            now = dt.datetime.now(dt.UTC)
            before = risk.status_to_proto(await queries.get_risk_status(conn, person_id), now)
            if before.level == common_pb2.RISK_LEVEL_NONE:
                return before
            cleared = await queries.clear_risk_status(conn, person_id, reason)
            await self._audit(
                conn,
                ("person", person_id),
                {
                    "previous_level": common_pb2.RiskLevel.Name(before.level),
                    "reason": reason,
                    "note": note,
                },
            )
        log.info("risk_cleared", reason=reason)
        return risk.status_to_proto(cleared, now)
