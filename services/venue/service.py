"""VenueService: venues (create, read, list, update, suspend, resume, transfer
between organisations by MPTC staff) and the signed venue QR codes and posters
phones scan for self check-in; the device RPCs come from devices.py, the
tenancy refusals and audit steps they share from base.py.

The venue signing key is read lazily, on the first call that needs it, so a
Venue server without it still serves venues, and such a call fails with
FAILED_PRECONDITION naming what is missing.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import structlog
from google.protobuf import duration_pb2
from stopcovid.venue.v1 import venue_service_pb2 as pb

from services.domain.people.tokens import VenueCodes
from services.domain.places import regions
from services.kernel import audit, db, errors, keys, keystores, pagination, pki, tenancy, validation
from services.kernel.auth import current_principal
from services.kernel.db import load_queries, one
from services.kernel.rpc import Context, timestamp
from services.venue import poster
from services.venue.base import acted_on, venue_not_found, venue_suspended
from services.venue.devices import DeviceRpcs

log = structlog.get_logger()

Q = load_queries(Path(__file__).with_name("queries.sql"))

_SETTINGS = {pb.VENUE_SETTING_INDOOR: "indoor", pb.VENUE_SETTING_OUTDOOR: "outdoor"}
_SETTINGS_BACK = {v: k for k, v in _SETTINGS.items()}
_STATES = {pb.VENUE_STATE_ACTIVE: "active", pb.VENUE_STATE_SUSPENDED: "suspended"}
_STATES_BACK = {v: k for k, v in _STATES.items()}
_MIN_STAY, _MAX_STAY = dt.timedelta(minutes=5), dt.timedelta(hours=12)
DEFAULT_STAY = dt.timedelta(hours=1)
UPDATABLE = ("display_name", "setting", "address", "region_code", "capacity", "default_stay")


def to_proto(row: asyncpg.Record) -> pb.Venue:
    stay = duration_pb2.Duration()
    stay.FromTimedelta(row["default_stay"])
    return pb.Venue(
        venue_id=str(row["venue_id"]),
        display_name=row["display_name"],
        setting=_SETTINGS_BACK[row["setting"]],
        address=row["address"],
        region_code=row["region_code"],
        capacity=row["capacity"],
        default_stay=stay,
        state=_STATES_BACK[row["state"]],
        suspend_reason=row["suspend_reason"],
        create_time=timestamp(row["create_time"]),
        update_time=timestamp(row["update_time"]),
        etag=str(row["version"]),
        owner_organization=row["owner_organization"],
    )


def _fields(venue: pb.Venue, prefix: str = "venue") -> dict[str, Any]:
    """Validate the writable fields of `venue`; field names in errors are full paths.

    The result is ordered as UPDATABLE, which is the order of the columns in the
    insert_venue and update_venue queries."""
    if venue.setting not in _SETTINGS:
        raise errors.InvalidArgument(
            "setting must be VENUE_SETTING_INDOOR or VENUE_SETTING_OUTDOOR",
            field=f"{prefix}.setting",
        )
    region = regions.province(venue.region_code, f"{prefix}.region_code").code
    if not 0 <= venue.capacity <= 1_000_000:
        raise errors.InvalidArgument(
            "capacity must be between 0 and 1000000", field=f"{prefix}.capacity"
        )
    stay = (
        validation.duration(
            venue.default_stay, f"{prefix}.default_stay", low=_MIN_STAY, high=_MAX_STAY
        )
        if venue.HasField("default_stay")
        else DEFAULT_STAY
    )
    return {
        "display_name": validation.text(venue.display_name, f"{prefix}.display_name", max_len=200),
        "setting": _SETTINGS[venue.setting],
        "address": validation.text(venue.address, f"{prefix}.address", min_len=0, max_len=500),
        "region_code": region,
        "capacity": venue.capacity,
        "default_stay": stay,
    }


_POSTERS = {
    pb.POSTER_FORMAT_PNG: (poster.render_png, "image/png"),
    pb.POSTER_FORMAT_SVG: (poster.render_svg, "image/svg+xml"),
    pb.POSTER_FORMAT_PDF: (poster.render_pdf, "application/pdf"),
}
_POSTER_SIZES = {
    pb.POSTER_SIZE_UNSPECIFIED: poster.A4,
    pb.POSTER_SIZE_A4: poster.A4,
    pb.POSTER_SIZE_A6: poster.A6,
}


class VenueService(DeviceRpcs):
    """Venues, their QR codes and posters; devices (DeviceRpcs) and the steps both
    share (VenueBase)."""

    async def CreateVenue(
        self, request: pb.CreateVenueRequest, context: Context
    ) -> pb.CreateVenueResponse:
        f = _fields(request.venue)
        request_id = validation.optional_uuid(request.request_id, "request_id")
        principal = current_principal()
        owner = tenancy.owner_of_new(principal)
        requester = tenancy.request_owner(principal)
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                Q["insert_venue"],
                uuid.uuid4(),
                *f.values(),
                principal.name,
                request_id,
                owner,
                requester,
            )
            if row is None:
                # A retry by this caller of a create that already happened: answer as
                # the first time. Another caller's request_id never conflicts.
                row = one(await conn.fetchrow(Q["venue_by_request"], requester, request_id))
                return pb.CreateVenueResponse(venue=to_proto(row))
            await audit.record(conn, "venue.create", "venue", str(row["venue_id"]), acted_on(owner))
        log.info("venue_created", venue_id=str(row["venue_id"]))
        return pb.CreateVenueResponse(venue=to_proto(row))

    async def GetVenue(self, request: pb.GetVenueRequest, context: Context) -> pb.GetVenueResponse:
        venue_id = validation.uuid_id(request.venue_id, "venue_id")
        row = await self._scoped_read("venue", Q["get_venue"], venue_id, self._venue_refused)
        return pb.GetVenueResponse(venue=to_proto(row))

    async def ListVenues(
        self, request: pb.ListVenuesRequest, context: Context
    ) -> pb.ListVenuesResponse:
        size = pagination.page_size(request.page_size)
        if request.state and request.state not in _STATES:
            raise errors.InvalidArgument("state is not a known VenueState", field="state")
        state = _STATES.get(request.state)
        # Exact and checked: a misspelt province is an error, not an empty list.
        region = (
            regions.province(request.region_code, "region_code").code
            if request.region_code.strip()
            else None
        )
        filters = {"state": state, "region": region}
        rows, token = await self._scoped_page(
            "venue",
            Q["list_venues"],
            [state, region],
            filters,
            page_token=request.page_token,
            size=size,
        )
        return pb.ListVenuesResponse(venues=[to_proto(r) for r in rows], next_page_token=token)

    async def UpdateVenue(
        self, request: pb.UpdateVenueRequest, context: Context
    ) -> pb.UpdateVenueResponse:
        venue_id = validation.uuid_id(request.venue.venue_id, "venue.venue_id")
        paths = validation.mask_paths(request.update_mask.paths, UPDATABLE, "update_mask")
        if not paths:
            raise errors.InvalidArgument(
                "update_mask must name the fields to change", field="update_mask"
            )
        org = tenancy.scope()
        async with self._pool.acquire() as conn, conn.transaction():
            current = await conn.fetchrow(Q["get_venue_for_update"], venue_id, org)
            if current is None:
                await self._venue_refused(venue_id)
            if request.etag and request.etag != str(current["version"]):
                raise errors.Aborted(
                    "the venue changed since it was read; get it again and retry",
                    metadata={"current_etag": str(current["version"])},
                )
            merged = to_proto(current)
            for path in paths:
                if path == "default_stay" and not request.venue.HasField("default_stay"):
                    merged.ClearField("default_stay")
                else:
                    setattr_from(merged, request.venue, path)
            f = _fields(merged)
            row = one(await conn.fetchrow(Q["update_venue"], venue_id, *f.values(), org))
            await audit.record(
                conn,
                "venue.update",
                "venue",
                str(venue_id),
                {"fields": paths, **acted_on(row["owner_organization"])},
            )
        return pb.UpdateVenueResponse(venue=to_proto(row))

    async def _set_state(self, venue_id: uuid.UUID, state: str, reason: str) -> asyncpg.Record:
        org = tenancy.scope()
        async with self._pool.acquire() as conn, conn.transaction():
            current = await conn.fetchrow(Q["get_venue_for_update"], venue_id, org)
            if current is None:
                await self._venue_refused(venue_id)
            owner = current["owner_organization"]
            if current["state"] == state:
                # Idempotent: nothing changes, nothing to audit; but staff's act is.
                await self._staff_read("venue", str(venue_id), owner)
                return current
            row = one(await conn.fetchrow(Q["set_venue_state"], venue_id, state, reason, org))
            await audit.record(
                conn,
                f"venue.{'suspend' if state == 'suspended' else 'resume'}",
                "venue",
                str(venue_id),
                {**({"reason": reason} if reason else {}), **acted_on(owner)},
            )
        log.info("venue_state_changed", venue_id=str(venue_id), state=state)
        return row

    async def SuspendVenue(
        self, request: pb.SuspendVenueRequest, context: Context
    ) -> pb.SuspendVenueResponse:
        venue_id = validation.uuid_id(request.venue_id, "venue_id")
        reason = validation.text(request.reason, "reason", max_len=500)
        return pb.SuspendVenueResponse(
            venue=to_proto(await self._set_state(venue_id, "suspended", reason))
        )

    async def ResumeVenue(
        self, request: pb.ResumeVenueRequest, context: Context
    ) -> pb.ResumeVenueResponse:
        venue_id = validation.uuid_id(request.venue_id, "venue_id")
        return pb.ResumeVenueResponse(venue=to_proto(await self._set_state(venue_id, "active", "")))

    async def TransferVenue(
        self, request: pb.TransferVenueRequest, context: Context
    ) -> pb.TransferVenueResponse:
        """Only MPTC staff may call it (the role table), and they act on every
        venue, so there is no organisation to compare with."""
        venue_id = validation.uuid_id(request.venue_id, "venue_id")
        owner = request.owner_organization.strip()
        if not pki.PRINCIPAL_NAME.match(owner):
            raise errors.InvalidArgument(
                "owner_organization must be 1-63 lowercase letters, digits, '.' or '-'",
                field="owner_organization",
            )
        reason = validation.text(request.reason, "reason", max_len=500)
        async with self._pool.acquire() as conn, conn.transaction():
            current = await conn.fetchrow(Q["get_venue_for_update"], venue_id, None)
            if current is None:
                raise venue_not_found()
            before = current["owner_organization"]
            if before == owner:
                await self._staff_read("venue", str(venue_id), before)
                return pb.TransferVenueResponse(venue=to_proto(current))
            row = one(await conn.fetchrow(Q["transfer_venue"], venue_id, owner))
            await conn.execute(Q["transfer_devices"], venue_id, owner)
            await audit.record(
                conn,
                audit.rpc_action(),
                "venue",
                str(venue_id),
                {**acted_on(before), "new_owner_organization": owner, "reason": reason},
            )
        log.info("venue_transferred", venue_id=str(venue_id))
        return pb.TransferVenueResponse(venue=to_proto(row))

    # -- devices -----------------------------------------------------------------

    def _venue_codes(self) -> VenueCodes:
        """A signer with the key store's current venue key.

        The key store (and its KEK) is opened once; the current key is read on each
        call, which is rare (codes are printed, not fetched per visit), so a rotated
        venue key is used at once."""
        try:
            if self._keystore is None:
                self._keystore = keystores.open_for(self._settings, db.SERVICE_ROLES["venue"])
            kid, key = self._keystore.venue_signing_key()
        except (SystemExit, keys.KeyError_, OSError, ValueError) as exc:
            # load_kek reports a missing KEK with SystemExit, meant for start-up; here
            # it must become an answer, not end the server.
            log.error(
                "venue_signing_key_unavailable",
                keystore_dir=str(self._settings.keystore_dir),
                error_type=type(exc).__name__,
            )
            raise errors.FailedPrecondition(
                "this Venue server cannot sign venue codes: its key store or KEK is not "
                "available; see the server log",
                metadata={"missing": "venue_signing_key"},
            ) from None
        return VenueCodes({kid: key.public_key()}, signing=(kid, key))

    async def _signed_code(self, venue_id: uuid.UUID) -> tuple[asyncpg.Record, str, str]:
        """(venue, payload, key id) for an active venue.

        A suspended venue gets FAILED_PRECONDITION (VENUE_SUSPENDED): its self
        check-ins are refused, so printing its code now would only mislead. The code
        itself does not depend on the state, so posters printed before a suspension
        work again once the venue is resumed."""
        row = await self._scoped_read("venue", Q["get_venue"], venue_id, self._venue_refused)
        if row["state"] != "active":
            raise venue_suspended(venue_id)
        payload, kid = self._venue_codes().sign(venue_id)
        return row, payload, kid

    async def GetVenueQrCode(
        self, request: pb.GetVenueQrCodeRequest, context: Context
    ) -> pb.GetVenueQrCodeResponse:
        venue_id = validation.uuid_id(request.venue_id, "venue_id")
        _, payload, kid = await self._signed_code(venue_id)
        return pb.GetVenueQrCodeResponse(payload=payload, key_id=kid)

    async def RenderVenuePoster(
        self, request: pb.RenderVenuePosterRequest, context: Context
    ) -> pb.RenderVenuePosterResponse:
        """A printable poster; rendered in a worker thread, since a 300 dpi page or a
        font subset costs tens to hundreds of milliseconds of CPU that would
        otherwise stall every other call."""
        venue_id = validation.uuid_id(request.venue_id, "venue_id")
        found = _POSTERS.get(request.format)
        if found is None:
            raise errors.InvalidArgument(
                "format must be POSTER_FORMAT_PNG, POSTER_FORMAT_SVG or POSTER_FORMAT_PDF",
                field="format",
            )
        page = _POSTER_SIZES.get(request.size)
        if page is None:
            raise errors.InvalidArgument(
                "size must be POSTER_SIZE_A4 or POSTER_SIZE_A6 (unset means A4)", field="size"
            )
        render, content_type = found
        row, payload, _ = await self._signed_code(venue_id)
        try:
            content = await asyncio.to_thread(render, row["display_name"], payload, page)
        except poster.Unrenderable as refused:
            # Venue names are not personal data; the message names code points only.
            raise errors.FailedPrecondition(
                f"the venue's display_name cannot be printed: {refused}; update the venue",
                metadata={"field": "venue.display_name"},
            ) from None
        return pb.RenderVenuePosterResponse(content=content, content_type=content_type)


def setattr_from(target: pb.Venue, source: pb.Venue, path: str) -> None:
    """Copy one top-level field from `source` to `target` (message fields included)."""
    if path == "default_stay":
        target.default_stay.CopyFrom(source.default_stay)
    else:
        setattr(target, path, getattr(source, path))
