-- Finding an enrolled person (services/domain/people/enrollment.py).

-- name: person_by_id
SELECT * FROM people WHERE person_id = $1;

-- name: person_by_phone_index
SELECT * FROM people WHERE phone_index = $1;
