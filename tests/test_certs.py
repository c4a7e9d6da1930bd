"""`stopcovid certs`, run for real: the ministry's flow from an offline root to an
officer's certificate, revocation reaching every server (an open call ends, the
next is refused), renewal, and the commands that must never make a CA."""

from __future__ import annotations

import queue
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import stopcovid.client as clients
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from stopcovid.checkin.v1 import checkin_service_pb2 as checkin_pb
from stopcovid.checkin.v1 import checkin_service_pb2_grpc as checkin_grpc
from stopcovid.client import ClientConfig, RetryPolicy
from stopcovid.client.errors import from_rpc_error
from stopcovid.exposure.v1 import exposure_service_pb2 as pb
from stopcovid.exposure.v1 import exposure_service_pb2_grpc as pb_grpc
from stopcovid.retention.v1 import retention_service_pb2 as rpb
from stopcovid.venue.v1 import venue_service_pb2 as venue_pb

from services.kernel import auth, pki
from services.kernel.config import Settings
from services.ops import setup
from tests.support.accountability_helpers import copy_contacts, keystore, seed_trace
from tests.support.checkin_helpers import create_venue, enroll
from tests.support.cli import stopcovid, stopcovid_on
from tests.support.database import Query
from tests.support.servers import Pki, Servers, running_servers
from tests.support.waits import wait_for

# -- without a database: making CAs and certificates ----------------------------------


def test_issue_without_a_ca_fails_clearly_and_makes_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    done = stopcovid("certs", "issue", "moh-tracer-01", "health-official", state=state)
    assert done.returncode == 2
    assert "no staff CA in" in done.stderr
    assert "this command never makes one" in done.stderr
    assert "stopcovid certs create-root" in done.stderr
    assert not state.exists()  # no CA, no directory, no key: nothing was made
    for command in (["issue-server", "localhost"], ["renew", "abc"]):
        again = stopcovid("certs", *command, state=state)
        assert again.returncode == 2, command
        assert not state.exists()


@pytest.fixture
def ministry(tmp_path: Path) -> dict[str, Path]:
    """An offline root with an encrypted key, and the three issuing CAs, made with
    the commands docs/pki.md gives."""
    state, root = tmp_path / "state", tmp_path / "offline-root"
    root_secret, ca_secret = tmp_path / "root.passphrase", tmp_path / "ca.passphrase"
    root_secret.write_text("correct horse battery staple\n")
    ca_secret.write_text("another long passphrase\n")

    def certs(*args: str) -> None:
        made = stopcovid("certs", *args, state=state)
        assert made.returncode == 0, made.stderr

    certs("create-root", "--root-dir", str(root), "--passphrase-file", str(root_secret))
    signed_by_root = ("--root-dir", str(root), "--root-passphrase-file", str(root_secret))
    certs("create-ca", "devices", *signed_by_root, "--no-passphrase")
    certs("create-ca", "staff", *signed_by_root, "--passphrase-file", str(ca_secret))
    certs("create-ca", "servers", *signed_by_root, "--passphrase-file", str(ca_secret))
    return {"state": state, "root": root, "root_secret": root_secret, "ca_secret": ca_secret}


