-- Enrollment by a one-time code (issue 11): a front-end cannot learn whether a
-- number it did not enroll is enrolled, or is a case.
--
-- EnrollPerson of a number the caller's organisation has not enrolled answers the
-- same way whatever the number is (never enrolled, erased, or enrolled by another
-- organisation): a challenge row here and a 6-digit code sent to the number. The
-- second call, with the code, enrolls the number or, if another organisation
-- already enrolled it, links the person to the caller's organisation too.
--
-- A challenge holds no personal data in clear: the phone's keyed blind index (as
-- people.phone_index) and a keyed hash of the code bound to the challenge id,
-- never the code and never the number. It belongs to the organisation that asked
-- for it, dies at expire_time (deleted by every expiry run, and by the next
-- challenge for the same number) and after `max attempts` wrong codes, and is
-- deleted when used.
CREATE TABLE enrollment_challenges (
    verification_id uuid PRIMARY KEY,
    organization text NOT NULL
        CHECK (organization ~ '^[a-z0-9][a-z0-9.-]{0,62}$'),
    phone_index bytea NOT NULL CHECK (length(phone_index) = 32),
    code_hash bytea NOT NULL CHECK (length(code_hash) = 32),
    attempts integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    create_time timestamptz NOT NULL DEFAULT now(),
    expire_time timestamptz NOT NULL,
    CHECK (expire_time > create_time)
);
-- The bounds on outstanding challenges: per organisation and number, per
-- organisation; and the expiry run's scan.
CREATE INDEX enrollment_challenges_phone_idx
    ON enrollment_challenges (organization, phone_index, expire_time);
CREATE INDEX enrollment_challenges_org_idx ON enrollment_challenges (organization, expire_time);
CREATE INDEX enrollment_challenges_expire_idx ON enrollment_challenges (expire_time);
GRANT SELECT, INSERT, UPDATE, DELETE ON enrollment_challenges TO stopcovid_checkin;
GRANT SELECT, DELETE ON enrollment_challenges TO stopcovid_retention, stopcovid_worker;

-- The other organisations a person is one of the people of: those whose
-- front-end the person proved (by the code sent to their phone) they hold the
-- number at, after another organisation enrolled it. people.enrolled_by stays
-- the first. A front-end acts on a person whose enrolled_by is its organisation
-- or who has a row here for it (services/domain/people/enrollment.sql). Erasing
-- the person (withdrawal, inactive-enrollment expiry) deletes the rows with them.
--
-- phone_index is the person's (people.phone_index), so that EnrollPerson's first
-- question, "is this number one of the caller's people", is two probes of indexes
-- that begin with the caller's organisation: a number another organisation
-- enrolled misses them exactly as a number nobody enrolled does, with no row of
-- the other organisation read and rejected (a difference in time otherwise).
CREATE TABLE person_organizations (
    person_id uuid NOT NULL REFERENCES people (person_id) ON DELETE CASCADE,
    organization text NOT NULL
        CHECK (organization ~ '^[a-z0-9][a-z0-9.-]{0,62}$'),
    phone_index bytea NOT NULL CHECK (length(phone_index) = 32),
    link_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (person_id, organization),
    UNIQUE (organization, phone_index)
);
CREATE INDEX people_enrolled_by_phone_idx ON people (enrolled_by, phone_index);
GRANT SELECT, INSERT ON person_organizations TO stopcovid_checkin;
GRANT SELECT ON person_organizations TO stopcovid_exposure;
GRANT SELECT, DELETE ON person_organizations TO stopcovid_retention, stopcovid_worker;
