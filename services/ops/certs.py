"""`stopcovid certs`: the PKI operators' commands (docs/pki.md).

    create-root   the root CA, once, on the offline machine
    create-ca     an issuing CA (devices, staff or servers), signed by the root
    issue         an officer's or a front-end's certificate, from the staff CA
    issue-server  a server certificate, from the servers CA
    renew         a new certificate for the principal and role (or hosts) of one
    revoke        revoke any certificate by its serial: every server refuses it
    list          the certificates issued from this CA directory, and their state

Only create-root and create-ca make a CA, and neither ever replaces a key; every
other command refuses to run without the CA it needs. The staff and servers CAs'
keys, and the record of what they issued (services/ops/ledger.py), are in the CA
directory (STOPCOVID_PKI_CA_DIR). Revocations are rows in the database, written
as the stopcovid_pki role and audited; renewal reads them too, so that a revoked
certificate is never renewed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import getpass
import re
import sys
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from services.kernel import audit, auth, db, pki, tenancy
from services.kernel.config import Settings
from services.kernel.pki import Authority, Purpose
from services.ops import ledger, pg
from services.ops.setup import role_slug

Q = db.load_queries(Path(__file__).with_name("certs.sql"))

REASONS = (
    "unspecified",
    "key-compromise",
    "ca-compromise",
    "affiliation-changed",
    "superseded",
    "cessation-of-operation",
)
_SERIAL = re.compile(r"^[0-9a-f]{1,40}$")
_T = TypeVar("_T")


class Refused(Exception):
    """An operator's request that cannot be done; the message says why and what to do."""


def full_role(text: str) -> str:
    """venue-operator or ROLE_VENUE_OPERATOR -> ROLE_VENUE_OPERATOR, or Refused."""
    role = text if text.startswith("ROLE_") else "ROLE_" + text.upper().replace("-", "_")
    if role not in auth.ROLE_NAMES:
        valid = ", ".join(role_slug(r) for r in sorted(auth.ROLE_NAMES))
        raise Refused(f"unknown role {text!r}; one of: {valid}")
    return role


def serial_of(text: str) -> str:
    """A serial as typed (any case, colons, 0x, leading zeros) in the platform's form."""
    cleaned = text.strip().lower().replace(":", "").removeprefix("0x").lstrip("0")
    if not _SERIAL.match(cleaned):
        raise Refused(f"{text!r} is not a certificate serial (hexadecimal, as `certs list` shows)")
    return cleaned


# -- passphrases and CA files ------------------------------------------------------


def _passphrase_from(path: Path | None) -> bytes | None:
    if path is None:
        return None
    data = path.read_bytes().rstrip(b"\r\n")
    if not data:
        raise Refused(f"{path} is empty")
    return data


def _new_passphrase(args: argparse.Namespace, what: str) -> bytes | None:
    """The passphrase to encrypt a new CA key with: from a file, typed twice, or
    none when the operator says so."""
    if args.no_passphrase:
        return None
    given = _passphrase_from(args.passphrase_file)
    if given is not None:
        return given
    if not sys.stdin.isatty():
        raise Refused(
            f"the {what} key needs a passphrase: give --passphrase-file FILE "
            "(or --no-passphrase for a test PKI)"
        )
    first = getpass.getpass(f"passphrase for the new {what} key: ").encode()
    if not first or first != getpass.getpass("again: ").encode():
        raise Refused("the passphrases were empty or did not match")
    return first


def load_ca(cert_path: Path, key_path: Path, passphrase_file: Path | None, what: str) -> Authority:
    """A CA from its files; an encrypted key's passphrase from the file or typed."""
    if not key_path.exists() or not cert_path.exists():
        raise Refused(
            f"no {what} in {key_path.parent} ({cert_path.name}, {key_path.name}); this "
            "command never makes one: create it with `stopcovid certs create-root` and "
            "`stopcovid certs create-ca` (docs/pki.md)"
        )
    passphrase = _passphrase_from(passphrase_file)
    try:
        return Authority.load(cert_path, key_path, passphrase)
    except pki.KeyEncrypted as exc:
        if passphrase is not None or not sys.stdin.isatty():
            raise Refused(f"{exc} (--passphrase-file FILE)") from None
        typed = getpass.getpass(f"passphrase of {key_path}: ").encode()
        try:
            return Authority.load(cert_path, key_path, typed)
        except pki.PkiError as again:
            raise Refused(str(again)) from None
    except pki.PkiError as exc:
        raise Refused(str(exc)) from None


def _issuing(settings: Settings, purpose: Purpose, passphrase_file: Path | None) -> Authority:
    directory = settings.pki_ca_dir
    ca = load_ca(
        directory / f"{purpose.stem}.pem",
        directory / f"{purpose.stem}.key",
        passphrase_file,
        f"{purpose.value} CA",
    )
    if ca.purpose is not purpose:
        raise Refused(f"{directory / purpose.stem}.pem is not a {purpose.value} CA")
    return ca


