"""The certificate hierarchy under attack, against the real servers over real TLS:
certificates made with a stolen or misused CA key, chains the TLS library accepts
and the servers' own check refuses, and names with control characters.

Each forged certificate is signed with a key of the session's development PKI, as
someone holding that key could sign it (tests/support/forge.py)."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import stopcovid.client as clients
from cryptography import x509
from cryptography.x509.oid import NameOID
from google.protobuf import message_factory
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from stopcovid.client import ClientConfig, RetryPolicy
from stopcovid.venue.v1 import venue_service_pb2 as venue_pb

from services.kernel import auth, pki
from services.kernel import pki as pki_lib
from services.kernel.config import Settings
from services.kernel.pki import Authority, PkiError, Purpose
from services.kernel.server import TlsMaterial
from services.ops.setup import SERVICE_DESCRIPTORS
from tests.support import forge
from tests.support.database import Query
from tests.support.servers import Pki, Servers, running_servers

GRPCURL = Path(sys.executable).with_name("grpcurl")
REPO = Path(__file__).resolve().parent.parent
RETENTION_PROTO = "stopcovid/retention/v1/retention_service.proto"
CLIENT_OF = {
    "checkin": clients.CheckInClient,
    "venue": clients.VenueClient,
    "exposure": clients.ExposureClient,
    "retention": clients.RetentionClient,
}
# An RPC of each service that writes an audit record when it succeeds.
AUDITED = {
    "checkin": "EnrollPerson",
    "venue": "CreateVenue",
    "exposure": "ReportCase",
    "retention": "ListAuditEvents",
}
AUDITED_ACTION = {
    service: f"{SERVICE_DESCRIPTORS[service].full_name}/{method}"
    for service, method in AUDITED.items()
}


def attempt(servers: Servers, issued: pki.Issued, service: str, method: str) -> None:
    """Call `method` of `service` with an empty request, presenting `issued`."""
    config = ClientConfig(
        target=servers.target(service),
        ca_cert_pem=servers.pki.cas.root.certificate_pem,
        client_cert_pem=issued.chain_pem,
        client_key_pem=issued.private_key_pem,
        retry=RetryPolicy(max_attempts=1),
    )
    descriptor = SERVICE_DESCRIPTORS[service].methods_by_name[method]
    request = message_factory.GetMessageClass(descriptor.input_type)()
    with CLIENT_OF[service](config) as client:
        stub: Any = getattr(client.rpc, method)
        stub(request, timeout=10)


def refused_by_every_server(servers: Servers, issued: pki.Issued) -> list[clients.StopCovidError]:
    """The errors of one audited call to each of the four servers."""
    errors = []
    for service, method in AUDITED.items():
        with pytest.raises(clients.StopCovidError) as caught:
            attempt(servers, issued, service, method)
        errors.append(caught.value)
    return errors


def denials(db_conn: Query, serial: str) -> list[tuple[str, str, str, str]]:
    rows = db_conn(
        "SELECT principal, role, action, error_reason FROM audit_events"
        " WHERE resource_type = 'certificate' AND resource_id = $1 AND outcome = 'denied'"
        " ORDER BY sequence",
        serial,
    )
    return [tuple(r) for r in rows]


def grpcurl(pki_: Pki, tmp_path: Path, issued: pki.Issued, target: str, *args: str) -> str:
    """The real grpcurl's complaint, calling with the protos (not reflection, which
    would be refused first and hide the RPC's own ErrorInfo)."""
    cert, key = pki.write_issued(tmp_path, "caller", issued)
    tls = ["-cacert", str(pki_.dir / "ca.pem"), "-cert", str(cert), "-key", str(key)]
    protos = [
        *("-import-path", str(REPO / "protos"), "-proto", RETENTION_PROTO),
        # So grpcurl can print the ErrorInfo detail (from googleapis-common-protos).
        *("-import-path", str(Path(error_details_pb2.__file__).parent.parent.parent)),
        *("-proto", "google/rpc/error_details.proto"),
    ]
    done = subprocess.run(
        [str(GRPCURL), *tls, *protos, *args[:-1], target, args[-1]],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode != 0, done.stdout
    return done.stderr


# -- chains the TLS library accepts and the servers refuse ---------------------------


def test_a_rogue_sub_ca_under_the_root_is_refused(
    servers: Servers, db_conn: Query, tmp_path: Path
) -> None:
    """Someone with the root key makes a sub-CA and an auditor certificate under it:
    one intermediate, within even the root's path length, so the TLS handshake
    passes; every server refuses it because it was not issued by its issuing CAs."""
    rogue = forge.sub_ca(servers.pki.cas.root)
    issued = forge.leaf(rogue, forge.subject("rogue-auditor", "ROLE_AUDITOR"))
    for err in refused_by_every_server(servers, issued):
        assert isinstance(err, clients.Unauthenticated)
        assert err.reason == "CERTIFICATE_CHAIN_INVALID"
        assert err.metadata["certificate_serial"] == issued.serial
    # The real grpcurl shows an operator the same refusal and its reason.
    shown = grpcurl(
        servers.pki,
        tmp_path,
        issued,
        servers.target("retention"),
        "-d",
        "{}",
        "stopcovid.retention.v1.RetentionService/ListAuditEvents",
    )
    assert "Unauthenticated" in shown and "CERTIFICATE_CHAIN_INVALID" in shown
    # Audited as what it is: who the certificate claimed to be, and why not.
    assert (
        "rogue-auditor",
        "ROLE_AUDITOR",
        AUDITED_ACTION["retention"],
        "CERTIFICATE_CHAIN_INVALID",
    ) in denials(db_conn, issued.serial)


def test_a_deeper_chain_under_the_root_is_refused(servers: Servers) -> None:
    """leaf -> sub-CA -> sub-CA -> root breaks the root's path length of 1, which
    the TLS library does not enforce on a trust anchor; the servers do."""
    outer = forge.sub_ca(servers.pki.cas.root, "Rogue outer CA")
    inner = forge.sub_ca(outer, "Rogue inner CA")
    issued = forge.leaf(inner, forge.subject("deep-auditor"), chain=(outer,))
    for err in refused_by_every_server(servers, issued):
        assert err.reason == "CERTIFICATE_CHAIN_INVALID"


def test_the_right_issuing_ca_presented_beside_a_rogue_one_is_still_refused(
    servers: Servers,
) -> None:
    """The staff CA's certificate is in the chain, but the leaf hangs from a rogue
    CA under the root: a check that only looks for a trusted CA in the chain would
    pass it."""
    rogue = forge.sub_ca(servers.pki.cas.root)
    issued = forge.leaf(rogue, forge.subject("mixed-auditor"), chain=(servers.pki.cas.staff,))
    for err in refused_by_every_server(servers, issued):
        assert err.reason == "CERTIFICATE_CHAIN_INVALID"


@pytest.mark.parametrize("holder", ["devices", "staff"])
def test_a_sub_ca_under_an_issuing_ca_fails_the_handshake(servers: Servers, holder: str) -> None:
    """A compromised Venue server's devices CA key (or the staff CA's) cannot make a
    CA below it: path length 0, enforced in the handshake (UNAVAILABLE), so no
    handler of the caller's runs."""
    issuing: Authority = getattr(servers.pki.cas, holder)
    rogue = forge.sub_ca(issuing)
    role = "ROLE_DEVICE" if holder == "devices" else "ROLE_AUDITOR"
    issued = forge.leaf(rogue, forge.subject("under-issuing", role), chain=(issuing,))
    for service, method in AUDITED.items():
        with pytest.raises(clients.Unavailable):
            attempt(servers, issued, service, method)


# -- each issuing CA issues its own roles only ---------------------------------------


@pytest.mark.parametrize("role", sorted(auth.ROLE_NAMES - {"ROLE_DEVICE"}))
def test_the_devices_ca_cannot_issue_a_staff_certificate(servers: Servers, role: str) -> None:
    """Every Venue server holds the devices CA key; with it, no staff certificate
    of any role gets past any server's handshake (its name constraint)."""
    issued = forge.leaf(servers.pki.cas.devices, forge.subject("minted-staff", role))
    for service, method in AUDITED.items():
        with pytest.raises(clients.Unavailable):
            attempt(servers, issued, service, method)


def test_a_devices_ca_subject_that_fits_its_constraint_cannot_name_another_role(
    servers: Servers,
) -> None:
    """The name constraint is a prefix: O=<platform>, OU=ROLE_DEVICE. A second OU
    after it passes the handshake; the servers refuse a subject with two roles."""
    name = forge.subject(
        "two-roles", "ROLE_DEVICE", (NameOID.ORGANIZATIONAL_UNIT_NAME, "ROLE_AUDITOR")
    )
    issued = forge.leaf(servers.pki.cas.devices, name)
    for err in refused_by_every_server(servers, issued):
        assert isinstance(err, clients.Unauthenticated)
        assert err.reason == "UNAUTHENTICATED"
        assert err.metadata["attribute"] == "OU"


def test_the_staff_ca_cannot_issue_a_device_certificate(servers: Servers) -> None:
    issued = forge.leaf(servers.pki.cas.staff, forge.subject("minted-device", "ROLE_DEVICE"))
    with pytest.raises(clients.Unavailable):
        attempt(servers, issued, "checkin", "GetEntryDecision")


def test_the_servers_check_the_role_against_the_issuer_themselves(pki: Pki) -> None:
    """Behind the name constraints, the chain check binds each issuing CA's purpose
    to its roles (CERTIFICATE_WRONG_ISSUER), whatever the TLS layer let through."""
    issuers = auth.Issuers(pki.cas.root.certificate, [pki.cas.devices.certificate])
    staff_like = forge.leaf(pki.cas.devices, forge.subject("minted-auditor", "ROLE_AUDITOR"))
    context = {
        "x509_pem_cert": [staff_like.certificate_pem],
        "x509_pem_cert_chain": [pki.cas.devices.certificate_pem],
    }
    with pytest.raises(auth.CertificateRefused) as caught:
        issuers.principal(context)
    assert caught.value.reason == "CERTIFICATE_WRONG_ISSUER"
    assert caught.value.metadata == {"issuer_purpose": "devices", "role": "ROLE_AUDITOR"}
    assert caught.value.holder.name == "minted-auditor"


def test_a_server_trusts_only_issuing_cas_of_the_platforms_profile(pki: Pki) -> None:
    root = pki.cas.root.certificate
    with pytest.raises(PkiError, match="issues no client certificates"):
        auth.Issuers(root, [pki.cas.servers.certificate])
    with pytest.raises(PkiError, match="issues no client certificates"):
        auth.Issuers(root, [forge.sub_ca(pki.cas.root).certificate])
    other = Authority.create_root("Another root").create_issuing(Purpose.STAFF)
    with pytest.raises(PkiError, match="not signed by the root"):
        auth.Issuers(root, [other.certificate])
    with pytest.raises(PkiError, match="no issuing CA"):
        auth.Issuers(root, [])


def test_the_profile_of_each_ca(pki: Pki) -> None:
    cas = pki.cas
    assert cas.root.is_root and cas.root.purpose is None
    assert [cas.devices.purpose, cas.staff.purpose, cas.servers.purpose] == list(Purpose)
    for issuing in (cas.devices, cas.staff, cas.servers):
        basic = issuing.certificate.extensions.get_extension_for_class(x509.BasicConstraints)
        assert basic.critical and basic.value.ca and basic.value.path_length == 0
        issuing.certificate.verify_directly_issued_by(cas.root.certificate)
        assert issuing.not_valid_after <= cas.root.not_valid_after
    root_basic = cas.root.certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    assert root_basic.value.path_length == 1
    # Each CA issues only its own kind, whoever asks.
    with pytest.raises(PkiError, match="does not issue ROLE_AUDITOR"):
        cas.devices.issue_client("00000000-0000-4000-8000-000000000000", "ROLE_AUDITOR")
    with pytest.raises(PkiError, match="does not issue ROLE_DEVICE"):
        cas.staff.issue_client("a-device", "ROLE_DEVICE")
    with pytest.raises(PkiError, match="root CA does not issue"):
        cas.root.issue_client("anyone", "ROLE_AUDITOR")
    with pytest.raises(PkiError, match="does not issue server"):
        cas.staff.issue_server(["localhost"])
    with pytest.raises(PkiError, match="only the root"):
        cas.staff.create_issuing(Purpose.STAFF)
    with pytest.raises(PkiError, match="1-63 lowercase"):
        cas.staff.issue_client("moh\x00tracer", "ROLE_AUDITOR")
    # A certificate never outlives its issuer.
    long = cas.staff.issue_client("long-lived", "ROLE_AUDITOR", validity=dt.timedelta(days=99999))
    assert long.certificate.not_valid_after_utc == cas.staff.not_valid_after


# -- names ---------------------------------------------------------------------------

CONTROL = {
    "nul": "moh\x00tracer",
    "newline": "moh\ntracer",
    "escape": "moh\x1b[31mtracer",
    "delete": "moh\x7ftracer",
    "c1": "moh\x85tracer",
    "bidi-override": "moh\u202etracer",
    "zero-width": "moh\u200btracer",
}


@pytest.mark.parametrize("kind", sorted(CONTROL))
def test_a_control_character_in_the_common_name_is_unauthenticated(
    servers: Servers, db_conn: Query, kind: str
) -> None:
    """Every audited call of every server: UNAUTHENTICATED with its reason, never
    INTERNAL, and the refusal is audited with the name escaped."""
    name = CONTROL[kind]
    issued = forge.leaf(servers.pki.cas.staff, forge.subject(name, "ROLE_HEALTH_OFFICIAL"))
    for err in refused_by_every_server(servers, issued):
        assert isinstance(err, clients.Unauthenticated)
        assert err.reason == "CERTIFICATE_NAME_INVALID"
        assert err.metadata == {"attribute": "CN"}
    recorded = denials(db_conn, issued.serial)
    assert {row[2] for row in recorded} == set(AUDITED_ACTION.values())
    escaped = auth.printable(name)
    assert escaped.isprintable() and "\\" in escaped
    assert {(row[0], row[1], row[3]) for row in recorded} == {
        (escaped, "ROLE_HEALTH_OFFICIAL", "CERTIFICATE_NAME_INVALID")
    }


def test_a_nul_anywhere_in_the_subject_is_refused(servers: Servers) -> None:
    for name in [
        forge.subject("plain-name", "ROLE_AUDITOR\x00"),
        forge.subject("plain-name", "ROLE_AUDITOR", (NameOID.ORGANIZATION_IDENTIFIER, "org\x00")),
    ]:
        issued = forge.leaf(servers.pki.cas.staff, name)
        with pytest.raises(clients.Unauthenticated) as caught:
            attempt(servers, issued, "retention", "ListAuditEvents")
        assert caught.value.reason == "CERTIFICATE_NAME_INVALID"


def _other_organization(organization: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "ROLE_AUDITOR"),
            x509.NameAttribute(NameOID.COMMON_NAME, "plain-name"),
        ]
    )