def test_the_ministrys_flow_from_an_offline_root_to_an_officer(
    ministry: dict[str, Path], tmp_path: Path
) -> None:
    state, root_dir = ministry["state"], ministry["root"]
    assert b"ENCRYPTED" in (root_dir / "root.key").read_bytes()
    assert b"ENCRYPTED" in (state / "pki-ca" / "staff-ca.key").read_bytes()
    assert b"ENCRYPTED" not in (state / "pki-ca" / "devices-ca.key").read_bytes()
    for key in [root_dir / "root.key", *(state / "pki-ca").glob("*.key")]:
        assert key.stat().st_mode & 0o077 == 0, key

    out = tmp_path / "out"
    done = stopcovid(
        "certs",
        "issue",
        "moh-tracer-01",
        "health-official",
        "--out",
        str(out),
        "--passphrase-file",
        str(ministry["ca_secret"]),
        state=state,
    )
    assert done.returncode == 0, done.stderr
    chain = pki.load_certificates((out / "moh-tracer-01.pem").read_bytes())
    assert (out / "moh-tracer-01.key").stat().st_mode & 0o077 == 0
    root = x509.load_pem_x509_certificate((root_dir / "root.pem").read_bytes())
    staff = x509.load_pem_x509_certificate((state / "pki-ca" / "staff-ca.pem").read_bytes())
    # The file is the chain a client presents: the certificate, then the staff CA.
    assert [c.subject for c in chain[1:]] == [staff.subject]
    chain[0].verify_directly_issued_by(staff)
    staff.verify_directly_issued_by(root)
    principal = auth.principal_of(chain[0])
    assert (principal.name, principal.role) == ("moh-tracer-01", "ROLE_HEALTH_OFFICIAL")
    assert f"serial:      {principal.certificate_serial}" in done.stdout
    # Recorded where it was issued, for `list` and `renew`.
    assert (state / "pki-ca" / "issued" / f"{principal.certificate_serial}.pem").exists()


def test_cas_are_made_once_and_their_keys_never_replaced(ministry: dict[str, Path]) -> None:
    state, root = ministry["state"], ministry["root"]
    before = (root / "root.key").read_bytes()
    again = stopcovid(
        "certs", "create-root", "--root-dir", str(root), "--no-passphrase", state=state
    )
    assert again.returncode == 2 and "already holds a root CA" in again.stderr
    assert (root / "root.key").read_bytes() == before
    staff = stopcovid(
        "certs",
        "create-ca",
        "staff",
        "--root-dir",
        str(root),
        "--root-passphrase-file",
        str(ministry["root_secret"]),
        "--no-passphrase",
        state=state,
    )
    assert staff.returncode == 2 and "staff-ca.key exists" in staff.stderr


def test_a_wrong_or_missing_passphrase_is_said_so(
    ministry: dict[str, Path], tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not it")
    state = ministry["state"]
    done = stopcovid(
        "certs",
        "issue",
        "someone",
        "auditor",
        "--out",
        str(tmp_path / "o"),
        "--passphrase-file",
        str(wrong),
        state=state,
    )
    assert done.returncode == 2 and "passphrase of staff-ca.key is wrong" in done.stderr
    done = stopcovid(
        "certs", "issue", "someone", "auditor", "--out", str(tmp_path / "o"), state=state
    )
    assert done.returncode == 2 and "staff-ca.key is encrypted" in done.stderr
    root = stopcovid("certs", "create-root", "--root-dir", str(tmp_path / "r2"), state=state)
    assert root.returncode == 2 and "needs a passphrase" in root.stderr


def test_issue_refuses_unknown_roles_devices_and_names_that_are_not_plain(
    ministry: dict[str, Path], tmp_path: Path
) -> None:
    state = ministry["state"]
    done = stopcovid("certs", "issue", "someone", "superuser", state=state)
    assert done.returncode == 2
    assert "unknown role 'superuser'" in done.stderr and "health-official" in done.stderr
    device = stopcovid("certs", "issue", "a-scanner", "device", state=state)
    assert device.returncode == 2 and "RegisterDevice" in device.stderr
    for name in ["../escape", "", "UPPER", "a b", "nul\x01"]:
        done = stopcovid("certs", "issue", name, "auditor", state=state)
        assert done.returncode == 2, name
    assert not (tmp_path / "escape.pem").exists()
    assert not (state / "pki-ca" / "issued").exists()  # nothing was issued


def test_issue_for_a_signing_request_keeps_the_key_with_the_requester(
    ministry: dict[str, Path], tmp_path: Path
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ignored")]))
        .sign(key, hashes.SHA256())
    )
    request = tmp_path / "web.csr"
    request.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    options = ["--csr", str(request), "--out", str(tmp_path / "out")]
    options += ["--passphrase-file", str(ministry["ca_secret"])]
    # A front-end acts for one organisation, which the command will not leave out.
    unnamed = stopcovid(
        "certs", "issue", "web-frontend-01", "registrar", *options, state=ministry["state"]
    )
    assert unnamed.returncode == 2
    assert "--org" in unnamed.stderr
    assert not (tmp_path / "out" / "web-frontend-01.pem").exists()
    done = stopcovid(
        "certs",
        "issue",
        "web-frontend-01",
        "registrar",
        "--org",
        "phnom-penh-web",
        *options,
        state=ministry["state"],
    )
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "out" / "web-frontend-01.key").exists()
    cert = x509.load_pem_x509_certificate((tmp_path / "out" / "web-frontend-01.pem").read_bytes())
    assert cert.public_key() == key.public_key()
    holder = auth.principal_of(cert)
    assert holder.name == "web-frontend-01"  # the CA names, not the CSR
    assert holder.organization == "phnom-penh-web"


