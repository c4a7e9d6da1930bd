"""The Venue server's device RPCs: registering a scanner device at a venue (its
credential, a client certificate from the devices CA, the only CA key a Venue
server holds: services/kernel/pki.py), reading, listing and revoking devices.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import asyncpg
import structlog
from cryptography import x509
from stopcovid.venue.v1 import venue_service_pb2 as pb

from services.kernel import audit, errors, pagination, pki, tenancy, validation
from services.kernel.auth import current_principal
from services.kernel.db import load_queries, one
from services.kernel.rpc import Context, timestamp
from services.venue.base import VenueBase, acted_on, venue_suspended

log = structlog.get_logger()

Q = load_queries(Path(__file__).with_name("queries.sql"))

_DEVICE_STATES_BACK = {"active": pb.DEVICE_STATE_ACTIVE, "revoked": pb.DEVICE_STATE_REVOKED}


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


class DeviceRpcs(VenueBase):
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
                raise venue_suspended(venue_id)
            issued = authority.issue_client(str(device_id), pki.DEVICE_ROLE, public_key=public_key)
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
                    **acted_on(row["owner_organization"]),
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
        row = await self._scoped_read("device", Q["get_device"], device_id, self._device_refused)
        return pb.GetDeviceResponse(device=device_to_proto(row))

    async def ListDevices(
        self, request: pb.ListDevicesRequest, context: Context
    ) -> pb.ListDevicesResponse:
        """Devices by registration (oldest first); with `venue_id`, only that venue's.
        An unknown venue_id lists nothing rather than NOT_FOUND: it is a filter."""
        size = pagination.page_size(request.page_size)
        venue_id = validation.optional_uuid(request.venue_id, "venue_id")
        filters = {"venue_id": str(venue_id) if venue_id else None}
        rows, token = await self._scoped_page(
            "device",
            Q["list_devices"],
            [venue_id],
            filters,
            page_token=request.page_token,
            size=size,
        )
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
                    **acted_on(row["owner_organization"]),
                },
            )
        log.info("device_revoked", device_id=str(device_id))
        return pb.RevokeDeviceResponse(device=device_to_proto(row))

    # -- venue codes and posters ---------------------------------------------------
