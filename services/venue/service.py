"""VenueService: venues, the scanner devices at them and their credentials, and the
signed venue QR codes and posters phones scan for self check-in.

Venues and devices belong to an organisation (services/kernel/tenancy.py): a
venue operator's queries carry its organisation in their WHERE clauses, so it
reads and changes only its own; a venue or device of another organisation is
PERMISSION_DENIED (NOT_YOUR_VENUE, NOT_YOUR_DEVICE), audited. MPTC staff act on
every organisation's, and each of their calls, reads included, is audited with
the owner acted on.

Device credentials are client certificates from the devices CA (CN = device id,
OU = ROLE_DEVICE), the only CA key a Venue server holds (services/kernel/pki.py).
That key and the venue signing key are read lazily, on the first call that needs
them, so a Venue server without them still serves venues, and such a call fails
with FAILED_PRECONDITION naming what is missing.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from pathlib import Path
from typing import Any, NoReturn

import asyncpg
import structlog
from cryptography import x509
from google.protobuf import duration_pb2
from stopcovid.venue.v1 import venue_service_pb2 as pb
from stopcovid.venue.v1 import venue_service_pb2_grpc as pb_grpc

from services.domain.people.tokens import VenueCodes
from services.domain.places import regions
from services.kernel import audit, db, errors, keys, keystores, pagination, pki, tenancy, validation
from services.kernel.auth import current_principal
from services.kernel.config import Settings
from services.kernel.db import load_queries, one
from services.kernel.rpc import Context, timestamp
from services.venue import poster, typeset

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


_DEVICE_STATES_BACK = {"active": pb.DEVICE_STATE_ACTIVE, "revoked": pb.DEVICE_STATE_REVOKED}
DEVICE_ROLE = pki.DEVICE_ROLE
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


def device_to_proto(row: asyncpg.Record) -> pb.Device:
    """A devices row joined with its last stored sequence (column last_sequence)."""
    device = pb.Device(
        device_id=str(row["device_id"]),
        venue_id=str(row["venue_id"]),
        display_name=row["display_name"],
        state=_DEVICE_STATES_BACK[row["state"]],
        create_time=timestamp(row["create_time"]),
        certificate_serial=row["certificate_serial"],
        last_sequence=row["last_sequence"],
        owner_organization=row["owner_organization"],
    )
    if row["revoke_time"] is not None:
        device.revoke_time.CopyFrom(timestamp(row["revoke_time"]))
    return device


def _venue_not_found() -> errors.NotFound:
    return errors.NotFound("no venue with this venue_id", metadata={"resource": "venue"})


def _venue_suspended(venue_id: uuid.UUID) -> errors.FailedPrecondition:
    return errors.FailedPrecondition(
        "the venue is suspended; resume it first",
        reason="VENUE_SUSPENDED",
        metadata={"venue_id": str(venue_id)},
    )


def _device_not_found() -> errors.NotFound:
    return errors.NotFound("no device with this device_id", metadata={"resource": "device"})


def _acted_on(owner: str) -> dict[str, str]:
    """Audit details of an act of MPTC staff on `owner`'s venue or device, saying
    so; nothing for a venue operator, who acts only on its own organisation's."""
    if tenancy.is_mptc_staff():
        return {"acting_as": "mptc_staff", "owner_organization": owner}
    return {}


