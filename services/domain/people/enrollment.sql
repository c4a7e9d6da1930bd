-- Finding an enrolled person (services/domain/people/enrollment.py).
--
-- $2 is the organisation the caller acts for (a registration front-end's), and
-- matches the people it enrolled and those linked to it by a code sent to their
-- phone (person_organizations, migration 0016); a person of other organisations
-- only matches nothing. NULL (health officials, a person who proved themself with
-- their own token) matches every person.

-- name: person_by_id
SELECT * FROM people p
WHERE p.person_id = $1
  AND ($2::text IS NULL OR p.enrolled_by = $2 OR EXISTS (
       SELECT 1 FROM person_organizations l
       WHERE l.person_id = p.person_id AND l.organization = $2));

-- name: person_by_phone_index
SELECT * FROM people p
WHERE p.phone_index = $1
  AND ($2::text IS NULL OR p.enrolled_by = $2 OR EXISTS (
       SELECT 1 FROM person_organizations l
       WHERE l.person_id = p.person_id AND l.organization = $2));