# -- against the servers: revocation and renewal -----------------------------------


def issue(settings: Settings, tmp_path: Path, name: str, role: str) -> pki.Issued:
    out = tmp_path / name
    done = stopcovid_on(settings, "certs", "issue", name, role, "--out", str(out))
    assert done.returncode == 0, done.stderr
    return read_issued(out, name)


def read_issued(out: Path, name: str) -> pki.Issued:
    chain = (out / f"{name}.pem").read_bytes()
    leaf = pki.pem(pki.load_certificates(chain)[0])
    return pki.Issued(leaf, chain, (out / f"{name}.key").read_bytes())


def config(servers: Servers, service: str, issued: pki.Issued) -> ClientConfig:
    return ClientConfig(
        target=servers.target(service),
        ca_cert_pem=servers.pki.cas.root.certificate_pem,
        client_cert_pem=issued.chain_pem,
        client_key_pem=issued.private_key_pem,
        retry=RetryPolicy(max_attempts=1),
    )


def list_traces(servers: Servers, issued: pki.Issued) -> None:
    with clients.ExposureClient(config(servers, "exposure", issued)) as client:
        client.rpc.ListTraces(pb.ListTracesRequest(), timeout=10)


def refused_as_revoked(call: Any) -> bool:
    try:
        call()
    except clients.Unauthenticated as err:
        return err.reason == "CERTIFICATE_REVOKED"
    return False


def revoke(settings: Settings, serial: str, *extra: str) -> str:
    done = stopcovid_on(settings, "certs", "revoke", serial, *extra)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture
def notify_only(settings: Settings, pki: Pki) -> Iterator[Servers]:
    """The four servers with the periodic reload an hour away: whatever reaches them
    within the test came by NOTIFY."""
    with running_servers(replace(settings, cache_refresh_s=3600.0), pki) as running:
        yield running


def _large_trace(servers: Servers, db_conn: Query, rows: int) -> uuid.UUID:
    venue = create_venue(servers, "Night Market")
    people = [uuid.UUID(enroll(servers, f"+85512000{i:04d}").person_id) for i in range(2)]
    ids = seed_trace(
        db_conn,
        keystore(servers.settings),
        case_person=people[0],
        venue=venue,
        contacts=[(people[1], "queued")],
    )
    copy_contacts(db_conn, ids["trace"], rows)
    return ids["trace"]