class VenueService(pb_grpc.VenueServiceServicer):
    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        # At start-up, not at the first poster: a server that would print Khmer
        # unshaped must not start at all.
        typeset.require_shaping()
        self._pool = pool
        self._settings = settings
        self._authority: tuple[pki.Authority, bytes] | None = None
        self._keystore: keys.KeyStore | None = None

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
            await audit.record(
                conn, "venue.create", "venue", str(row["venue_id"]), _acted_on(owner)
            )
        log.info("venue_created", venue_id=str(row["venue_id"]))
        return pb.CreateVenueResponse(venue=to_proto(row))

    async def GetVenue(self, request: pb.GetVenueRequest, context: Context) -> pb.GetVenueResponse:
        venue_id = validation.uuid_id(request.venue_id, "venue_id")
        row = await self._pool.fetchrow(Q["get_venue"], venue_id, tenancy.scope())
        if row is None:
            await self._venue_refused(venue_id)
        await self._staff_read("venue", str(venue_id), row["owner_organization"])
        return pb.GetVenueResponse(venue=to_proto(row))

    async def _venue_refused(self, venue_id: uuid.UUID) -> NoReturn:
        """After a scoped query found no venue: NOT_FOUND when none exists, else
        the venue is another organisation's (PERMISSION_DENIED, NOT_YOUR_VENUE,
        audited with its owner)."""
        owner = await self._pool.fetchval(Q["venue_owner"], venue_id)
        await self._refuse("venue", venue_id, owner, _venue_not_found(), "NOT_YOUR_VENUE")

    async def _device_refused(self, device_id: uuid.UUID) -> NoReturn:
        """As _venue_refused, for a device (NOT_YOUR_DEVICE)."""
        owner = await self._pool.fetchval(Q["device_owner"], device_id)
        await self._refuse("device", device_id, owner, _device_not_found(), "NOT_YOUR_DEVICE")

    async def _refuse(
        self,
        kind: str,
        resource_id: uuid.UUID,
        owner: str | None,
        missing: errors.NotFound,
        reason: str,
    ) -> NoReturn:
        if owner is None:
            raise missing
        await tenancy.refuse(
            self._pool,
            kind,
            str(resource_id),
            errors.PermissionDenied(
                f"the {kind} belongs to another organisation",
                reason=reason,
                metadata={f"{kind}_id": str(resource_id)},
            ),
            details=self._refusal_details(owner),
        )

    @staticmethod
    def _refusal_details(owner: str) -> dict[str, str]:
        return {
            "owner_organization": owner,
            "caller_organization": current_principal().organization,
        }

    async def _staff_read(self, resource_type: str, resource_id: str, owner: str) -> None:
        """A read by MPTC staff is an act on another organisation's venue too:
        audited as such. Nobody else's reads are."""
        if tenancy.is_mptc_staff():
            async with self._pool.acquire() as conn:
                await audit.record(
                    conn, audit.rpc_action(), resource_type, resource_id, _acted_on(owner)
                )

    async def _staff_list(self, resource_type: str, count: int) -> None:
        """A list by MPTC staff spans every organisation: audited with its count."""
        if tenancy.is_mptc_staff():
            async with self._pool.acquire() as conn:
                await audit.record(
                    conn,
                    audit.rpc_action(),
                    resource_type,
                    "",
                    {"acting_as": "mptc_staff", "listed": count},
                )

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
        after_time, after_id = pagination.time_and_id(request.page_token, filters)
        rows = await self._pool.fetch(
            Q["list_venues"], state, region, after_time, after_id, size + 1, tenancy.scope()
        )
        rows, token = pagination.page(
            rows, size, filters, pagination.time_id_key("create_time", "venue_id")
        )
        await self._staff_list("venue", len(rows))
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
                {"fields": paths, **_acted_on(row["owner_organization"])},
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
                {**({"reason": reason} if reason else {}), **_acted_on(owner)},
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
                raise _venue_not_found()
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
                {**_acted_on(before), "new_owner_organization": owner, "reason": reason},
            )
        log.info("venue_transferred", venue_id=str(venue_id))
        return pb.TransferVenueResponse(venue=to_proto(row))

    # -- devices -----------------------------------------------------------------

    def _ca(self) -> tuple[pki.Authority, bytes]:
        """The devices CA and the root's certificate (PEM), loaded on first use and
        kept for the servicer's life.

        A failure is not kept: once an operator installs the key, the next call
        works without a restart. Any CA but a devices CA is refused: it would mint
        certificates the other servers refuse anyway."""
        if self._authority is None:
            directory = self._settings.pki_dir
            stem = pki.Purpose.DEVICES.stem
            try:
                authority = pki.Authority.load(directory / f"{stem}.pem", directory / f"{stem}.key")
                if authority.purpose is not pki.Purpose.DEVICES:
                    raise pki.PkiError("not a devices CA")
                root = self._settings.tls_paths[0].read_bytes()
            except (OSError, ValueError) as exc:
                log.error(
                    "device_ca_unavailable",
                    pki_dir=str(directory),
                    error_type=type(exc).__name__,
                )
                raise errors.FailedPrecondition(
                    "this Venue server cannot issue device certificates: the devices CA "
                    f"certificate and key ({stem}.pem, {stem}.key) are not installed in its "
                    "PKI directory; see the server log",
                    metadata={"missing": "ca_key"},
                ) from None
            self._authority = (authority, root)
        return self._authority

    async def RegisterDevice(
        self, request: pb.RegisterDeviceRequest, context: Context
    ) -> pb.RegisterDeviceResponse:
        """Registers a device at an active venue and issues its certificate.

        With a CSR the device keeps its private key and none is returned; without one
        the server makes a key pair and returns the private key once (it is in no
        table, log or audit record). The certificate is issued before the device row
        is written, since the row holds its serial; if the transaction then fails,
        the certificate names a device that does not exist, which the CheckIn
        servers refuse like any unknown device."""
        venue_id = validation.uuid_id(request.device.venue_id, "device.venue_id")
        display_name = validation.text(
            request.device.display_name, "device.display_name", max_len=200
        )
        public_key = None
        if request.certificate_signing_request_pem:
            try:
                public_key = pki.csr_public_key(request.certificate_signing_request_pem.encode())
            except pki.CsrRefused as refused:
                raise errors.InvalidArgument(
                    str(refused), field="certificate_signing_request_pem"
                ) from None
        authority, root_pem = self._ca()
        device_id = uuid.uuid4()
        principal = current_principal()
        org = tenancy.scope()
        async with self._pool.acquire() as conn, conn.transaction():
            venue = await conn.fetchrow(Q["get_venue_for_share"], venue_id, org)
            if venue is None:
                # Before any certificate is issued: another organisation's venue
                # gets no credential.
                await self._venue_refused(venue_id)
            if venue["state"] != "active":
                raise _venue_suspended(venue_id)
            issued = authority.issue_client(str(device_id), DEVICE_ROLE, public_key=public_key)
            cert = x509.load_pem_x509_certificate(issued.certificate_pem)
            serial = f"{cert.serial_number:x}"  # as auth.Principal.certificate_serial
            row = one(
                await conn.fetchrow(
                    Q["insert_device"],
                    device_id,
                    venue_id,
                    display_name,
                    serial,
                    cert.not_valid_after_utc,
                    principal.name,
                    org,
                )
            )
            key_source = "csr" if public_key is not None else "server"
            await audit.record(
                conn,
                "device.register",
                "device",
                str(device_id),
                {
                    "venue_id": str(venue_id),
                    "certificate_serial": serial,
                    "key": key_source,
                    **_acted_on(row["owner_organization"]),
                },
            )
        log.info(
            "device_registered", device_id=str(device_id), venue_id=str(venue_id), key=key_source
        )
        return pb.RegisterDeviceResponse(
            device=device_to_proto(row),
            credential=pb.DeviceCredential(
                certificate_pem=issued.chain_pem.decode(),
                private_key_pem=issued.private_key_pem.decode(),
                ca_certificate_pem=root_pem.decode(),
                expire_time=timestamp(cert.not_valid_after_utc),
            ),
        )

    async def GetDevice(
        self, request: pb.GetDeviceRequest, context: Context
    ) -> pb.GetDeviceResponse:
        device_id = validation.uuid_id(request.device_id, "device_id")
        row = await self._pool.fetchrow(Q["get_device"], device_id, tenancy.scope())
        if row is None:
            await self._device_refused(device_id)
        await self._staff_read("device", str(device_id), row["owner_organization"])
        return pb.GetDeviceResponse(device=device_to_proto(row))

    async def ListDevices(
        self, request: pb.ListDevicesRequest, context: Context
    ) -> pb.ListDevicesResponse:
        """Devices by registration (oldest first); with `venue_id`, only that venue's.
        An unknown venue_id lists nothing rather than NOT_FOUND: it is a filter."""
        size = pagination.page_size(request.page_size)
        venue_id = validation.optional_uuid(request.venue_id, "venue_id")
        filters = {"venue_id": str(venue_id) if venue_id else None}
        after_time, after_id = pagination.time_and_id(request.page_token, filters)
        rows = await self._pool.fetch(
            Q["list_devices"], venue_id, after_time, after_id, size + 1, tenancy.scope()
        )
        rows, token = pagination.page(
            rows, size, filters, pagination.time_id_key("create_time", "device_id")
        )
        await self._staff_list("device", len(rows))
        return pb.ListDevicesResponse(
            devices=[device_to_proto(r) for r in rows], next_page_token=token
        )

    async def RevokeDevice(
        self, request: pb.RevokeDeviceRequest, context: Context
    ) -> pb.RevokeDeviceResponse:
        """Revokes a device for good. The row update fires the devices_notify trigger,
        on which every CheckIn server closes the device's streams.

        Idempotent like SuspendVenue: revoking a revoked device returns it as it is
        (the first revocation's time and reason stand) and records no new audit
        event, because nothing changed. The reason is still required and checked,
        so a bad request is refused the same way whatever the device's state."""
        device_id = validation.uuid_id(request.device_id, "device_id")
        reason = validation.text(request.reason, "reason", max_len=500)
        org = tenancy.scope()
        async with self._pool.acquire() as conn, conn.transaction():
            current = await conn.fetchrow(Q["get_device_for_update"], device_id, org)
            if current is None:
                await self._device_refused(device_id)
            if current["state"] == "revoked":
                await self._staff_read("device", str(device_id), current["owner_organization"])
                return pb.RevokeDeviceResponse(device=device_to_proto(current))
            row = one(await conn.fetchrow(Q["revoke_device"], device_id, reason, org))
            await audit.record(
                conn,
                "device.revoke",
                "device",
                str(device_id),
                {
                    "reason": reason,
                    "certificate_serial": row["certificate_serial"],
                    **_acted_on(row["owner_organization"]),
                },
            )
        log.info("device_revoked", device_id=str(device_id))
        return pb.RevokeDeviceResponse(device=device_to_proto(row))

    # -- venue codes and posters ---------------------------------------------------

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
        row = await self._pool.fetchrow(Q["get_venue"], venue_id, tenancy.scope())
        if row is None:
            await self._venue_refused(venue_id)
        await self._staff_read("venue", str(venue_id), row["owner_organization"])
        if row["state"] != "active":
            raise _venue_suspended(venue_id)
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