def test_names_outside_the_platforms_format_are_refused(servers: Servers) -> None:
    cases = {
        "CN": forge.subject("Not Plain", "ROLE_AUDITOR"),
        "2.5.4.7": forge.subject("plain-name", "ROLE_AUDITOR", (NameOID.LOCALITY_NAME, "x")),
    }
    for attribute, name in cases.items():
        issued = forge.leaf(servers.pki.cas.staff, name)
        with pytest.raises(clients.Unauthenticated) as caught:
            attempt(servers, issued, "retention", "ListAuditEvents")
        assert (caught.value.reason, caught.value.metadata["attribute"]) == (
            "CERTIFICATE_NAME_INVALID",
            attribute,
        ), attribute
    # Another organization than the platform's is outside every issuing CA's name
    # constraint (the handshake fails); the servers' own reading refuses it as well.
    for organization in ("Another platform", pki.ORGANIZATION + "\x00"):
        foreign_org = forge.leaf(servers.pki.cas.staff, _other_organization(organization))
        with pytest.raises(clients.Unavailable):
            attempt(servers, foreign_org, "retention", "ListAuditEvents")
        with pytest.raises(auth.CertificateRefused) as refused:
            auth.principal_of(foreign_org.certificate)
        assert (refused.value.reason, refused.value.metadata) == (
            "CERTIFICATE_NAME_INVALID",
            {"attribute": "O"},
        )


