"""`stopcovid`: the operator's command line.

stopcovid up                      run the whole system (embedded Postgres if none configured)
stopcovid up --ha                 the same with a highly available Postgres (etcd, Patroni,
                                  a synchronous standby), two CheckIn servers, two workers
stopcovid migrate                 create roles/database if needed and apply migrations
stopcovid certs ...               the PKI: create-root, create-ca, issue, issue-server,
                                  renew, revoke, list (services/ops/certs.py, docs/pki.md)
stopcovid roles                   print the RPC -> roles table (markdown), from the protos
stopcovid keys ...                rotate the personal-token or people key
stopcovid status                  key figures of a running installation, from its metrics
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.kernel import auth, db, keystores, pki
from services.kernel import logging as sc_logging
from services.kernel.config import Settings
from services.kernel.keys import KeyStore
from services.ops import certs, setup

ROLES_DOC_HEADER = """# Who may call what

Generated from the `allowed_roles` and `idempotency_level` options in `protos/` by
`./dev stopcovid roles > docs/rpc-roles.md`; a test fails when this file and the protos
disagree. The servers enforce the same options: a caller whose certificate role is not
listed gets `PERMISSION_DENIED` with reason `ROLE_NOT_ALLOWED`. "Retried" means the typed
clients retry the call on `UNAVAILABLE`.

"""


def roles_markdown() -> str:
    table = auth.role_table(setup.SERVICE_DESCRIPTORS.values())
    lines = ["| RPC | roles allowed | retried by clients |", "|---|---|---|"]
    for service in setup.SERVICE_DESCRIPTORS.values():
        for method in service.methods:
            path = f"/{service.full_name}/{method.name}"
            roles = ", ".join(setup.role_slug(r) for r in sorted(table[path])) or "nobody"
            level = method.GetOptions().idempotency_level
            retried = "yes" if level in (1, 2) else "no"  # NO_SIDE_EFFECTS, IDEMPOTENT
            lines.append(f"| `{service.name}/{method.name}` | {roles} | {retried} |")
    return ROLES_DOC_HEADER + "\n".join(lines) + "\n"


def _cmd_migrate(settings: Settings) -> int:
    if settings.database_url is None:
        print(
            "no database configured (STOPCOVID_DATABASE_URL or PG*); `stopcovid up` runs "
            "the embedded one",
            file=sys.stderr,
        )
        return 2
    admin = settings.admin_database_url
    if admin:
        passwords = setup.ensure_db_passwords(settings)
        applied = asyncio.run(setup.prepare_database(settings, admin, passwords))
    else:
        applied = asyncio.run(setup.migrate_only(settings))
    print(f"applied migrations: {applied or 'none (up to date)'}")
    return 0


@dataclass(frozen=True)
class _Rotation:
    """A `stopcovid keys` command: which key it makes current, and what to do next."""

    help: str
    rotate: Callable[[KeyStore], str]
    done: str
    """Printed after, with the new key's id as {kid}."""


_ROTATIONS = {
    "rotate-token": _Rotation(
        "make a new personal-token key current",
        lambda store: store.rotate_token_key(),
        "new personal-token key: {kid} (older keys keep verifying).\n"
        "Restart the CheckIn servers to issue tokens with it.",
    ),
    "rotate-people": _Rotation(
        "make a new people (phone) key current",
        lambda store: store.rotate_people_key(),
        "new people key: {kid} (data under older keys still decrypts).\n"
        "Restart the CheckIn and Retention servers to encrypt with it.",
    ),
}


def _cmd_rotate(settings: Settings, command: str) -> int:
    rotation = _ROTATIONS[command]
    kid = rotation.rotate(keystores.open_for(settings, db.MIGRATOR))
    print(rotation.done.format(kid=kid))
    return 0