def test_a_revoked_officer_is_cut_off_mid_export_and_on_the_next_call(
    notify_only: Servers, db_conn: Query, tmp_path: Path
) -> None:
    servers, settings = notify_only, notify_only.settings
    officer = issue(settings, tmp_path, "moh-exporter-01", "health-official")
    colleague = issue(settings, tmp_path, "moh-exporter-02", "health-official")
    trace_id = _large_trace(servers, db_conn, rows=20_000)

    # A long call: a big export read slowly, so the server waits on flow control
    # (no bandwidth probing lets the window grow) with most of it still to send.
    creds = grpc.ssl_channel_credentials(
        servers.pki.cas.root.certificate_pem, officer.private_key_pem, officer.chain_pem
    )
    with grpc.secure_channel(
        servers.target("exposure"), creds, options=[("grpc.http2.bdp_probe", 0)]
    ) as channel:
        stream = pb_grpc.ExposureServiceStub(channel).ExportTraceContacts(
            pb.ExportTraceContactsRequest(trace_id=str(trace_id)), timeout=120
        )
        first = next(stream)
        assert first.content_type.startswith("text/csv") and first.row_count == 0

        said = revoke(settings, officer.serial, "--reason", "key-compromise")
        assert f"revoked {officer.serial} (moh-exporter-01 ROLE_HEALTH_OFFICIAL)" in said
        # The next call is refused; by then the export was ended too (the same
        # step of the server's loop that applied the revocation cancelled it).
        wait_for(
            lambda: refused_as_revoked(lambda: list_traces(servers, officer)),
            30,
            "the revocation to reach the Exposure server",
        )
        received = [first]
        with pytest.raises(grpc.RpcError) as caught:
            received.extend(stream)
    ended = from_rpc_error(caught.value)
    assert isinstance(ended, clients.Unauthenticated)
    assert ended.reason == "CERTIFICATE_REVOKED"
    assert ended.metadata == {"certificate_serial": officer.serial}
    assert all(chunk.row_count == 0 for chunk in received)  # the last chunk never came
    assert sum(chunk.content.count(b"\r\n") for chunk in received) < 20_000

    list_traces(servers, colleague)  # only the revoked certificate is refused
    audited = db_conn(
        "SELECT principal, action, outcome, error_reason FROM audit_events"
        " WHERE resource_type = 'certificate' AND resource_id = $1 ORDER BY sequence",
        officer.serial,
    )
    rows = [tuple(r) for r in audited]
    assert rows[0][1:] == ("ops.certs.revoke", "succeeded", "")
    assert rows[0][0].startswith("ops:")
    refused = {(r[0], r[1], r[3]) for r in rows[1:]}
    assert {
        (
            "moh-exporter-01",
            "stopcovid.exposure.v1.ExposureService/ExportTraceContacts",
            "CERTIFICATE_REVOKED",
        ),
        (
            "moh-exporter-01",
            "stopcovid.exposure.v1.ExposureService/ListTraces",
            "CERTIFICATE_REVOKED",
        ),
    } <= refused
    (stored,) = db_conn(
        "SELECT principal, role, reason, expire_time FROM certificate_revocations"
        " WHERE serial = $1",
        officer.serial,
    )
    assert tuple(stored)[:3] == ("moh-exporter-01", "ROLE_HEALTH_OFFICIAL", "key_compromise")
    assert stored["expire_time"] == officer.certificate.not_valid_after_utc


def test_any_certificate_can_be_revoked_by_serial_a_devices_open_stream_too(
    notify_only: Servers, tmp_path: Path
) -> None:
    """A device's certificate revoked by serial (not through RevokeDevice): its open
    stream ends and every later call, health checks included, is refused."""
    servers = notify_only
    venue = create_venue(servers, "Bus Station")
    operator = ClientConfig.from_pki_dir(
        servers.target("venue"), servers.pki.dir, "dev-venue-operator"
    )
    with clients.VenueClient(operator) as venues:
        made = venues.rpc.RegisterDevice(
            venue_pb.RegisterDeviceRequest(
                device=venue_pb.Device(venue_id=venue, display_name="Gate")
            )
        )
    credential = made.credential
    creds = grpc.ssl_channel_credentials(
        credential.ca_certificate_pem.encode(),
        credential.private_key_pem.encode(),
        credential.certificate_pem.encode(),
    )
    outgoing: queue.Queue[checkin_pb.StreamScansRequest | None] = queue.Queue()

    def requests() -> Iterator[checkin_pb.StreamScansRequest]:
        while (item := outgoing.get()) is not None:
            yield item

    with grpc.secure_channel(servers.target("checkin"), creds) as channel:
        stream = checkin_grpc.CheckInServiceStub(channel).StreamScans(requests(), timeout=120)
        try:
            assert next(stream).HasField("settings")
            revoke(settings=servers.settings, serial=made.device.certificate_serial)
            with pytest.raises(grpc.RpcError) as caught:
                next(stream)
        finally:
            outgoing.put(None)
        ended = from_rpc_error(caught.value)
        assert (ended.code, ended.reason) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "CERTIFICATE_REVOKED",
        )
        with pytest.raises(grpc.RpcError) as health:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert from_rpc_error(health.value).reason == "CERTIFICATE_REVOKED"


