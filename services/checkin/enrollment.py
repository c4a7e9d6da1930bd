"""Enrollment and personal tokens: EnrollPerson and IssuePersonalToken."""

from __future__ import annotations

import re
import time
import uuid
from typing import Any, NoReturn

from stopcovid.checkin.v1 import checkin_service_pb2 as pb

from services.checkin.base import CheckInBase, Q, duration
from services.domain.people import enrollment
from services.kernel import audit, errors, tenancy, validation
from services.kernel.rpc import Context, timestamp

_LANGUAGE = re.compile(r"^[A-Za-z]{2,8}(-[A-Za-z0-9]{1,8})*$")
_MAX_WINDOWS = 96


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
        org = tenancy.owner_of_new()
        person_id = uuid.uuid4()
        key = self._keys.people_key()
        phone_enc = key.encrypt(phone.encode(), b"phone|" + person_id.bytes)
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                Q["enroll_person"],
                person_id,
                enrollment.phone_index(self._blind_key, phone),
                phone_enc,
                key.key_id,
                language,
                version,
                org,
            )
            if row is None:
                await self._enrolled_elsewhere(org)
            person_id = row["person_id"]
            await audit.record(
                conn,
                "person.enroll",
                "person",
                str(person_id),
                {"consent_text_version": version, "newly_enrolled": row["inserted"]},
            )
        return pb.EnrollPersonResponse(
            person_id=str(person_id),
            personal_token=pb.PersonalToken(
                token=self._tokens.issue_static(person_id),
                form=pb.PERSONAL_TOKEN_FORM_STATIC,
                key_id=self._tokens.current_kid,
            ),
            newly_enrolled=row["inserted"],
            enroll_time=timestamp(row["enroll_time"]),
        )

    async def _enrolled_elsewhere(self, org: str) -> NoReturn:
        """The number is another organisation's person: nothing of theirs is
        returned or changed, and the refusal is audited (never the number)."""
        await tenancy.refuse(
            self._pool,
            "person",
            "",
            errors.PermissionDenied(
                "this number was enrolled through another organisation's front-end; "
                "the person can use their own personal token here",
                reason="PERSON_ENROLLED_ELSEWHERE",
            ),
            details={"caller_organization": org},
        )

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
