"""Enrollment and personal tokens: EnrollPerson and IssuePersonalToken.

EnrollPerson answers a number the caller's organisation did not enroll with a
one-time code sent to it (services/domain/people/verification.py) and enrolls or
links it only with that code, so that the answer never says whether another
organisation enrolled the number (issue 11)."""

from __future__ import annotations

import datetime as dt
import functools
import math
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, NoReturn

from stopcovid.checkin.v1 import checkin_service_pb2 as pb

from services.checkin.base import CheckInBase, duration
from services.domain.people import enrollment, verification
from services.kernel import audit, errors, tenancy, validation
from services.kernel.db import one
from services.kernel.rpc import Context, timestamp

_LANGUAGE = re.compile(r"^[A-Za-z]{2,8}(-[A-Za-z0-9]{1,8})*$")
_MAX_WINDOWS = 96


@dataclass(frozen=True)
class _Answer:
    """A validated EnrollPersonRequest."""

    request: pb.EnrollPersonRequest
    phone: str
    version: str
    language: str


class EnrollmentRpcs(CheckInBase):
    # -- enrollment and tokens -------------------------------------------------

    async def EnrollPerson(
        self, request: pb.EnrollPersonRequest, context: Context
    ) -> pb.EnrollPersonResponse:
        phone = enrollment.phone_number(request.phone_number, "phone_number")
        if not request.consent_given:
            raise errors.InvalidArgument(
                "enrollment needs the person's consent", field="consent_given"
            )
        version = validation.text(request.consent_text_version, "consent_text_version", max_len=64)
        language = request.language_code.strip() or "km"
        if len(language) > 35 or not _LANGUAGE.match(language):
            raise errors.InvalidArgument(
                "language_code must be a BCP 47 tag such as km or en", field="language_code"
            )
        answer = _Answer(request, phone, version, language)
        if request.verification_id or request.verification_code:
            return await self._enroll_verified(answer)
        org = tenancy.owner_of_new()
        index = enrollment.phone_index(self._blind_key, phone)
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                verification.Q["enrolled_here"], index, version, language, org
            )
            if row is not None:
                # One of the caller's own people: it learns nothing it did not know.
                await audit.record(
                    conn,
                    "person.enroll",
                    "person",
                    str(row["person_id"]),
                    {"consent_text_version": version, "newly_enrolled": False},
                )
        if row is not None:
            return self._enrolled(row["person_id"], False, row["enroll_time"])
        return await self._send_code(org, index, phone)

    async def _send_code(self, org: str, index: bytes, phone: str) -> pb.EnrollPersonResponse:
        """A new challenge for a number the caller did not enroll, and its code sent:
        the same statements, answer and audit whatever the number is (never
        enrolled, erased, another organisation's person, a case)."""
        settings = self._settings
        verification_id = uuid.uuid4()
        code = verification.new_code()
        digest = verification.code_hash(self._code_key, verification_id, index, code)
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(verification.Q["lock_number"], org, index)
            counts = one(await conn.fetchrow(verification.Q["outstanding"], org, index))
            for limit, count, bound in (
                ("per_number", counts["per_number"], settings.enrollment_codes_per_number),
                (
                    "per_organization",
                    counts["per_organization"],
                    settings.enrollment_codes_per_organization,
                ),
            ):
                if count >= bound:
                    await self._code_limit(org, limit, counts["soonest_s"])
            expire_time = await conn.fetchval(
                verification.Q["insert_challenge"],
                verification_id,
                org,
                index,
                digest,
                float(settings.enrollment_code_ttl_s),
            )
            await audit.record(
                conn,
                "person.enroll.code_sent",
                "enrollment_challenge",
                str(verification_id),
                {"caller_organization": org},
            )
        # After the commit: a stalled gateway must not hold a connection and lock.
        await self._code_sender.send(
            verification_id, phone, verification.text(code, settings.enrollment_code_ttl_s)
        )
        return pb.EnrollPersonResponse(
            state=pb.ENROLLMENT_STATE_CODE_SENT,
            verification_id=str(verification_id),
            verification_expire_time=timestamp(expire_time),
        )

    async def _code_limit(self, org: str, limit: str, soonest_s: float | None) -> NoReturn:
        retry = max(1, math.ceil(soonest_s or 1.0))
        await tenancy.refuse(
            self._pool,
            "enrollment_challenge",
            "",
            errors.ResourceExhausted(
                "too many enrollment codes outstanding; wait for one to expire",
                reason="VERIFICATION_LIMIT",
                metadata={"limit": limit, "retry_after_s": str(retry)},
            ),
            details={"caller_organization": org, "limit": limit},
        )

    async def _enroll_verified(self, answer: _Answer) -> pb.EnrollPersonResponse:
        """The second step: the code proves the person holds the number; the number
        is enrolled by the caller's organisation, or linked to it."""
        request = answer.request
        verification_id = validation.uuid_id(request.verification_id, "verification_id")
        if not verification.CODE.match(request.verification_code):
            raise errors.InvalidArgument(
                f"verification_code must be the {verification.CODE_DIGITS} digits sent",
                field="verification_code",
            )
        org = tenancy.owner_of_new()
        index = enrollment.phone_index(self._blind_key, answer.phone)
        person_id = uuid.uuid4()
        key = self._keys.people_key()
        phone_enc = key.encrypt(answer.phone.encode(), b"phone|" + person_id.bytes)
        row: Any = None
        async with self._pool.acquire() as conn, conn.transaction():
            found = await conn.fetchrow(
                verification.Q["attempt_challenge"],
                verification_id,
                org,
                self._settings.enrollment_code_attempts,
            )
            verified = found is not None and verification.matches(
                self._code_key,
                verification_id,
                index,
                request.verification_code,
                stored_index=found["phone_index"],
                stored_hash=found["code_hash"],
            )
            if verified:
                await conn.execute(verification.Q["use_challenge"], verification_id)
                row = one(
                    await conn.fetchrow(
                        verification.Q["enroll_verified"],
                        person_id,
                        index,
                        phone_enc,
                        key.key_id,
                        answer.language,
                        answer.version,
                        org,
                    )
                )
                linked = row["enrolled_by"] != org
                if linked:
                    await conn.execute(verification.Q["link_person"], row["person_id"], org, index)
                await audit.record(
                    conn,
                    "person.enroll",
                    "person",
                    str(row["person_id"]),
                    {
                        "consent_text_version": answer.version,
                        "newly_enrolled": row["inserted"],
                        "linked": linked,
                        "verification_id": str(verification_id),
                    },
                )
        # A wrong code's attempt is committed above, whatever follows.
        if not verified or row is None:
            await tenancy.refuse(
                self._pool,
                "enrollment_challenge",
                str(verification_id),
                errors.PermissionDenied(
                    "the verification code does not verify; ask for a new code",
                    reason="VERIFICATION_FAILED",
                ),
                details={
                    "caller_organization": org,
                    "cause": "no_live_challenge" if found is None else "wrong_code",
                },
            )
        return self._enrolled(row["person_id"], row["inserted"], row["enroll_time"])

    def _enrolled(
        self, person_id: uuid.UUID, inserted: bool, enroll_time: dt.datetime
    ) -> pb.EnrollPersonResponse:
        return pb.EnrollPersonResponse(
            state=pb.ENROLLMENT_STATE_ENROLLED,
            person_id=str(person_id),
            personal_token=pb.PersonalToken(
                token=self._tokens.issue_static(person_id),
                form=pb.PERSONAL_TOKEN_FORM_STATIC,
                key_id=self._tokens.current_kid,
            ),
            newly_enrolled=inserted,
            enroll_time=timestamp(enroll_time),
        )

    @functools.cached_property
    def _code_key(self) -> bytes:
        return verification.code_key(self._blind_key)

    @functools.cached_property
    def _code_sender(self) -> verification.CodeSender:
        """The SMS sender, made on first use (the settings name it)."""
        return verification.CodeSender(self._settings)

    async def _person(self, selector: Any) -> uuid.UUID:
        """The enrolled person a selector names; NOT_FOUND when none (or erased)."""
        return await enrollment.find_id(
            self._pool, selector, blind_key=self._blind_key, tokens=self._tokens
        )

    async def IssuePersonalToken(
        self, request: pb.IssuePersonalTokenRequest, context: Context
    ) -> pb.IssuePersonalTokenResponse:
        if request.form not in (pb.PERSONAL_TOKEN_FORM_STATIC, pb.PERSONAL_TOKEN_FORM_ROTATING):
            raise errors.InvalidArgument(
                "form must be PERSONAL_TOKEN_FORM_STATIC or PERSONAL_TOKEN_FORM_ROTATING",
                field="form",
            )
        count = request.window_count or 1
        if not 1 <= count <= _MAX_WINDOWS:
            raise errors.InvalidArgument(
                f"window_count must be 0 to {_MAX_WINDOWS}", field="window_count"
            )
        person_id = await self._person(request.person)
        self.decider.active.add(person_id.bytes)
        kid = self._tokens.current_kid
        if request.form == pb.PERSONAL_TOKEN_FORM_STATIC:
            return pb.IssuePersonalTokenResponse(
                personal_tokens=[
                    pb.PersonalToken(
                        token=self._tokens.issue_static(person_id),
                        form=pb.PERSONAL_TOKEN_FORM_STATIC,
                        key_id=kid,
                    )
                ]
            )
        first = self._tokens.window_at(time.time())
        tokens = []
        for window in range(first, first + count):
            start, end = self._tokens.window_bounds(window)
            tokens.append(
                pb.PersonalToken(
                    token=self._tokens.issue_rotating(person_id, window),
                    form=pb.PERSONAL_TOKEN_FORM_ROTATING,
                    key_id=kid,
                    start_time=timestamp(start),
                    expire_time=timestamp(end),
                )
            )
        return pb.IssuePersonalTokenResponse(
            personal_tokens=tokens, window=duration(self._tokens.window_s)
        )