def test_the_organisation_attribute_is_read_when_present(pki: Pki) -> None:
    """Reserved for the organisations to come (pki.py): a plain organizationIdentifier
    after the role is carried into the principal; nothing else changes."""
    issued = pki.cas.staff.issue_client("web-01", "ROLE_REGISTRAR", organization="moh-web")
    principal = auth.principal_from_pem(issued.certificate_pem)
    assert (principal.name, principal.role, principal.organization) == (
        "web-01",
        "ROLE_REGISTRAR",
        "moh-web",
    )
    assert (
        auth.principal_from_pem(pki.issue("web-02", "ROLE_REGISTRAR").chain_pem).organization == ""
    )


def test_health_checks_are_authenticated_too(servers: Servers) -> None:
    issued = forge.leaf(servers.pki.cas.staff, forge.subject("probe\x00", "ROLE_AUDITOR"))
    creds = grpc.ssl_channel_credentials(
        servers.pki.cas.root.certificate_pem, issued.private_key_pem, issued.chain_pem
    )
    with (
        grpc.secure_channel(servers.target("venue"), creds) as channel,
        pytest.raises(grpc.RpcError) as caught,
    ):
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_the_servers_refuse_a_bad_issuers_bundle_at_start(
    settings: Settings, tmp_path: Path
) -> None:
    bad = tmp_path / "issuers.pem"
    bad.write_bytes(b"")
    tls = TlsMaterial.from_settings(replace(settings, tls_issuers_file=bad))
    with pytest.raises(PkiError, match="no issuing CA"):
        tls.issuers()