def test_revoking_an_issuing_ca_refuses_everything_it_issued(servers: Servers) -> None:
    """A compromised staff CA, revoked by its serial: every officer's and front-end's
    certificate is refused at once, on every server, without a restart; devices,
    from another CA, are not touched."""
    staff_ca = pki.serial_text(servers.pki.cas.staff.certificate)
    said = revoke(servers.settings, staff_ca, "--reason", "ca-compromise")
    assert "refuses every certificate it issued" in said and "issuers.pem" in said

    def auditor_call() -> None:
        with clients.RetentionClient(
            replace(
                ClientConfig.from_pki_dir(
                    servers.target("retention"), servers.pki.dir, "dev-auditor"
                ),
                retry=RetryPolicy(max_attempts=1),
            )
        ) as client:
            client.rpc.VerifyAuditChain(rpb.VerifyAuditChainRequest(), timeout=10)

    wait_for(lambda: refused_as_revoked(auditor_call), 30, "the CA's revocation")
    with pytest.raises(clients.Unauthenticated) as caught:
        auditor_call()
    assert caught.value.metadata == {"issuer_serial": staff_ca}
    _, cert, key = servers.pki.files("dev-device")
    creds = grpc.ssl_channel_credentials(
        servers.pki.cas.root.certificate_pem, key.read_bytes(), cert.read_bytes()
    )
    for service in ("checkin", "venue", "exposure", "retention"):
        with grpc.secure_channel(servers.target(service), creds) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_renewal_gives_the_same_principal_a_new_certificate_and_the_old_stays_revocable(
    servers: Servers, db_conn: Query, tmp_path: Path
) -> None:
    settings = servers.settings
    old = issue(settings, tmp_path, "moh-renewed-01", "health-official")
    done = stopcovid_on(settings, "certs", "renew", old.serial, "--out", str(tmp_path / "new"))
    assert done.returncode == 0, done.stderr
    assert f"stopcovid certs revoke {old.serial} --reason superseded" in done.stdout
    new = read_issued(tmp_path / "new", "moh-renewed-01")
    assert new.serial != old.serial
    assert new.certificate.public_key() != old.certificate.public_key()
    for issued in (old, new):  # both work until the old one is revoked
        principal = auth.principal_of(issued.certificate)
        assert (principal.name, principal.role) == ("moh-renewed-01", "ROLE_HEALTH_OFFICIAL")
        list_traces(servers, issued)

    revoke(settings, old.serial, "--reason", "superseded")
    wait_for(lambda: refused_as_revoked(lambda: list_traces(servers, old)), 30, "revocation")
    list_traces(servers, new)
    # A revoked certificate is never renewed; the audit log has both acts.
    again = stopcovid_on(settings, "certs", "renew", old.serial, "--out", str(tmp_path / "x"))
    assert again.returncode == 2 and "a revoked certificate is never renewed" in again.stderr
    assert not (tmp_path / "x").exists()
    actions = db_conn(
        "SELECT action, resource_id, details->>'renews' FROM audit_events"
        " WHERE action LIKE 'ops.certs.%' ORDER BY sequence"
    )
    assert [tuple(r) for r in actions] == [
        ("ops.certs.renew", new.serial, old.serial),
        ("ops.certs.revoke", old.serial, None),
    ]


