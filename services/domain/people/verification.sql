-- Enrollment by a one-time code (services/checkin/enrollment.py, migration 0016).
-- $org is always the caller's organisation: a challenge of another organisation
-- is never read, counted or changed.

-- name: enrolled_here
-- A number the caller's organisation ($4) enrolled or was linked to: its consent
-- is recorded again and the person returned. Nothing for any other number.
-- Both probes are of indexes led by the organisation (migration 0016), so another
-- organisation's number costs what a number nobody enrolled costs: no row read.
UPDATE people AS p
   SET consent_text_version = $2, consent_time = now(), language_code = $3,
       last_activity_time = now()
 WHERE p.person_id = (
        SELECT person_id FROM people WHERE enrolled_by = $4 AND phone_index = $1
        UNION ALL
        SELECT person_id FROM person_organizations WHERE organization = $4 AND phone_index = $1
        LIMIT 1)
RETURNING p.person_id, p.enroll_time;

-- name: lock_number
-- Serializes the challenges of one organisation ($1) for one number ($2), so
-- the bound on outstanding codes per number holds under concurrent calls.
SELECT pg_advisory_xact_lock(hashtextextended($1 || encode($2::bytea, 'hex'), 4416));

-- name: outstanding
-- The organisation's ($1) challenges still alive, for the number ($2) and in all,
-- and when the soonest of the number's (or else the organisation's) expires.
-- Expired ones of the number go first: they count for nothing and hold nothing.
WITH swept AS (
    DELETE FROM enrollment_challenges
    WHERE organization = $1 AND phone_index = $2 AND expire_time <= now()
)
SELECT count(*) FILTER (WHERE phone_index = $2) AS per_number,
       count(*) AS per_organization,
       extract(epoch FROM coalesce(min(expire_time) FILTER (WHERE phone_index = $2),
                                   min(expire_time)) - now())::float8 AS soonest_s
FROM enrollment_challenges
WHERE organization = $1 AND expire_time > now();

-- name: insert_challenge
INSERT INTO enrollment_challenges (verification_id, organization, phone_index, code_hash,
                                   expire_time)
VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5))
RETURNING expire_time;

-- name: attempt_challenge
-- One attempt at the organisation's ($2) live challenge $1, counted before the
-- code is compared (so a concurrent guess waits on the row lock and is counted
-- too); nothing when it is unknown, another organisation's, expired, used or
-- spent ($3 attempts).
UPDATE enrollment_challenges
   SET attempts = attempts + 1
 WHERE verification_id = $1 AND organization = $2 AND expire_time > now()
   AND attempts < $3
RETURNING phone_index, code_hash;

-- name: use_challenge
DELETE FROM enrollment_challenges WHERE verification_id = $1;

-- name: enroll_verified
-- The number, proven held by the person, enrolled by the caller's organisation
-- ($7), or the consent recorded again for whoever enrolled it; enrolled_by says
-- whose person it was.
INSERT INTO people AS p (person_id, phone_index, phone_enc, people_key_id, language_code,
                         consent_text_version, consent_time, enrolled_by)
VALUES ($1, $2, $3, $4, $5, $6, now(), $7)
ON CONFLICT (phone_index) DO UPDATE
   SET consent_text_version = excluded.consent_text_version,
       consent_time = excluded.consent_time,
       language_code = excluded.language_code,
       last_activity_time = now()
RETURNING p.person_id, p.enroll_time, (p.xmax = 0) AS inserted, p.enrolled_by;

-- name: link_person
-- The person becomes one of the caller's ($2) people too.
INSERT INTO person_organizations (person_id, organization, phone_index) VALUES ($1, $2, $3)
ON CONFLICT DO NOTHING;
