-- Finding an enrolled person (services/domain/people/enrollment.py).
--
-- $2 is the organisation the caller acts for (a registration front-end's): a
-- person is in its scope when it enrolled them or they were linked to it by a
-- code sent to their phone (person_organizations, migration 0016). NULL (health
-- officials, a person who proved themself with their own token) has every person
-- in scope. The row is returned either way, with in_scope, so that a number of
-- another organisation and a number nobody enrolled cost the caller one statement
-- alike and the handler chooses the audit reason without a second one.

-- name: person_by_id
SELECT p.*, ($2::text IS NULL OR p.enrolled_by = $2 OR EXISTS (
           SELECT 1 FROM person_organizations l
           WHERE l.person_id = p.person_id AND l.organization = $2)) AS in_scope
FROM people p
WHERE p.person_id = $1;

-- name: person_by_phone_index
SELECT p.*, ($2::text IS NULL OR p.enrolled_by = $2 OR EXISTS (
           SELECT 1 FROM person_organizations l
           WHERE l.person_id = p.person_id AND l.organization = $2)) AS in_scope
FROM people p
WHERE p.phone_index = $1;