def _certs_parser(sub: Any) -> None:
    """The `certs` commands (services/ops/certs.py)."""
    group = sub.add_parser("certs", help="the PKI: CAs, certificates, revocation (docs/pki.md)")
    commands = group.add_subparsers(dest="certs_command", required=True)

    def new_key_options(parser: argparse.ArgumentParser) -> None:
        group = parser.add_mutually_exclusive_group()
        group.add_argument("--passphrase-file", type=Path, help="encrypt the new key with this")
        group.add_argument("--no-passphrase", action="store_true", help="leave the key plain")

    def issuing_options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--out", type=Path, help="directory for the files (default: pki)")
        parser.add_argument("--days", type=int, default=pki.LEAF_VALIDITY.days, help="validity")
        parser.add_argument("--passphrase-file", type=Path, help="of the issuing CA's key")

    root = commands.add_parser("create-root", help="make the root CA (offline, once)")
    root.add_argument("--root-dir", type=Path, required=True, help="offline medium for root.*")
    root.add_argument("--name", default="Stop COVID root CA", help="the root's common name")
    new_key_options(root)

    ca = commands.add_parser("create-ca", help="make an issuing CA signed by the root")
    ca.add_argument("purpose", choices=[p.value for p in pki.Purpose])
    ca.add_argument("--root-dir", type=Path, required=True, help="where root.pem, root.key are")
    ca.add_argument("--root-passphrase-file", type=Path, help="of the root key, if encrypted")
    ca.add_argument("--out", type=Path, help="directory for the CA (default: the CA directory)")
    new_key_options(ca)

    issue = commands.add_parser("issue", help="an officer's or front-end's certificate")
    issue.add_argument("name", help="principal name, e.g. moh-tracer-01")
    issue.add_argument("role", help="role, e.g. health-official or ROLE_HEALTH_OFFICIAL")
    issue.add_argument("--csr", type=Path, help="sign this request's key; make no key")
    issue.add_argument(
        "--org",
        help="the organisation the principal acts for (organizationIdentifier, a plain "
        "name such as phnom-penh-markets); required for venue-operator and registrar",
    )
    issuing_options(issue)

    server = commands.add_parser("issue-server", help="a server certificate")
    server.add_argument("hosts", nargs="+", help="DNS names and IP addresses of the server")
    server.add_argument("--name", default="server", help="file name stem (default: server)")
    issuing_options(server)

    renew = commands.add_parser("renew", help="a new certificate for an issued one's holder")
    renew.add_argument("serial", help="the certificate to renew (see `certs list`)")
    renew.add_argument("--csr", type=Path, help="sign this request's key; make no key")
    renew.add_argument("--revoke-old", action="store_true", help="revoke the old one at once")
    issuing_options(renew)

    revoke = commands.add_parser("revoke", help="revoke any certificate by serial")
    revoke.add_argument("serial", help="hexadecimal serial, e.g. from `certs list`")
    revoke.add_argument("--reason", choices=certs.REASONS, default="unspecified")
    revoke.add_argument("--note", default="", help="up to 500 characters, no personal data")

    listing = commands.add_parser("list", help="certificates issued here, and their state")
    listing.add_argument("--all", action="store_true", help="include expired certificates")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stopcovid", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up_parser = sub.add_parser("up", help="run the whole system")
    up_parser.add_argument(
        "--ha",
        action="store_true",
        help="etcd and two Patroni-managed Postgres nodes, two CheckIn servers, two workers",
    )
    sub.add_parser("migrate", help="apply database migrations")
    _certs_parser(sub)
    sub.add_parser("roles", help="print the RPC -> roles table")
    keys_parser = sub.add_parser("keys", help="the key store")
    keys_sub = keys_parser.add_subparsers(dest="keys_command", required=True)
    for name, rotation in _ROTATIONS.items():
        keys_sub.add_parser(name, help=rotation.help)
    status = sub.add_parser("status", help="key figures of a running installation")
    status.add_argument(
        "--endpoint",
        action="append",
        default=[],
        metavar="NAME=HOST:PORT",
        help="a process's metrics endpoint (repeat; default: the configured ports)",
    )
    status.add_argument("--interval", type=float, default=2.0, help="seconds between readings")
    status.add_argument("--watch", action="store_true", help="keep reading and redrawing")
    args = parser.parse_args(argv)

    settings = Settings.from_env()
    sc_logging.configure(settings.log_level, settings.log_format, process="stopcovid")
    if args.command == "up":
        from services.ops.up import up  # noqa: PLC0415 (keeps other commands light)

        return up(ha=args.ha)
    if args.command == "migrate":
        return _cmd_migrate(settings)
    if args.command == "certs":
        return certs.run(settings, args)
    if args.command == "keys":
        return _cmd_rotate(settings, args.keys_command)
    if args.command == "status":
        from services.ops import status as status_view  # noqa: PLC0415

        return status_view.run(settings, args.endpoint, max(0.1, args.interval), args.watch)
    if args.command == "roles":
        sys.stdout.write(roles_markdown())
        return 0
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
