"""VenueService devices, venue codes and posters, end to end through the typed clients.

A device credential is proven by use: the certificate RegisterDevice returns must
get a device through mutual TLS and the role check of the CheckIn server.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import json
import shutil
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import asyncpg
import pytest
import stopcovid.client as clients
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from PIL import Image, ImageOps, ImageStat
from stopcovid.checkin.v1 import checkin_service_pb2 as checkin_pb
from stopcovid.client import ClientConfig, RetryPolicy, VenueClient
from stopcovid.venue.v1 import venue_service_pb2 as pb

from services.domain.people.tokens import TokenRefused, VenueCodes
from services.kernel import auth, channels, db, pagination
from services.kernel.config import Settings
from services.kernel.keys import open_keystore
from services.venue import poster
from tests.support.database import Query
from tests.support.servers import Pki, Servers, running_servers
from tests.support.venue_helpers import create_venue, venue_client
from tests.support.waits import every_page

SVG = "{http://www.w3.org/2000/svg}"
UNKNOWN = "00000000-0000-4000-8000-000000000000"


def parse_svg(data: bytes) -> ET.Element:
    """Parse a poster this platform rendered (no DTD, no entities: the stdlib parser is
    safe for it, and a strict parser is what proves the escaping)."""
    return ET.fromstring(data)  # noqa: S314


@pytest.fixture
def venues(servers: Servers) -> Iterator[VenueClient]:
    with venue_client(servers) as client:
        yield client


def register(
    client: VenueClient, venue_id: str, name: str = "Front door", csr: str = ""
) -> pb.RegisterDeviceResponse:
    return client.rpc.RegisterDevice(
        pb.RegisterDeviceRequest(
            device=pb.Device(venue_id=venue_id, display_name=name),
            certificate_signing_request_pem=csr,
        )
    )


def make_csr(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey,
    common_name: str = "someone-else",
    unit: str = "ROLE_AUDITOR",
) -> str:
    """A CSR asking for a subject the server must ignore."""
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, algorithm)
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def subject_of(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> list[str]:
    return [str(a.value) for a in cert.subject.get_attributes_for_oid(oid)]


def assert_checkin_accepts(servers: Servers, cert_pem: bytes, key_pem: bytes, ca: bytes) -> None:
    """The credential gets through mutual TLS and the role check of the CheckIn server.

    The CheckIn RPCs are built elsewhere, so any answer past the gate will do; a bad
    certificate would fail the handshake (UNAVAILABLE) or the role check."""
    config = replace(
        ClientConfig(
            target=servers.target("checkin"),
            ca_cert_pem=ca,
            client_cert_pem=cert_pem,
            client_key_pem=key_pem,
        ),
        retry=RetryPolicy(max_attempts=1),
    )
    with clients.CheckInClient(config) as client:
        try:
            client.rpc.GetEntryDecision(
                checkin_pb.GetEntryDecisionRequest(personal_token="S1.t1.AAAA"), timeout=10
            )
        except (clients.Unavailable, clients.Unauthenticated) as err:
            pytest.fail(f"the device credential was refused: {err!r}")
        except (clients.Internal, clients.Unknown) as err:
            pytest.fail(f"the call failed inside the server: {err!r}")
        except clients.StopCovidError as err:
            assert err.reason not in ("ROLE_NOT_ALLOWED", "UNAUTHENTICATED"), err


def test_register_without_csr_issues_a_working_credential(
    servers: Servers, venues: VenueClient, db_conn: Query
) -> None:
    venue = create_venue(venues)
    made = register(venues, venue.venue_id)
    device, credential = made.device, made.credential
    assert uuid.UUID(device.device_id)
    assert device.venue_id == venue.venue_id
    assert device.display_name == "Front door"
    assert device.state == pb.DEVICE_STATE_ACTIVE
    assert device.HasField("create_time") and not device.HasField("revoke_time")
    assert device.last_sequence == 0

    cert = x509.load_pem_x509_certificate(credential.certificate_pem.encode())
    assert subject_of(cert, NameOID.COMMON_NAME) == [device.device_id]
    assert subject_of(cert, NameOID.ORGANIZATIONAL_UNIT_NAME) == ["ROLE_DEVICE"]
    assert device.certificate_serial == f"{cert.serial_number:x}"
    # Issued by the devices CA and presented with it; verified against the root.
    cert.verify_directly_issued_by(servers.pki.cas.devices.certificate)
    devices_ca = servers.pki.cas.devices.certificate_pem
    leaf = cert.public_bytes(serialization.Encoding.PEM)
    assert credential.certificate_pem.encode() == leaf + devices_ca
    assert credential.ca_certificate_pem.encode() == servers.pki.cas.root.certificate_pem
    assert credential.expire_time.ToDatetime(dt.UTC) == cert.not_valid_after_utc
    # The servers read the principal exactly this way, serial format included.
    principal = auth.principal_from_pem(credential.certificate_pem.encode())
    assert (principal.name, principal.role, principal.certificate_serial) == (
        device.device_id,
        "ROLE_DEVICE",
        device.certificate_serial,
    )
    key = serialization.load_pem_private_key(credential.private_key_pem.encode(), None)
    assert key.public_key() == cert.public_key()

    assert_checkin_accepts(
        servers,
        credential.certificate_pem.encode(),
        credential.private_key_pem.encode(),
        credential.ca_certificate_pem.encode(),
    )

    (row,) = db_conn(
        "SELECT certificate_serial, certificate_expire_time, created_by FROM devices"
        " WHERE device_id = $1",
        uuid.UUID(device.device_id),
    )
    assert tuple(row) == (device.certificate_serial, cert.not_valid_after_utc, "dev-venue-operator")
    (audit,) = db_conn(
        "SELECT principal, role, action, resource_type, resource_id, details::text"
        " FROM audit_events WHERE action = 'device.register'"
    )
    assert tuple(audit)[:5] == (
        "dev-venue-operator",
        "ROLE_VENUE_OPERATOR",
        "device.register",
        "device",
        device.device_id,
    )
    assert json.loads(audit[5]) == {
        "venue_id": venue.venue_id,
        "certificate_serial": device.certificate_serial,
        "key": "server",
    }
    # The private key is returned once and kept nowhere.
    stored = db_conn(
        "SELECT row_to_json(d)::text FROM devices d"
        " UNION ALL SELECT row_to_json(a)::text FROM audit_events a"
    )
    assert not any("PRIVATE KEY" in r[0] or "BEGIN" in r[0] for r in stored)


def test_register_with_csr_keeps_the_key_on_the_device(
    servers: Servers, venues: VenueClient, db_conn: Query
) -> None:
    venue = create_venue(venues)
    key = ec.generate_private_key(ec.SECP384R1())
    made = register(venues, venue.venue_id, csr=make_csr(key))
    assert made.credential.private_key_pem == ""
    cert = x509.load_pem_x509_certificate(made.credential.certificate_pem.encode())
    assert cert.public_key() == key.public_key()
    # The CSR asked for another name and role; the CA decides both.
    assert subject_of(cert, NameOID.COMMON_NAME) == [made.device.device_id]
    assert subject_of(cert, NameOID.ORGANIZATIONAL_UNIT_NAME) == ["ROLE_DEVICE"]
    assert made.device.certificate_serial == f"{cert.serial_number:x}"
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    assert_checkin_accepts(
        servers,
        made.credential.certificate_pem.encode(),
        key_pem,
        servers.pki.cas.root.certificate_pem,
    )
    (details,) = db_conn(
        "SELECT details->>'key' FROM audit_events WHERE action = 'device.register'"
    )
    assert details[0] == "csr"


def _tampered_csr() -> str:
    """A P-256 CSR whose signature no longer matches its content."""
    pem = make_csr(ec.generate_private_key(ec.SECP256R1()), common_name="aaaa")
    der = bytearray(x509.load_pem_x509_csr(pem.encode()).public_bytes(serialization.Encoding.DER))
    at = bytes(der).index(b"aaaa")
    der[at] = ord("b")  # the subject is signed; change it and the signature fails
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM).decode()


BAD_CSRS: dict[str, Callable[[Pki], str]] = {
    "garbage": lambda pki: "not a signing request",
    "truncated": lambda pki: make_csr(ec.generate_private_key(ec.SECP256R1()))[:200],
    "certificate": lambda pki: pki.cas.root.certificate_pem.decode(),
    "private-key": lambda pki: (pki.dir / "dev-device.key").read_text(),
    "wrong-signature": lambda pki: _tampered_csr(),
    "rsa-key": lambda pki: make_csr(rsa.generate_private_key(65537, 2048)),
    "ed25519-key": lambda pki: make_csr(ed25519.Ed25519PrivateKey.generate()),
    "p521-key": lambda pki: make_csr(ec.generate_private_key(ec.SECP521R1())),
    "oversized": lambda pki: "-----BEGIN CERTIFICATE REQUEST-----\n" + "A" * 20000,
}


@pytest.mark.parametrize("kind", sorted(BAD_CSRS))
def test_register_refuses_bad_csr(
    servers: Servers, venues: VenueClient, db_conn: Query, kind: str
) -> None:
    venue = create_venue(venues)
    with pytest.raises(clients.InvalidArgument) as caught:
        register(venues, venue.venue_id, csr=BAD_CSRS[kind](servers.pki))
    assert caught.value.reason == "INVALID_ARGUMENT"
    assert caught.value.metadata["field"] == "certificate_signing_request_pem"
    assert [v[0] for v in caught.value.field_violations] == ["certificate_signing_request_pem"]
    assert db_conn("SELECT count(*) FROM devices")[0][0] == 0
    assert db_conn("SELECT count(*) FROM audit_events WHERE action LIKE 'device.%'")[0][0] == 0


@pytest.mark.parametrize(
    ("venue_id", "name", "field"),
    [
        ("", "Front door", "device.venue_id"),
        ("not-a-uuid", "Front door", "device.venue_id"),
        (None, "", "device.display_name"),
        (None, "   ", "device.display_name"),
        (None, "x" * 201, "device.display_name"),
        (None, "door\x00", "device.display_name"),
    ],
)
def test_register_validates_fields_precisely(
    venues: VenueClient, venue_id: str | None, name: str, field: str
) -> None:
    venue = create_venue(venues)
    with pytest.raises(clients.InvalidArgument) as caught:
        register(venues, venue.venue_id if venue_id is None else venue_id, name=name)
    assert caught.value.metadata["field"] == field


def test_register_at_unknown_or_suspended_venue(venues: VenueClient, db_conn: Query) -> None:
    with pytest.raises(clients.NotFound) as missing:
        register(venues, UNKNOWN)
    assert missing.value.reason == "NOT_FOUND"
    assert missing.value.metadata["resource"] == "venue"
    venue = create_venue(venues)
    venues.rpc.SuspendVenue(pb.SuspendVenueRequest(venue_id=venue.venue_id, reason="inspection"))
    with pytest.raises(clients.FailedPrecondition) as suspended:
        register(venues, venue.venue_id)
    assert suspended.value.reason == "VENUE_SUSPENDED"
    assert suspended.value.metadata["venue_id"] == venue.venue_id
    assert db_conn("SELECT count(*) FROM devices")[0][0] == 0
    venues.rpc.ResumeVenue(pb.ResumeVenueRequest(venue_id=venue.venue_id))
    assert register(venues, venue.venue_id).device.state == pb.DEVICE_STATE_ACTIVE


def list_all(client: VenueClient, venue_id: str = "", page_size: int = 2) -> tuple[list[str], int]:
    seen: list[str] = []
    pages = 0
    for page in every_page(
        lambda token: client.rpc.ListDevices(
            pb.ListDevicesRequest(page_size=page_size, page_token=token, venue_id=venue_id)
        )
    ):
        seen += [d.device_id for d in page.devices]
        pages += 1
    return seen, pages


def test_get_and_list_devices(venues: VenueClient, db_conn: Query) -> None:
    market, school = create_venue(venues), create_venue(venues, "School")
    made = [
        register(venues, v.venue_id, name=f"Door {i}").device
        for i, v in enumerate([market, school, market, market, school])
    ]
    ids = [d.device_id for d in made]
    assert list_all(venues) == (ids, 3)
    assert list_all(venues, school.venue_id, page_size=1) == ([ids[1], ids[4]], 2)
    assert list_all(venues, UNKNOWN) == ([], 1)  # a filter, not a lookup

    db_conn(
        "INSERT INTO device_sequences (device_id, last_sequence) VALUES ($1, 41)",
        uuid.UUID(ids[2]),
    )
    got = venues.rpc.GetDevice(pb.GetDeviceRequest(device_id=ids[2])).device
    assert got.last_sequence == 41
    expected = pb.Device()
    expected.CopyFrom(made[2])
    expected.last_sequence = 41
    assert got == expected
    listed = venues.rpc.ListDevices(pb.ListDevicesRequest(venue_id=market.venue_id)).devices
    assert [d.last_sequence for d in listed] == [0, 41, 0]

    with pytest.raises(clients.NotFound) as missing:
        venues.rpc.GetDevice(pb.GetDeviceRequest(device_id=UNKNOWN))
    assert missing.value.metadata["resource"] == "device"
    for bad in ["", "door-1"]:
        with pytest.raises(clients.InvalidArgument) as malformed:
            venues.rpc.GetDevice(pb.GetDeviceRequest(device_id=bad))
        assert malformed.value.metadata["field"] == "device_id"
    with pytest.raises(clients.InvalidArgument) as bad_filter:
        venues.rpc.ListDevices(pb.ListDevicesRequest(venue_id="market"))
    assert bad_filter.value.metadata["field"] == "venue_id"


def test_list_devices_refuses_foreign_and_forged_tokens(venues: VenueClient) -> None:
    market = create_venue(venues)
    for _ in range(2):
        register(venues, market.venue_id)
    first = venues.rpc.ListDevices(pb.ListDevicesRequest(page_size=1))
    assert first.next_page_token
    # The fingerprint is a plain hash of the filters, so anyone can forge a token with
    # the right one: its content must be checked as well.
    filters: dict[str, object] = {"venue_id": None}
    forged = [
        pagination.encode([1, 2], filters),
        pagination.encode(["2024-01-01T00:00:00", UNKNOWN], filters),  # no time zone
        pagination.encode(["2024-01-01T00:00:00+00:00", 5], filters),
        pagination.encode(["2024-01-01T00:00:00+00:00"], filters),
        first.next_page_token + "x",
    ]
    for token in [*forged, "garbage!", "x" * 2000]:
        with pytest.raises(clients.InvalidArgument) as caught:
            venues.rpc.ListDevices(pb.ListDevicesRequest(page_size=1, page_token=token))
        assert caught.value.reason == "INVALID_PAGE_TOKEN", token
    with pytest.raises(clients.InvalidArgument) as other:
        venues.rpc.ListDevices(
            pb.ListDevicesRequest(venue_id=market.venue_id, page_token=first.next_page_token)
        )
    assert other.value.reason == "INVALID_PAGE_TOKEN"
    with pytest.raises(clients.InvalidArgument):
        venues.rpc.ListDevices(pb.ListDevicesRequest(page_size=1001))


def test_revoke_is_idempotent_audited_and_notifies_checkin(
    venues: VenueClient, settings: Settings, db_conn: Query
) -> None:
    venue = create_venue(venues)
    device = register(venues, venue.venue_id).device
    for reason in ["", "  ", "x" * 501]:
        with pytest.raises(clients.InvalidArgument) as bad:
            venues.rpc.RevokeDevice(
                pb.RevokeDeviceRequest(device_id=device.device_id, reason=reason)
            )
        assert bad.value.metadata["field"] == "reason"
    with pytest.raises(clients.NotFound):
        venues.rpc.RevokeDevice(pb.RevokeDeviceRequest(device_id=UNKNOWN, reason="lost"))

    async def revoke_twice() -> tuple[pb.Device, pb.Device, list[str]]:
        conn = await asyncpg.connect(**db.connect_args(settings, db.MIGRATOR).kwargs())
        heard: asyncio.Queue[str] = asyncio.Queue()
        await conn.add_listener(channels.DEVICE, lambda *args: heard.put_nowait(args[-1]))
        try:
            first = await asyncio.to_thread(
                venues.rpc.RevokeDevice,
                pb.RevokeDeviceRequest(device_id=device.device_id, reason="stolen"),
            )
            notes = [await asyncio.wait_for(heard.get(), 10)]
            again = await asyncio.to_thread(
                venues.rpc.RevokeDevice,
                pb.RevokeDeviceRequest(device_id=device.device_id, reason="another reason"),
            )
            # Notifications arrive in commit order: once a marker sent after the second
            # revocation arrives, anything that revocation notified has arrived too.
            await conn.execute("SELECT pg_notify($1, 'marker')", channels.DEVICE)
            while (note := await asyncio.wait_for(heard.get(), 10)) != "marker":
                notes.append(note)
            return first.device, again.device, notes
        finally:
            await conn.close()

    first, again, notes = asyncio.run(revoke_twice())
    assert first.state == pb.DEVICE_STATE_REVOKED
    assert first.HasField("revoke_time")
    assert first.certificate_serial == device.certificate_serial
    assert again == first  # unchanged: the first revocation stands
    assert notes == [device.device_id]  # the CheckIn servers hear of it once
    assert venues.rpc.GetDevice(pb.GetDeviceRequest(device_id=device.device_id)).device == first
    rows = db_conn(
        "SELECT resource_id, details->>'reason' FROM audit_events WHERE action = 'device.revoke'"
    )
    assert [tuple(r) for r in rows] == [(device.device_id, "stolen")]
    assert db_conn("SELECT revoke_reason FROM devices")[0][0] == "stolen"


def test_venue_qr_code_verifies_and_tampering_fails(
    venues: VenueClient, settings: Settings
) -> None:
    venue = create_venue(venues)
    code = venues.rpc.GetVenueQrCode(pb.GetVenueQrCodeRequest(venue_id=venue.venue_id))
    assert code.payload.startswith(f"V1.{code.key_id}.")
    public = open_keystore(settings.keystore_dir, settings.secrets_dir).venue_public_keys()
    assert code.key_id in public
    verifier = VenueCodes(public)
    assert verifier.verify(code.payload) == uuid.UUID(venue.venue_id)
    # Printed posters stay valid: the same venue always gets the same code.
    again = venues.rpc.GetVenueQrCode(pb.GetVenueQrCodeRequest(venue_id=venue.venue_id))
    assert again.payload == code.payload

    other = create_venue(venues, "School")
    other_code = venues.rpc.GetVenueQrCode(pb.GetVenueQrCodeRequest(venue_id=other.venue_id))
    head, body = code.payload.rsplit(".", 1)
    _, other_body = other_code.payload.rsplit(".", 1)
    tampered = [
        f"{head}.{other_body[:22]}{body[22:]}",  # another venue's id, this venue's signature
        f"{head}.{body[:-2]}{'A' if body[-2] != 'A' else 'B'}{body[-1]}",  # signature changed
        code.payload.replace(f"V1.{code.key_id}.", "V1.v999."),  # unknown key
        code.payload[:-5],
    ]
    for forged in tampered:
        with pytest.raises(TokenRefused):
            verifier.verify(forged)


def test_venue_qr_code_refusals(venues: VenueClient) -> None:
    with pytest.raises(clients.NotFound) as missing:
        venues.rpc.GetVenueQrCode(pb.GetVenueQrCodeRequest(venue_id=UNKNOWN))
    assert missing.value.metadata["resource"] == "venue"
    with pytest.raises(clients.InvalidArgument) as malformed:
        venues.rpc.GetVenueQrCode(pb.GetVenueQrCodeRequest(venue_id="market"))
    assert malformed.value.metadata["field"] == "venue_id"
    venue = create_venue(venues)
    venues.rpc.SuspendVenue(pb.SuspendVenueRequest(venue_id=venue.venue_id, reason="inspection"))
    with pytest.raises(clients.FailedPrecondition) as suspended:
        venues.rpc.GetVenueQrCode(pb.GetVenueQrCodeRequest(venue_id=venue.venue_id))
    assert suspended.value.reason == "VENUE_SUSPENDED"
    for fmt in (pb.POSTER_FORMAT_PNG, pb.POSTER_FORMAT_SVG, pb.POSTER_FORMAT_PDF):
        with pytest.raises(clients.FailedPrecondition) as poster_refused:
            venues.rpc.RenderVenuePoster(
                pb.RenderVenuePosterRequest(venue_id=venue.venue_id, format=fmt)
            )
        assert poster_refused.value.reason == "VENUE_SUSPENDED"


def qr_modules_in(image: Image.Image, modules: int) -> list[list[bool]]:
    """Read a QR symbol's modules back out of a poster, without knowing its layout.

    The QR is the tallest block of inked rows (title and instruction are separated
    from it by white space); its ink's bounding box is the symbol without its quiet
    zone, so each module is a square of box width / modules pixels."""
    ink = ImageOps.invert(image.convert("L"))
    inked = [
        ink.crop((0, y, image.width, y + 1)).getbbox() is not None for y in range(image.height)
    ]
    blocks: list[tuple[int, int]] = []
    start = None
    for y, has_ink in enumerate([*inked, False]):
        if has_ink and start is None:
            start = y
        elif not has_ink and start is not None:
            blocks.append((start, y))
            start = None
    top, bottom = max(blocks, key=lambda b: b[1] - b[0])
    box = ink.crop((0, top, image.width, bottom)).getbbox()
    assert box is not None
    left, _, right, _ = box
    size = (right - left) / modules
    assert size == int(size) and bottom - top == right - left, "modules are whole square pixels"
    half = int(size) // 2
    return [
        [
            image.getpixel((left + int(c * size) + half, top + int(r * size) + half)) == 0
            for c in range(modules)
        ]
        for r in range(modules)
    ]


def test_png_poster_is_a4_with_the_venue_code(venues: VenueClient) -> None:
    venue = create_venue(venues, "Psar Thmei Central Market")
    payload = venues.rpc.GetVenueQrCode(pb.GetVenueQrCodeRequest(venue_id=venue.venue_id)).payload
    made = venues.rpc.RenderVenuePoster(
        pb.RenderVenuePosterRequest(venue_id=venue.venue_id, format=pb.POSTER_FORMAT_PNG)
    )
    assert made.content_type == "image/png"
    image = Image.open(io.BytesIO(made.content))
    assert image.format == "PNG"
    assert image.size == (2480, 3508)
    assert tuple(round(float(d)) for d in image.info["dpi"]) == (300, 300)
    gray = image.convert("L")
    assert ImageStat.Stat(gray).mean[0] > 180  # mostly white paper
    # The QR in the picture is exactly the symbol of the payload GetVenueQrCode gives.
    expected = [[bool(m) for m in row] for row in poster.qr_code(payload).matrix]
    assert qr_modules_in(gray, len(expected)) == expected


def test_svg_poster_escapes_the_venue_name(venues: VenueClient) -> None:
    name = '<Tom & Jerry\'s "Café">'
    venue = create_venue(venues, name)
    made = venues.rpc.RenderVenuePoster(
        pb.RenderVenuePosterRequest(venue_id=venue.venue_id, format=pb.POSTER_FORMAT_SVG)
    )
    assert made.content_type == "image/svg+xml"
    assert b"<Tom" not in made.content and b"&lt;Tom &amp; Jerry" in made.content
    root = parse_svg(made.content)
    assert root.tag == f"{SVG}svg"
    assert (root.get("width"), root.get("height")) == ("210mm", "297mm")
    texts = [t.text or "" for t in root.iter(f"{SVG}text")]
    *title, khmer, english = texts
    assert " ".join(title) == name  # in one line or more
    assert [khmer, english] == [text for text, _ in poster.INSTRUCTIONS]
    qr = root.find(f"{SVG}g/{SVG}svg")  # segno's symbol, in the page's namespace
    assert qr is not None and qr.find(f"{SVG}path") is not None


@pytest.mark.parametrize("fmt", [pb.POSTER_FORMAT_UNSPECIFIED, 99])
def test_poster_format_is_required(venues: VenueClient, fmt: int) -> None:
    venue = create_venue(venues)
    with pytest.raises(clients.InvalidArgument) as caught:
        venues.rpc.RenderVenuePoster(
            pb.RenderVenuePosterRequest(venue_id=venue.venue_id, format=fmt)  # type: ignore[arg-type]
        )
    assert caught.value.metadata["field"] == "format"
    with pytest.raises(clients.NotFound):
        venues.rpc.RenderVenuePoster(
            pb.RenderVenuePosterRequest(venue_id=UNKNOWN, format=pb.POSTER_FORMAT_PNG)
        )


@pytest.mark.parametrize(
    "title",
    [
        "W" * 200,
        " ".join(["Wwwwwwwwww"] * 18),
        "ផ្សារធំថ្មី" * 18,
        "Market",
        "   ",
    ],
)
@pytest.mark.parametrize("page", [poster.A4, poster.A6])
def test_poster_layout_fits_any_name(title: str, page: poster.PageSize) -> None:
    payload = "V1.v1." + "A" * 107
    spec = poster.layout(title, payload, page)
    width = page.width_px - 2 * poster.MARGIN * page.scale
    assert 1 <= len(spec.title) <= poster.TITLE_LAST_RESORT_LINES or title.strip() == ""
    for line in spec.title:
        assert line.baseline < spec.qr_y
        assert line.width <= width
    first, *_ = spec.instructions
    assert spec.qr_y + spec.qr_px < first.baseline
    assert spec.instructions[-1].baseline < page.height_px
    root = parse_svg(poster.render_svg(title, payload, page))  # always well-formed XML
    assert root.tag == f"{SVG}svg"


def test_poster_refuses_what_no_font_draws() -> None:
    with pytest.raises(poster.Unrenderable, match="U\\+FFFE"):
        poster.layout("bad\ufffe\uffffxml", "V1.v1." + "A" * 107)


@hypothesis_settings(max_examples=40, deadline=None)
@given(name=st.text(min_size=1, max_size=60))
def test_svg_poster_carries_any_venue_name_intact(name: str) -> None:
    """Whatever name a venue has, the SVG is well-formed and shows that name (with
    only characters XML cannot carry replaced), unless it had to be cut short, or
    the poster is refused because its fonts cannot draw the name."""
    try:
        svg = poster.render_svg(name, "V1.v1." + "A" * 107)
    except poster.Unrenderable:
        return
    root = parse_svg(svg)
    texts = [t.text or "" for t in root.iter(f"{SVG}text")]
    title = texts[: -len(poster.INSTRUCTIONS)]
    assert texts[-len(poster.INSTRUCTIONS) :] == [text for text, _ in poster.INSTRUCTIONS]
    expected = poster._NOT_XML.sub("\ufffd", "".join(name.split()))
    # Lines break at spaces, or inside a word too wide for a line: compare the
    # characters shown, in order, without the whitespace between them.
    shown = "".join("".join(line.split()) for line in title)
    assert shown == expected or shown.endswith(poster.ELLIPSIS)


def test_missing_ca_key_fails_clearly_and_recovers_without_restart(
    settings: Settings, pki: Pki, tmp_path: Path
) -> None:
    """A Venue server without the devices CA key serves venues and refuses
    RegisterDevice with FAILED_PRECONDITION; once the key is installed, the next call
    works."""
    state = tmp_path / "state"
    shutil.copytree(settings.state_dir, state)
    (state / "pki" / "devices-ca.key").unlink()
    with (
        running_servers(replace(settings, state_dir=state), pki) as running,
        venue_client(running) as client,
    ):
        venue = create_venue(client)  # venues are unaffected
        with pytest.raises(clients.FailedPrecondition) as caught:
            register(client, venue.venue_id)
        assert caught.value.metadata["missing"] == "ca_key"
        assert "devices-ca.key" in caught.value.message
        shutil.copy(settings.pki_dir / "devices-ca.key", state / "pki" / "devices-ca.key")
        assert register(client, venue.venue_id).device.state == pb.DEVICE_STATE_ACTIVE
