"""VenueService: venues now; devices, QR codes and posters arrive with the check-in
hot path (they answer UNIMPLEMENTED until then)."""

from __future__ import annotations

import datetime as dt
import re
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import structlog
from google.protobuf import duration_pb2, timestamp_pb2
from stopcovid.venue.v1 import venue_service_pb2 as pb
from stopcovid.venue.v1 import venue_service_pb2_grpc as pb_grpc

from services.core import audit, errors, pagination, validation
from services.core.auth import current_principal
from services.core.config import Settings
from services.core.db import load_queries, one
from services.core.rpc import Context

log = structlog.get_logger()

Q = load_queries(Path(__file__).with_name("queries.sql"))

_SETTINGS = {pb.VENUE_SETTING_INDOOR: "indoor", pb.VENUE_SETTING_OUTDOOR: "outdoor"}
_SETTINGS_BACK = {v: k for k, v in _SETTINGS.items()}
_STATES = {pb.VENUE_STATE_ACTIVE: "active", pb.VENUE_STATE_SUSPENDED: "suspended"}
_STATES_BACK = {v: k for k, v in _STATES.items()}
_REGION = re.compile(r"^[A-Z]{2}(-[A-Z0-9]{1,3})?$")
_MIN_STAY, _MAX_STAY = dt.timedelta(minutes=5), dt.timedelta(hours=12)
DEFAULT_STAY = dt.timedelta(hours=1)
UPDATABLE = ("display_name", "setting", "address", "region_code", "capacity", "default_stay")


def _ts(value: dt.datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


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
        create_time=_ts(row["create_time"]),
        update_time=_ts(row["update_time"]),
        etag=str(row["version"]),
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
    region = venue.region_code.strip()
    if not _REGION.match(region):
        raise errors.InvalidArgument(
            "region_code must be an ISO 3166-2 code such as KH-12", field=f"{prefix}.region_code"
        )
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


class VenueService(pb_grpc.VenueServiceServicer):
    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        self._pool = pool

    async def CreateVenue(
        self, request: pb.CreateVenueRequest, context: Context
    ) -> pb.CreateVenueResponse:
        f = _fields(request.venue)
        request_id = validation.optional_uuid(request.request_id, "request_id")
        principal = current_principal()
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                Q["insert_venue"], uuid.uuid4(), *f.values(), principal.name, request_id
            )
            if row is None:
                # A retry of a create that already happened: answer as the first time.
                row = one(await conn.fetchrow(Q["venue_by_request"], request_id))
                return pb.CreateVenueResponse(venue=to_proto(row))
            await audit.record(conn, "venue.create", "venue", str(row["venue_id"]))
        log.info("venue_created", venue_id=str(row["venue_id"]))
        return pb.CreateVenueResponse(venue=to_proto(row))

    async def GetVenue(self, request: pb.GetVenueRequest, context: Context) -> pb.GetVenueResponse:
        venue_id = validation.uuid_id(request.venue_id, "venue_id")
        row = await self._pool.fetchrow(Q["get_venue"], venue_id)
        if row is None:
            raise errors.NotFound("no venue with this venue_id", metadata={"resource": "venue"})
        return pb.GetVenueResponse(venue=to_proto(row))

    async def ListVenues(
        self, request: pb.ListVenuesRequest, context: Context
    ) -> pb.ListVenuesResponse:
        size = pagination.page_size(request.page_size)
        if request.state and request.state not in _STATES:
            raise errors.InvalidArgument("state is not a known VenueState", field="state")
        state = _STATES.get(request.state)
        region = request.region_code.strip() or None
        filters = {"state": state, "region": region}
        after = pagination.decode(request.page_token, filters)
        after_time: dt.datetime | None = None
        after_id: uuid.UUID | None = None
        if after is not None:
            try:
                after_time = dt.datetime.fromisoformat(after[0])
                after_id = uuid.UUID(after[1])
            except (ValueError, IndexError, TypeError):
                raise errors.InvalidArgument(
                    "page_token is not valid for this query",
                    reason="INVALID_PAGE_TOKEN",
                    field="page_token",
                ) from None
        rows = await self._pool.fetch(
            Q["list_venues"], state, region, after_time, after_id, size + 1
        )
        token = ""
        if len(rows) > size:
            rows = rows[:size]
            last = rows[-1]
            token = pagination.encode(
                [last["create_time"].isoformat(), str(last["venue_id"])], filters
            )
        return pb.ListVenuesResponse(venues=[to_proto(r) for r in rows], next_page_token=token)

    async def UpdateVenue(
        self, request: pb.UpdateVenueRequest, context: Context
    ) -> pb.UpdateVenueResponse:
        venue_id = validation.uuid_id(request.venue.venue_id, "venue.venue_id")
        paths = list(request.update_mask.paths)
        if not paths:
            raise errors.InvalidArgument(
                "update_mask must name the fields to change", field="update_mask"
            )
        unknown = sorted(set(paths) - set(UPDATABLE))
        if unknown:
            raise errors.InvalidArgument(
                f"update_mask names fields that cannot be updated: {', '.join(unknown)}",
                field="update_mask",
            )
        async with self._pool.acquire() as conn, conn.transaction():
            current = await conn.fetchrow(Q["get_venue_for_update"], venue_id)
            if current is None:
                raise errors.NotFound("no venue with this venue_id", metadata={"resource": "venue"})
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
            row = one(await conn.fetchrow(Q["update_venue"], venue_id, *f.values()))
            await audit.record(conn, "venue.update", "venue", str(venue_id), {"fields": paths})
        return pb.UpdateVenueResponse(venue=to_proto(row))

    async def _set_state(self, venue_id: uuid.UUID, state: str, reason: str) -> asyncpg.Record:
        async with self._pool.acquire() as conn, conn.transaction():
            current = await conn.fetchrow(Q["get_venue_for_update"], venue_id)
            if current is None:
                raise errors.NotFound("no venue with this venue_id", metadata={"resource": "venue"})
            if current["state"] == state:
                return current  # idempotent: nothing changes, nothing to audit
            row = one(await conn.fetchrow(Q["set_venue_state"], venue_id, state, reason))
            await audit.record(
                conn,
                f"venue.{'suspend' if state == 'suspended' else 'resume'}",
                "venue",
                str(venue_id),
                {"reason": reason} if reason else {},
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


def setattr_from(target: pb.Venue, source: pb.Venue, path: str) -> None:
    """Copy one top-level field from `source` to `target` (message fields included)."""
    if path == "default_stay":
        target.default_stay.CopyFrom(source.default_stay)
    else:
        setattr(target, path, getattr(source, path))