def test_the_servers_need_no_ca_key_but_the_venue_servers_devices_ca(
    settings: Settings, pki: Pki, tmp_path: Path
) -> None:
    """The root's and the staff and servers CAs' keys are elsewhere (offline, with the
    PKI operators): servers without them serve, and the Venue server still issues
    device credentials with the only CA key it holds."""
    state = tmp_path / "state"
    shutil.copytree(settings.state_dir, state)
    for away in ("pki-root", "pki-ca"):
        shutil.rmtree(state / away)
    assert sorted(p.name for p in (state / "pki").glob("*-ca.key")) == ["devices-ca.key"]
    with running_servers(replace(settings, state_dir=state), pki) as running:
        operator = ClientConfig.from_pki_dir(
            running.target("venue"), state / "pki", "dev-venue-operator"
        )
        with clients.VenueClient(operator) as venues:
            venue = venues.rpc.CreateVenue(
                venue_pb.CreateVenueRequest(
                    venue=venue_pb.Venue(
                        display_name="Depot",
                        setting=venue_pb.VENUE_SETTING_INDOOR,
                        region_code="KH-12",
                    )
                )
            ).venue
            made = venues.rpc.RegisterDevice(
                venue_pb.RegisterDeviceRequest(
                    device=venue_pb.Device(venue_id=venue.venue_id, display_name="Door")
                )
            )
        device = pki_lib.Issued(
            b"", made.credential.certificate_pem.encode(), made.credential.private_key_pem.encode()
        )
        attempt(running, device, "checkin", "GetEntryDecision")  # a working credential


