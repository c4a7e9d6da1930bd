"""Finding an enrolled person from a PersonSelector (phone number, personal token
or person id), the same way in every service that takes one.

A registration front-end finds by phone number or person id only the people its
organisation enrolled or was linked to by a code (the query computes in_scope
from the organisation, services/kernel/tenancy.py); anyone else is the same
NOT_FOUND as a number nobody enrolled, after the same statement and the same
audit write (NOT_YOUR_PERSON for another's person, NOT_FOUND for nobody), so a
front-end learns neither from the answer nor from its time whether another's
number is enrolled. A personal token is the proof only the
person holds: by it, any front-end finds any enrolled person."""

from __future__ import annotations

import hashlib
import hmac
import re
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg

from services.domain.people.tokens import PersonalTokens, TokenRefused
from services.kernel import errors, tenancy, validation
from services.kernel.db import Conn, load_queries

Q = load_queries(Path(__file__).with_name("enrollment.sql"))

E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")


def phone_number(value: str, field: str) -> str:
    """An E.164 number, or INVALID_ARGUMENT naming `field`."""
    phone = value.strip()
    if not E164.match(phone):
        raise errors.InvalidArgument(
            f"{field} must be an E.164 number such as +85512345678", field=field
        )
    return phone


def phone_index(blind_key: bytes, phone: str) -> bytes:
    """The keyed blind index that finds a number without decrypting anything."""
    return hmac.new(blind_key, phone.encode(), hashlib.sha256).digest()


async def find(
    conn: Conn | asyncpg.Pool,
    selector: Any,
    *,
    blind_key: bytes,
    tokens: PersonalTokens,
    audit_pool: asyncpg.Pool,
    field: str = "person",
) -> asyncpg.Record:
    """The people row a stopcovid.common.v1.PersonSelector names, among those the
    caller may act on. INVALID_ARGUMENT for a malformed selector or a refused
    token; NOT_FOUND when nobody enrolled matches (an erased person has no row),
    or nobody the caller's organisation enrolled (audited through `audit_pool`)."""
    kind = selector.WhichOneof("selector")
    org = tenancy.scope()
    if kind == "person_id":
        person_id = validation.uuid_id(selector.person_id, f"{field}.person_id")
        key: Any = person_id
        row = await conn.fetchrow(Q["person_by_id"], person_id, org)
    elif kind == "phone_number":
        phone = phone_number(selector.phone_number, f"{field}.phone_number")
        key = phone_index(blind_key, phone)
        row = await conn.fetchrow(Q["person_by_phone_index"], key, org)
    elif kind == "personal_token":
        try:
            verified = tokens.verify(selector.personal_token, time.time())
        except TokenRefused as refused:
            raise errors.InvalidArgument(
                f"{field}.personal_token refused: {refused.problem.value}",
                field=f"{field}.personal_token",
                metadata={"token_problem": refused.problem.value},
            ) from None
        row = await conn.fetchrow(Q["person_by_id"], verified.person_id, None)
        org = None
    else:
        raise errors.InvalidArgument(f"{field} is required", field=field)
    if row is None or not row["in_scope"]:
        missing = errors.NotFound("no enrolled person matches", metadata={"resource": "person"})
        if org is not None:
            # The same answer, and the same audit write, for another organisation's
            # person and for nobody: only the audit record's reason says which.
            await tenancy.refuse(
                audit_pool,
                "person",
                "",
                missing,
                reason="NOT_FOUND" if row is None else "NOT_YOUR_PERSON",
                details={"selector": kind, "caller_organization": org},
            )
        raise missing
    return row


async def find_id(
    pool: asyncpg.Pool, selector: Any, *, blind_key: bytes, tokens: PersonalTokens
) -> uuid.UUID:
    """The id of the person `selector` names (find, with refusals audited on `pool`)."""
    row = await find(pool, selector, blind_key=blind_key, tokens=tokens, audit_pool=pool)
    person: uuid.UUID = row["person_id"]
    return person