def _root(args: argparse.Namespace) -> Authority:
    ca = load_ca(
        args.root_dir / "root.pem", args.root_dir / "root.key", args.root_passphrase_file, "root CA"
    )
    if not ca.is_root:
        raise Refused(f"{args.root_dir / 'root.pem'} is not a root CA")
    return ca


def _csr_key(path: Path | None) -> ec.EllipticCurvePublicKey | None:
    if path is None:
        return None
    try:
        return pki.csr_public_key(path.read_bytes())
    except pki.CsrRefused as exc:
        raise Refused(f"{path}: {exc}") from None


def _write(out: Path, name: str, issued: pki.Issued) -> tuple[Path, Path | None]:
    """`<name>.pem` (the chain to present) and, unless a CSR kept the key elsewhere,
    `<name>.key`; never over an existing file."""
    cert_path, key_path = out / f"{name}.pem", out / f"{name}.key"
    for path in (cert_path, key_path):
        if path.exists():
            raise Refused(f"{path} exists; choose another --out directory")
    if issued.private_key_pem:
        pki.write_issued(out, name, issued)
        return cert_path, key_path
    out.mkdir(parents=True, exist_ok=True)
    cert_path.write_bytes(issued.chain_pem)
    return cert_path, None


def _report(settings: Settings, issued: pki.Issued, cert: Path, key: Path | None) -> None:
    cert_info = issued.certificate
    print(f"certificate: {cert}")
    print(f"private key: {key if key else '(kept by the requester: issued for a CSR)'}")
    print(f"serial:      {issued.serial}")
    print(f"expires:     {cert_info.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    root = settings.pki_dir / "ca.pem"
    if root.exists():
        print(f"root CA:     {root}")


# -- the database ------------------------------------------------------------------


def _database_settings(settings: Settings) -> Settings:
    if settings.database_url is not None:
        return settings
    cluster = pg.EmbeddedPostgres(settings.pg_dir)
    if cluster.is_running() and cluster.port_file.exists():
        return replace(
            settings,
            database_url=f"postgresql://127.0.0.1:{cluster.port_file.read_text().strip()}/",
        )
    raise Refused(
        "no database configured: set STOPCOVID_DATABASE_URL (revocations live in the "
        "database every server reads), or run `stopcovid up`"
    )


def _with_db(settings: Settings, work: Callable[[asyncpg.Connection], Awaitable[_T]]) -> _T:
    async def go() -> _T:
        args = db.connect_args(_database_settings(settings), db.PKI_OPERATOR)
        try:
            conn = await asyncpg.connect(**args.kwargs())
        except (OSError, asyncpg.PostgresError) as exc:
            raise Refused(f"cannot reach the database as {db.PKI_OPERATOR}: {exc}") from None
        try:
            return await work(conn)
        finally:
            await conn.close()

    return asyncio.run(go())


def _operator() -> auth.Principal:
    """Who ran the command, for the audit log: the operating-system account."""
    try:
        account = getpass.getuser()
    except (KeyError, OSError):  # a container user with no name
        account = "unknown"
    return auth.Principal(f"ops:{auth.printable(account)}", auth.UNKNOWN_ROLE, "")


async def _revoke(
    conn: asyncpg.Connection,
    serial: str,
    reason: str,
    note: str,
    cert: x509.Certificate | None,
) -> asyncpg.Record | None:
    """Insert the revocation and its audit record in one transaction; None if the
    serial was revoked before."""
    principal = role = ""
    if cert is not None:
        holder = _describe(cert)
        principal, role = holder[0], holder[1]
    operator = _operator()
    async with conn.transaction():
        row: asyncpg.Record | None = await conn.fetchrow(
            Q["insert_revocation"],
            serial,
            reason.replace("-", "_"),
            note,
            principal,
            role,
            cert.not_valid_after_utc if cert is not None else None,
            operator.name,
        )
        if row is not None:
            await audit.record(
                conn,
                "ops.certs.revoke",
                "certificate",
                serial,
                {"reason": reason, "role": role},
                principal=operator,
            )
    return row


def _describe(cert: x509.Certificate) -> tuple[str, str]:
    """(principal, role) of a client certificate; (first host, 'server') of a server's;
    (its name, '<purpose> CA') of an issuing CA's."""
    purpose = Purpose.of(cert)
    if purpose is not None:
        names = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
        return str(names[0].value), f"{purpose.value} CA"
    try:
        principal = auth.principal_of(cert)
    except auth.CertificateRefused:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return str(next(iter(sans)).value), "server"
    return principal.name, principal.role


# -- the commands ------------------------------------------------------------------


def _cmd_create_root(settings: Settings, args: argparse.Namespace) -> int:
    directory: Path = args.root_dir
    if (directory / "root.key").exists() or (directory / "root.pem").exists():
        raise Refused(f"{directory} already holds a root CA; a root is made once")
    passphrase = _new_passphrase(args, "root CA")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    root = Authority.create_root(args.name)
    root.save(directory, "root", passphrase)
    print(f"root CA:     {directory / 'root.pem'} (give it to every server and client as ca.pem)")
    state = "encrypted" if passphrase else "NOT encrypted"
    print(f"its key:     {directory / 'root.key'} ({state})")
    print(f"expires:     {root.not_valid_after:%Y-%m-%d} UTC")
    return 0


def _cmd_create_ca(settings: Settings, args: argparse.Namespace) -> int:
    purpose = Purpose(args.purpose)
    out: Path = args.out or settings.pki_ca_dir
    if (out / f"{purpose.stem}.key").exists():
        raise Refused(
            f"{out / purpose.stem}.key exists; to rotate, retire the old CA first "
            "(docs/pki.md, 'Rotating an issuing CA'), or choose another --out"
        )
    if purpose is Purpose.DEVICES:
        if args.passphrase_file:
            raise Refused("the Venue servers read the devices CA key unattended: no passphrase")
        args.no_passphrase = True
    root = _root(args)
    passphrase = _new_passphrase(args, f"{purpose.value} CA")
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca = root.create_issuing(purpose)
    ca.save(out, purpose.stem, passphrase)
    print(f"{purpose.value} CA:  {out / purpose.stem}.pem, key {out / purpose.stem}.key")
    print(f"expires:     {ca.not_valid_after:%Y-%m-%d} UTC")
    if purpose is Purpose.SERVERS:
        print("next: issue the servers' certificates with `stopcovid certs issue-server`")
    else:
        print(
            f"next: add {purpose.stem}.pem to every server's issuers.pem (STOPCOVID_TLS_ISSUERS)"
            " and restart them"
            + (
                "; install devices-ca.pem and devices-ca.key on the Venue servers only"
                if purpose is Purpose.DEVICES
                else ""
            )
        )
    return 0


def _cmd_issue(settings: Settings, args: argparse.Namespace) -> int:
    if not pki.PRINCIPAL_NAME.match(args.name):
        raise Refused("principal name must be 1-63 lowercase letters, digits, '.' or '-'")
    role = full_role(args.role)
    if role == pki.DEVICE_ROLE:
        raise Refused(
            "device certificates come from RegisterDevice on a Venue server (the devices CA)"
        )
    org = args.org
    if org is not None and not pki.PRINCIPAL_NAME.match(org):
        raise Refused("an organisation must be 1-63 lowercase letters, digits, '.' or '-'")
    if role in tenancy.SCOPED_ROLES and org is None:
        raise Refused(f"a {role} acts for one organisation: name it with --org (docs/pki.md)")
    ca = _issuing(settings, Purpose.STAFF, args.passphrase_file)
    issued = ca.issue_client(
        args.name, role, _csr_key(args.csr), dt.timedelta(days=args.days), organization=org
    )
    ledger.record(settings.pki_ca_dir, issued)
    cert, key = _write(args.out or settings.pki_dir, args.name, issued)
    _report(settings, issued, cert, key)
    return 0


def _cmd_issue_server(settings: Settings, args: argparse.Namespace) -> int:
    ca = _issuing(settings, Purpose.SERVERS, args.passphrase_file)
    issued = ca.issue_server(list(args.hosts), dt.timedelta(days=args.days))
    ledger.record(settings.pki_ca_dir, issued)
    cert, key = _write(args.out or settings.pki_dir, args.name, issued)
    _report(settings, issued, cert, key)
    return 0


def _cmd_renew(settings: Settings, args: argparse.Namespace) -> int:
    serial = serial_of(args.serial)
    old = ledger.find(settings.pki_ca_dir, serial)
    if old is None:
        raise Refused(
            f"no certificate {serial} was issued from {settings.pki_ca_dir}; renew it where "
            "it was issued, or issue a new one"
        )
    if old.not_valid_after_utc <= dt.datetime.now(dt.UTC):
        raise Refused(
            f"{serial} expired on {old.not_valid_after_utc:%Y-%m-%d}: renewal is before expiry;"
            " issue a new certificate once you have checked who will hold it"
        )
    usage = old.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    server = x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in usage
    ca = _issuing(settings, Purpose.SERVERS if server else Purpose.STAFF, args.passphrase_file)
    public_key = _csr_key(args.csr)
    name, _role = _describe(old)
    out: Path = args.out or settings.pki_dir

    async def renew(conn: asyncpg.Connection) -> pki.Issued:
        revoked = await conn.fetchrow(Q["get_revocation"], serial)
        if revoked is not None:
            raise Refused(
                f"{serial} was revoked on {revoked['revoke_time']:%Y-%m-%d} "
                f"({revoked['reason']}): a revoked certificate is never renewed"
            )
        issued = ca.renew(old, public_key, dt.timedelta(days=args.days))
        ledger.record(settings.pki_ca_dir, issued)
        async with conn.transaction():
            await audit.record(
                conn,
                "ops.certs.renew",
                "certificate",
                issued.serial,
                {"renews": serial},
                principal=_operator(),
            )
        if args.revoke_old:
            await _revoke(conn, serial, "superseded", f"renewed as {issued.serial}", old)
        return issued

    issued = _with_db(settings, renew)
    cert, key = _write(out, "server" if server else name, issued)
    _report(settings, issued, cert, key)
    if args.revoke_old:
        print(f"revoked:     {serial} (superseded)")
    else:
        print(
            f"the old certificate {serial} stays valid until "
            f"{old.not_valid_after_utc:%Y-%m-%d}; once the new one is installed:\n"
            f"  stopcovid certs revoke {serial} --reason superseded"
        )
    return 0


def _issuing_ca_with(settings: Settings, serial: str) -> x509.Certificate | None:
    """The issuing CA certificate with `serial` kept in the CA or PKI directory."""
    for directory in (settings.pki_ca_dir, settings.pki_dir):
        for path in directory.glob("*-ca.pem"):
            cert = x509.load_pem_x509_certificate(path.read_bytes())
            if pki.serial_text(cert) == serial:
                return cert
    return None


def _cmd_revoke(settings: Settings, args: argparse.Namespace) -> int:
    serial = serial_of(args.serial)
    if len(args.note) > 500 or not args.note.isprintable():
        raise Refused("--note must be at most 500 printable characters")
    cert = ledger.find(settings.pki_ca_dir, serial) or _issuing_ca_with(settings, serial)

    async def revoke(conn: asyncpg.Connection) -> tuple[asyncpg.Record | None, Any]:
        row = await _revoke(conn, serial, args.reason, args.note, cert)
        earlier = None if row is not None else await conn.fetchrow(Q["get_revocation"], serial)
        return row, earlier

    row, earlier = _with_db(settings, revoke)
    if row is None:
        print(
            f"{serial} was already revoked on {earlier['revoke_time']:%Y-%m-%d %H:%M} UTC "
            f"({earlier['reason']}); nothing changed"
        )
        return 0
    if cert is not None and Purpose.of(cert) is not None:
        print(
            f"revoked {serial} ({_describe(cert)[0]}): every server refuses every certificate "
            "it issued and ends their open calls; take it out of issuers.pem as well"
        )
        return 0
    who = f" ({' '.join(_describe(cert))})" if cert is not None else ""
    print(f"revoked {serial}{who}: every server refuses it and ends its open calls")
    return 0


def _cmd_list(settings: Settings, args: argparse.Namespace) -> int:
    certs = ledger.every(settings.pki_ca_dir)
    serials = [pki.serial_text(c) for c in certs]
    revoked: dict[str, asyncpg.Record] | None
    try:
        rows = _with_db(settings, lambda conn: conn.fetch(Q["revocations_among"], serials))
        revoked = {r["serial"]: r for r in rows}
    except Refused as why:
        print(f"revocations unknown: {why}", file=sys.stderr)
        revoked = None
    now = dt.datetime.now(dt.UTC)
    lines = [f"{'serial':<40}  {'principal':<24} {'role':<20} {'expires':<10}  state"]
    for cert, serial in zip(certs, serials, strict=True):
        expired = cert.not_valid_after_utc <= now
        if expired and not args.all:
            continue
        name, role = _describe(cert)
        if revoked is None:
            state = "expired" if expired else "valid unless revoked"
        elif serial in revoked:
            row = revoked[serial]
            state = f"revoked {row['revoke_time']:%Y-%m-%d} ({row['reason']})"
        else:
            state = "expired" if expired else "valid"
        lines.append(
            f"{serial:<40}  {name:<24} {role_slug(role):<20} "
            f"{cert.not_valid_after_utc:%Y-%m-%d}  {state}"
        )
    print("\n".join(lines))
    return 0


_COMMANDS: dict[str, Callable[[Settings, argparse.Namespace], int]] = {
    "create-root": _cmd_create_root,
    "create-ca": _cmd_create_ca,
    "issue": _cmd_issue,
    "issue-server": _cmd_issue_server,
    "renew": _cmd_renew,
    "revoke": _cmd_revoke,
    "list": _cmd_list,
}


def run(settings: Settings, args: argparse.Namespace) -> int:
    try:
        return _COMMANDS[args.certs_command](settings, args)
    except Refused as refused:
        print(f"stopcovid certs {args.certs_command}: {refused}", file=sys.stderr)
        return 2
