"""The door without a stream: unary CheckIn (a device that cannot keep a stream
open), SelfCheckIn (a phone at a venue poster, through a front-end) and
GetEntryDecision (an advisory answer that stores nothing)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import asyncpg
from stopcovid.checkin.v1 import checkin_service_pb2 as pb

from services.checkin.base import CheckInBase, Q, fingerprints
from services.checkin.commit import INBOX, CommitFailed, copy_rows
from services.checkin.scans import DIRECTIONS, REASONS, Ledger
from services.domain.people.tokens import TokenRefused
from services.kernel import errors, tenancy, validation
from services.kernel.db import one
from services.kernel.rpc import Context


class DoorRpcs(CheckInBase):
    # -- unary check-ins -------------------------------------------------------

    async def CheckIn(self, request: pb.CheckInRequest, context: Context) -> pb.CheckInResponse:
        """One scan as the device's writer: the epoch, the lookup and the row in one
        transaction, so calls of one device serialize on its epoch row and each
        sees what the one before it stored. Ends the device's open stream."""
        device = await self._device_of_caller()
        venue = await self.caches.venue(device.venue_id)
        scan = request.scan
        async with self._pool.acquire() as conn, conn.transaction():
            epoch = int(await conn.fetchval(Q["take_device"], device.device_id))
            water = one(await conn.fetchrow(Q["device_high_water"], device.device_id))
            ledger = Ledger(int(water["high_water"] or 0), int(water["retired_through"]))
            lookup = ledger.needs_lookup([scan])
            if lookup:
                found = await conn.fetch(Q["stored_scans"], device.device_id, lookup)
                ledger.recalled(fingerprints(found))
            results, rows, _ = self.decider.decide([scan], venue, device.device_id, ledger)
            if rows:
                await copy_rows(conn, INBOX, rows)
        self._supersede(device.device_id, epoch)
        return pb.CheckInResponse(result=results[0])

    async def _submit_or_unavailable(self, rows: list[Any]) -> None:
        try:
            await self.committer.submit(rows)
        except CommitFailed:
            raise errors.Unavailable("the database is unavailable; retry") from None

    async def SelfCheckIn(
        self, request: pb.SelfCheckInRequest, context: Context
    ) -> pb.SelfCheckInResponse:
        request_id = validation.optional_uuid(request.request_id, "request_id")
        if request.direction not in DIRECTIONS:
            raise errors.InvalidArgument(
                "direction must be SCAN_DIRECTION_ENTRY or SCAN_DIRECTION_EXIT", field="direction"
            )
        if not request.HasField("scan_time"):
            raise errors.InvalidArgument("scan_time is required", field="scan_time")
        try:
            venue_id = self._venue_codes.verify(request.venue_code)
        except TokenRefused as refused:
            reason = REASONS[refused.problem]
            return pb.SelfCheckInResponse(
                result=pb.ScanResult(outcome=pb.SCAN_OUTCOME_REJECTED, reject_reason=reason)
            )
        venue = await self.caches.venue(venue_id)
        if venue is None:
            return pb.SelfCheckInResponse(
                result=pb.ScanResult(
                    outcome=pb.SCAN_OUTCOME_REJECTED,
                    reject_reason=pb.SCAN_REJECT_REASON_VENUE_NOT_FOUND,
                )
            )
        reply = {"venue_id": str(venue_id), "venue_display_name": venue.display_name}
        requester = tenancy.request_owner()
        if request_id is not None:
            earlier = await self._pool.fetchrow(Q["get_self_checkin"], requester, request_id)
            if earlier is not None:
                return pb.SelfCheckInResponse(result=self._replayed(earlier), **reply)
        scan = pb.Scan(
            sequence=0,
            personal_token=request.personal_token,
            scan_time=request.scan_time,
            direction=request.direction,
        )
        results, rows, _ = self.decider.decide([scan], venue, None, None)
        result = results[0]
        if not rows:
            return pb.SelfCheckInResponse(result=result, **reply)
        if request_id is None:
            await self._submit_or_unavailable(rows)
            return pb.SelfCheckInResponse(result=result, **reply)
        # With a request id: the claim and the row commit together, so a retry finds
        # the first answer or nothing at all.
        outcome = "denied" if result.outcome == pb.SCAN_OUTCOME_DENIED else "admitted"
        decision = uuid.UUID(result.decision_id) if result.decision_id else None
        async with self._pool.acquire() as conn, conn.transaction():
            claimed = await conn.fetchval(
                Q["claim_self_checkin"], request_id, venue_id, outcome, decision, requester
            )
            if claimed is None:
                earlier = one(await conn.fetchrow(Q["get_self_checkin"], requester, request_id))
                return pb.SelfCheckInResponse(result=self._replayed(earlier), **reply)
            await copy_rows(conn, INBOX, rows)
        return pb.SelfCheckInResponse(result=result, **reply)

    @staticmethod
    def _replayed(row: asyncpg.Record) -> pb.ScanResult:
        if row["outcome"] == "denied":
            return pb.ScanResult(
                outcome=pb.SCAN_OUTCOME_DENIED, decision_id=str(row["decision_id"])
            )
        return pb.ScanResult(outcome=pb.SCAN_OUTCOME_ADMITTED)

    async def GetEntryDecision(
        self, request: pb.GetEntryDecisionRequest, context: Context
    ) -> pb.GetEntryDecisionResponse:
        device = await self._device_of_caller()
        venue = await self.caches.venue(device.venue_id)
        now_us = int(time.time() * 1e6)
        if venue is None or not venue.active:
            return pb.GetEntryDecisionResponse(
                outcome=pb.SCAN_OUTCOME_REJECTED,
                reject_reason=pb.SCAN_REJECT_REASON_VENUE_SUSPENDED,
            )
        try:
            person = self.decider.person_at(request.personal_token, now_us)
        except TokenRefused as refused:
            reason = REASONS[refused.problem]
            return pb.GetEntryDecisionResponse(
                outcome=pb.SCAN_OUTCOME_REJECTED, reject_reason=reason
            )
        if self.caches.is_high_risk(person, now_us / 1e6):
            return pb.GetEntryDecisionResponse(outcome=pb.SCAN_OUTCOME_DENIED)
        return pb.GetEntryDecisionResponse(outcome=pb.SCAN_OUTCOME_ADMITTED)
