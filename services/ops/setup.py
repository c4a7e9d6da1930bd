"""Make a cluster ready for the services: credentials, roles, database, schema, and
a development PKI.

Used by `up`, by `stopcovid migrate`, and by the test suite, so all three build
the database the same way.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import structlog
from google.protobuf import descriptor as _descriptor
from stopcovid.checkin.v1 import checkin_service_pb2
from stopcovid.exposure.v1 import exposure_service_pb2
from stopcovid.retention.v1 import retention_service_pb2
from stopcovid.venue.v1 import venue_service_pb2

from services.kernel import auth, db, keys, keystores, pki, tenancy
from services.kernel.atomic_files import write_private
from services.kernel.config import Settings
from services.kernel.pki import Authority, Purpose, write_issued
from services.ops import ledger, migrate

log = structlog.get_logger()

DEV_PRINCIPAL_PREFIX = "dev-"
DEV_ORGANIZATION = "dev-org"
"""The organisation of the development venue operator and front-end."""

# The gRPC service each process serves, by process name, in port order.
SERVICE_DESCRIPTORS: dict[str, _descriptor.ServiceDescriptor] = {
    "checkin": checkin_service_pb2.DESCRIPTOR.services_by_name["CheckInService"],
    "venue": venue_service_pb2.DESCRIPTOR.services_by_name["VenueService"],
    "exposure": exposure_service_pb2.DESCRIPTOR.services_by_name["ExposureService"],
    "retention": retention_service_pb2.DESCRIPTOR.services_by_name["RetentionService"],
}


def role_slug(role: str) -> str:
    """ROLE_VENUE_OPERATOR -> venue-operator (for file and principal names)."""
    return role.removeprefix("ROLE_").lower().replace("_", "-")


def dev_principal(role: str) -> str:
    """The development principal `up` makes for a role: ROLE_AUDITOR -> dev-auditor."""
    return DEV_PRINCIPAL_PREFIX + role_slug(role)


def ensure_db_passwords(settings: Settings) -> dict[str, str]:
    """One random password per database role, kept in the secrets dir (0600)."""
    passwords: dict[str, str] = {}
    for role in db.ALL_ROLES:
        path = db.password_path(settings, role)
        if not path.exists():
            write_private(path, secrets.token_urlsafe(24).encode(), exclusive=True)
        passwords[role] = path.read_text().strip()
    return passwords


async def prepare_database(
    settings: Settings, admin_dsn: str, passwords: dict[str, str] | None = None
) -> list[int]:
    """Bootstrap roles and database with `admin_dsn`, then migrate as the migrator."""
    admin = await asyncpg.connect(admin_dsn)
    try:
        await migrate.bootstrap(admin, settings.database_name, passwords)
    finally:
        await admin.close()
    return await migrate_only(settings)


async def migrate_only(settings: Settings) -> list[int]:
    conn = await asyncpg.connect(**db.connect_args(settings, db.MIGRATOR).kwargs())
    try:
        return await migrate.migrate(conn)
    finally:
        await conn.close()


@dataclass(frozen=True)
class DevelopmentPki:
    """The development PKI's CAs, keys included (a real deployment has no such
    thing: its root is offline and each key lives on its own machine)."""

    root: Authority
    devices: Authority
    staff: Authority
    servers: Authority

    def issue_client(
        self, principal: str, role: str, organization: str | None = None
    ) -> pki.Issued:
        """A client certificate from the CA the role belongs to."""
        ca = self.devices if role == pki.DEVICE_ROLE else self.staff
        return ca.issue_client(principal, role, organization=organization)


def dev_root_dir(settings: Settings) -> Path:
    """Where `up` keeps the development root CA: on a real deployment, offline media."""
    return settings.state_dir / "pki-root"


def _create_development_pki(settings: Settings) -> DevelopmentPki:
    root = Authority.create_root("Stop COVID development root CA")
    issuing = {purpose: root.create_issuing(purpose) for purpose in Purpose}
    root_dir, ca_dir, pki_dir = dev_root_dir(settings), settings.pki_ca_dir, settings.pki_dir
    for directory in (root_dir, ca_dir, pki_dir):
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    root.save(root_dir, "root")
    issuing[Purpose.STAFF].save(ca_dir, Purpose.STAFF.stem)
    issuing[Purpose.SERVERS].save(ca_dir, Purpose.SERVERS.stem)
    # What a Venue server holds: the devices CA, and no other key.
    issuing[Purpose.DEVICES].save(pki_dir, Purpose.DEVICES.stem)
    # Last: the root's certificate in the servers' directory marks the PKI complete.
    (pki_dir / "ca.pem").write_bytes(root.certificate_pem)
    log.warning(
        "development_pki_created",
        message=(
            "made a development PKI: a root CA (its key in pki-root, which a real "
            "deployment keeps offline), the devices, staff and servers issuing CAs; "
            "see docs/pki.md"
        ),
        state_dir=str(settings.state_dir),
    )
    return DevelopmentPki(
        root, issuing[Purpose.DEVICES], issuing[Purpose.STAFF], issuing[Purpose.SERVERS]
    )


def _load_development_pki(settings: Settings) -> DevelopmentPki:
    root_dir, ca_dir, pki_dir = dev_root_dir(settings), settings.pki_ca_dir, settings.pki_dir

    def load(directory: Path, stem: str) -> Authority:
        return Authority.load(directory / f"{stem}.pem", directory / f"{stem}.key")

    try:
        return DevelopmentPki(
            load(root_dir, "root"),
            load(pki_dir, Purpose.DEVICES.stem),
            load(ca_dir, Purpose.STAFF.stem),
            load(ca_dir, Purpose.SERVERS.stem),
        )
    except (OSError, pki.PkiError) as exc:
        raise RuntimeError(
            f"{pki_dir} holds a PKI that is not this machine's development PKI "
            f"({type(exc).__name__}: {exc}); `up` makes certificates only with its own "
            "development CAs. Install server.pem, server.key and the dev-* certificates "
            "there, or move the directory away to get a new development PKI"
        ) from None


def ensure_pki(settings: Settings) -> DevelopmentPki:
    """The development PKI, made on first use (and said so), then a server
    certificate and one development certificate per role if missing.

    A state directory from before the offline root (one CA, its key beside the
    servers' files) is moved aside: its certificates chain to nothing anymore."""
    pki_dir = settings.pki_dir
    if (pki_dir / "ca.key").exists():
        aside = pki_dir.with_name(f"pki.single-ca-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}")
        pki_dir.rename(aside)
        log.warning("single_ca_pki_moved_aside", moved_to=str(aside))
    if (pki_dir / "ca.pem").exists():
        made = _load_development_pki(settings)
    else:
        try:
            made = _create_development_pki(settings)
        except pki.PkiError as exc:  # a CA key exists: an earlier run stopped half-way
            raise RuntimeError(
                f"{exc}; a development PKI was left half made: remove "
                f"{dev_root_dir(settings)}, {settings.pki_ca_dir} and {pki_dir} to start again"
            ) from None
    if not (pki_dir / "issuers.pem").exists():
        issuers = made.devices.certificate_pem + made.staff.certificate_pem
        (pki_dir / "issuers.pem").write_bytes(issuers)
    if not (pki_dir / "server.pem").exists():
        issued = made.servers.issue_server(list(settings.server_hosts))
        ledger.record(settings.pki_ca_dir, issued)
        write_issued(pki_dir, "server", issued)
    for role in sorted(auth.ROLE_NAMES):
        name = dev_principal(role)
        org = DEV_ORGANIZATION if role in tenancy.SCOPED_ROLES else None
        path = pki_dir / f"{name}.pem"
        # A certificate made before organisations names none, which its role now
        # needs: replaced, like a missing one.
        if not path.exists() or auth.principal_from_pem(path.read_bytes()).organization != (
            org or ""
        ):
            issued = made.issue_client(name, role, org)
            if role != pki.DEVICE_ROLE:
                ledger.record(settings.pki_ca_dir, issued)
            write_issued(pki_dir, name, issued)
    return made


def ensure_keys(settings: Settings) -> keys.KeyStore:
    """The KEK (a file in the secrets dir unless STOPCOVID_KEK/_FILE name one) and the
    long-lived keys of the key store."""
    if settings.keystore_backend == "pkcs11":
        # The HSM store lives in the database, which must be migrated first.
        store = keystores.open_for(settings, db.MIGRATOR)
        store.ensure_all()
        return store
    if not os.environ.get("STOPCOVID_KEK") and not os.environ.get("STOPCOVID_KEK_FILE"):
        path = settings.secrets_dir / "kek"
        if not path.exists():
            # Exclusive: two first starts at once must not each wrap keys under a KEK
            # of their own.
            write_private(path, keys.new_kek_text().encode(), exclusive=True)
    store = keys.open_keystore(settings.keystore_dir, settings.secrets_dir)
    store.ensure_all()
    return store
