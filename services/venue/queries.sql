-- Queries of the Venue service. Loaded by name with services.core.db.load_queries.

-- name: insert_venue
-- Creates a venue; with a request_id already used, returns nothing (the caller
-- then fetches the venue that request created).
INSERT INTO venues (venue_id, display_name, setting, address, region_code, capacity,
                    default_stay, created_by, request_id)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
ON CONFLICT (request_id) DO NOTHING
RETURNING *;

-- name: venue_by_request
SELECT * FROM venues WHERE request_id = $1;

-- name: get_venue
SELECT * FROM venues WHERE venue_id = $1;

-- name: get_venue_for_update
SELECT * FROM venues WHERE venue_id = $1 FOR UPDATE;

-- name: list_venues
-- Keyset page in (create_time, venue_id) order; NULL filters match everything.
SELECT * FROM venues
WHERE ($1::text IS NULL OR state = $1)
  AND ($2::text IS NULL OR region_code = $2)
  AND ($3::timestamptz IS NULL OR (create_time, venue_id) > ($3, $4::uuid))
ORDER BY create_time, venue_id
LIMIT $5;

-- name: update_venue
UPDATE venues
SET display_name = $2, setting = $3, address = $4, region_code = $5, capacity = $6,
    default_stay = $7, version = version + 1, update_time = now()
WHERE venue_id = $1
RETURNING *;

-- name: set_venue_state
UPDATE venues
SET state = $2, suspend_reason = $3, version = version + 1, update_time = now()
WHERE venue_id = $1
RETURNING *;
