-- Finding an enrolled person (services/domain/people/enrollment.py).
--
-- $2 is the organisation the caller acts for (a registration front-end's), and a
-- person enrolled by another organisation matches nothing; NULL (health officials,
-- a person who proved themself with their own token) matches every person.

-- name: person_by_id
SELECT * FROM people WHERE person_id = $1 AND ($2::text IS NULL OR enrolled_by = $2);

-- name: person_by_phone_index
SELECT * FROM people WHERE phone_index = $1 AND ($2::text IS NULL OR enrolled_by = $2);