def test_renewal_can_revoke_the_old_certificate_at_once(servers: Servers, tmp_path: Path) -> None:
    settings = servers.settings
    old = issue(settings, tmp_path, "moh-rotated-01", "approver")
    done = stopcovid_on(
        settings, "certs", "renew", old.serial, "--revoke-old", "--out", str(tmp_path / "new")
    )
    assert done.returncode == 0, done.stderr
    assert f"revoked:     {old.serial} (superseded)" in done.stdout
    new = read_issued(tmp_path / "new", "moh-rotated-01")
    wait_for(lambda: refused_as_revoked(lambda: list_traces(servers, old)), 30, "revocation")
    with clients.ExposureClient(config(servers, "exposure", new)) as client:
        client.rpc.ListAccessRequests(pb.ListAccessRequestsRequest(), timeout=10)


def test_an_expired_certificate_is_not_renewed(servers: Servers, tmp_path: Path) -> None:
    settings = servers.settings
    out = tmp_path / "short"
    done = stopcovid_on(
        settings, "certs", "issue", "moh-short-01", "auditor", "--days", "0", "--out", str(out)
    )
    assert done.returncode == 0, done.stderr
    expired = read_issued(out, "moh-short-01")
    again = stopcovid_on(settings, "certs", "renew", expired.serial, "--out", str(tmp_path / "n"))
    assert again.returncode == 2 and "renewal is before expiry" in again.stderr


def test_list_shows_each_certificate_and_its_revocation(servers: Servers, tmp_path: Path) -> None:
    settings = servers.settings
    kept = issue(settings, tmp_path, "moh-listed-01", "grievance-officer")
    gone = issue(settings, tmp_path, "moh-listed-02", "retention-officer")
    revoke(settings, gone.serial.upper(), "--reason", "affiliation-changed", "--note", "left")
    again = revoke(settings, gone.serial)
    assert "was already revoked" in again and "nothing changed" in again
    listed = stopcovid_on(settings, "certs", "list")
    assert listed.returncode == 0, listed.stderr
    lines = {line.split()[0]: line for line in listed.stdout.splitlines()[1:]}
    assert "moh-listed-01" in lines[kept.serial] and lines[kept.serial].endswith(" valid")
    assert "retention-officer" in lines[gone.serial]
    assert "revoked" in lines[gone.serial] and "(affiliation_changed)" in lines[gone.serial]
    # The development server certificate is listed as what it is.
    assert any(" server " in line for line in lines.values())


def test_revoke_refuses_what_is_not_a_serial(servers: Servers) -> None:
    for bad in ("xyz", "", "1" * 41, "12 34"):
        done = stopcovid_on(servers.settings, "certs", "revoke", bad)
        assert done.returncode == 2 and "is not a certificate serial" in done.stderr, bad


def test_revoke_needs_the_database_and_says_so(ministry: dict[str, Path]) -> None:
    done = stopcovid("certs", "revoke", "abc123", state=ministry["state"])
    assert done.returncode == 2
    assert "no database configured" in done.stderr


def test_up_makes_the_development_pki_once_and_moves_a_single_ca_one_aside(
    tmp_path: Path,
) -> None:
    settings = replace(Settings.from_env(), state_dir=tmp_path / "state")
    old = settings.pki_dir
    old.mkdir(parents=True)
    (old / "ca.pem").write_text("a CA from before the offline root\n")
    (old / "ca.key").write_text("its key, beside the servers' files\n")
    made = setup.ensure_pki(settings)
    (aside,) = settings.state_dir.glob("pki.single-ca-*")
    assert (aside / "ca.key").exists()
    assert (old / "ca.pem").read_bytes() == made.root.certificate_pem
    again = setup.ensure_pki(settings)  # the next `up` keeps it
    assert again.root.certificate == made.root.certificate
    assert again.staff.certificate == made.staff.certificate
