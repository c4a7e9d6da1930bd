-- Queries of the Venue service. Loaded by name with services.kernel.db.load_queries.

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

-- name: get_venue_for_share
-- Locks the venue against a concurrent suspend (whose UPDATE waits) until the
-- device registered at it commits, so no device joins a venue being suspended.
SELECT venue_id, state FROM venues WHERE venue_id = $1 FOR SHARE;

-- name: insert_device
-- A new device has stored no scans yet, so its last sequence is 0.
INSERT INTO devices (device_id, venue_id, display_name, certificate_serial,
                     certificate_expire_time, created_by)
VALUES ($1, $2, $3, $4, $5, $6)
RETURNING *, 0::bigint AS last_sequence;

-- name: get_device
-- A device with the highest sequence stored for it (0 if none; migration 0011).
SELECT d.*, device_last_sequence(d.device_id) AS last_sequence
FROM devices d
WHERE d.device_id = $1;

-- name: get_device_for_update
SELECT d.*, device_last_sequence(d.device_id) AS last_sequence
FROM devices d
WHERE d.device_id = $1
FOR UPDATE OF d;

-- name: list_devices
-- Keyset page in (create_time, device_id) order, optionally of one venue (served
-- by devices_venue_idx); NULL filters match everything.
SELECT d.*, device_last_sequence(d.device_id) AS last_sequence
FROM devices d
WHERE ($1::uuid IS NULL OR d.venue_id = $1)
  AND ($2::timestamptz IS NULL OR (d.create_time, d.device_id) > ($2, $3::uuid))
ORDER BY d.create_time, d.device_id
LIMIT $4;

-- name: revoke_device
-- Revokes an active device; the devices_notify trigger tells every CheckIn server,
-- which closes the device's open streams. Returns nothing if it was not active.
WITH revoked AS (
    UPDATE devices
    SET state = 'revoked', revoke_time = now(), revoke_reason = $2
    WHERE device_id = $1 AND state = 'active'
    RETURNING *
)
SELECT r.*, device_last_sequence(r.device_id) AS last_sequence
FROM revoked r;