def test_a_kept_chain_verdict_admits_nothing_else(pki: Pki, monkeypatch: Any) -> None:
    """The servers keep the verdict of a chain they accepted, by the digest of the
    certificate and the chain presented, so a reconnecting device is not checked
    again. A rogue sub-CA's certificate for the same name, or the genuine one
    presented beside a rogue CA, is checked afresh and refused, every time: no
    refusal is kept. (Revocation is checked on every call, after this.)"""
    issuers = auth.Issuers(
        pki.cas.root.certificate, [pki.cas.devices.certificate, pki.cas.staff.certificate]
    )
    checks: list[bytes] = []
    check = issuers._check

    def counted(leaf: bytes, chain: bytes) -> auth.Principal:
        checks.append(leaf)
        return check(leaf, chain)

    monkeypatch.setattr(issuers, "_check", counted)

    def presented(issued: pki_lib.Issued, chain: bytes | None = None) -> dict[str, list[bytes]]:
        return {
            "x509_pem_cert": [issued.certificate_pem],
            "x509_pem_cert_chain": [issued.chain_pem if chain is None else chain],
        }

    name = forge.subject("kept-auditor", "ROLE_AUDITOR")
    genuine = forge.leaf(pki.cas.staff, name)
    first = issuers.principal(presented(genuine))
    assert issuers.principal(presented(genuine)) == first
    assert checks == [genuine.certificate_pem]  # the second call used the kept verdict
    rogue = forge.sub_ca(pki.cas.root)
    twin = forge.leaf(rogue, name)
    beside = genuine.chain_pem + rogue.certificate_pem
    for context in (presented(twin), presented(twin), presented(genuine, beside)):
        with pytest.raises(auth.CertificateRefused) as caught:
            issuers.principal(context)
        assert caught.value.reason == "CERTIFICATE_CHAIN_INVALID"
    assert len(checks) == 4
    assert issuers.principal(presented(genuine)) == first
    assert len(checks) == 4
