"""`stopcovid`: the operator's command line.

stopcovid up                      run the whole system (embedded Postgres if none configured)
stopcovid migrate                 create roles/database if needed and apply migrations
stopcovid certs ...               the PKI: create-root, create-ca, issue, issue-server,
                                  renew, revoke, list (services/ops/certs.py, docs/pki.md)
stopcovid roles                   print the RPC -> roles table (markdown), from the protos
stopcovid keys ...                rotate the personal-token or people key
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from services.kernel import auth, keys
from services.kernel import logging as sc_logging
from services.kernel.config import Settings
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


def _cmd_rotate_token_key(settings: Settings) -> int:
    store = keys.open_keystore(settings.keystore_dir, settings.secrets_dir)
    kid = store.rotate_token_key()
    print(
        f"new personal-token key: {kid} (older keys keep verifying).\n"
        "Restart the CheckIn servers to issue tokens with it."
    )
    return 0


def _cmd_rotate_people_key(settings: Settings) -> int:
    store = keys.open_keystore(settings.keystore_dir, settings.secrets_dir)
    kid = store.rotate_people_key()
    print(
        f"new people key: {kid} (data under older keys still decrypts).\n"
        "Restart the CheckIn and Retention servers to encrypt with it."
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stopcovid", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="run the whole system")
    sub.add_parser("migrate", help="apply database migrations")
    certs.add_parser(sub)
    sub.add_parser("roles", help="print the RPC -> roles table")
    keys_parser = sub.add_parser("keys", help="the key store")
    keys_sub = keys_parser.add_subparsers(dest="keys_command", required=True)
    keys_sub.add_parser("rotate-token", help="make a new personal-token key current")
    keys_sub.add_parser("rotate-people", help="make a new people (phone) key current")
    args = parser.parse_args(argv)

    settings = Settings.from_env()
    sc_logging.configure(settings.log_level, settings.log_format, process="stopcovid")
    if args.command == "up":
        from services.ops.up import up  # noqa: PLC0415 (keeps other commands light)

        return up()
    if args.command == "migrate":
        return _cmd_migrate(settings)
    if args.command == "certs":
        return certs.run(settings, args)
    if args.command == "keys":
        if args.keys_command == "rotate-people":
            return _cmd_rotate_people_key(settings)
        return _cmd_rotate_token_key(settings)
    if args.command == "roles":
        sys.stdout.write(roles_markdown())
        return 0
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
