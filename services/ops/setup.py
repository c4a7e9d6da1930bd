"""Make a cluster ready for the services: credentials, roles, database, schema, PKI.

Used by `up`, by `stopcovid migrate`, and by the test suite, so all three build
the database the same way.
"""

from __future__ import annotations

import os
import secrets

import asyncpg
from google.protobuf import descriptor as _descriptor
from stopcovid.checkin.v1 import checkin_service_pb2
from stopcovid.exposure.v1 import exposure_service_pb2
from stopcovid.retention.v1 import retention_service_pb2
from stopcovid.venue.v1 import venue_service_pb2

from services.kernel import auth, db, keys
from services.kernel.atomic_files import write_private
from services.kernel.config import Settings
from services.kernel.pki import CertificateAuthority, write_issued
from services.ops import migrate

DEV_PRINCIPAL_PREFIX = "dev-"

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


def ensure_pki(settings: Settings) -> CertificateAuthority:
    """The CA, a server certificate, and one development certificate per role."""
    ca = CertificateAuthority.load_or_create(settings.pki_dir)
    if not (settings.pki_dir / "server.pem").exists():
        write_issued(settings.pki_dir, "server", ca.issue_server(list(settings.server_hosts)))
    for role in sorted(auth.ROLE_NAMES):
        name = dev_principal(role)
        if not (settings.pki_dir / f"{name}.pem").exists():
            write_issued(settings.pki_dir, name, ca.issue_client(name, role))
    return ca


def ensure_keys(settings: Settings) -> keys.KeyStore:
    """The KEK (a file in the secrets dir unless STOPCOVID_KEK/_FILE name one) and the
    long-lived keys of the key store."""
    if not os.environ.get("STOPCOVID_KEK") and not os.environ.get("STOPCOVID_KEK_FILE"):
        path = settings.secrets_dir / "kek"
        if not path.exists():
            # Exclusive: two first starts at once must not each wrap keys under a KEK
            # of their own.
            write_private(path, keys.new_kek_text().encode(), exclusive=True)
    store = keys.open_keystore(settings.keystore_dir, settings.secrets_dir)
    store.ensure_all()
    return store
