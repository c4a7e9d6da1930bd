-- Queries of the Venue service. Loaded by name with services.kernel.db.load_queries.

-- Tenancy (migration 0012): every query that reads or changes a venue or device
-- for a caller takes the caller's organisation and compares it with the row's
-- owner in its WHERE clause; NULL (MPTC staff, health officials) matches every
-- organisation. A row of another organisation is therefore never read or changed
-- for a venue operator: the handler only learns that nothing matched, and asks
-- venue_owner or device_owner whether to answer NOT_FOUND or NOT_YOUR_*.

-- name: insert_venue
-- Creates a venue; with a request_id this caller (request_owner) already used,
-- returns nothing (the caller then fetches the venue that request created).
INSERT INTO venues (venue_id, display_name, setting, address, region_code, capacity,
                    default_stay, created_by, request_id, owner_organization, request_owner)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
ON CONFLICT (request_owner, request_id) DO NOTHING
RETURNING *;

-- name: venue_by_request
SELECT * FROM venues WHERE request_owner = $1 AND request_id = $2;

-- name: venue_owner
-- Whose a venue is, for the refusal of another organisation's (never its data).
SELECT owner_organization FROM venues WHERE venue_id = $1;

-- name: device_owner
SELECT owner_organization FROM devices WHERE device_id = $1;

-- name: get_venue
SELECT * FROM venues WHERE venue_id = $1 AND ($2::text IS NULL OR owner_organization = $2);

-- name: get_venue_for_update
SELECT * FROM venues
WHERE venue_id = $1 AND ($2::text IS NULL OR owner_organization = $2)
FOR UPDATE;

-- name: list_venues
-- Keyset page in (create_time, venue_id) order; NULL filters match everything.
-- One organisation's page is served by venues_owner_idx.
SELECT * FROM venues
WHERE ($1::text IS NULL OR state = $1)
  AND ($2::text IS NULL OR region_code = $2)
  AND ($3::timestamptz IS NULL OR (create_time, venue_id) > ($3, $4::uuid))
  AND ($6::text IS NULL OR owner_organization = $6)
ORDER BY create_time, venue_id
LIMIT $5;

-- name: update_venue
UPDATE venues
SET display_name = $2, setting = $3, address = $4, region_code = $5, capacity = $6,
    default_stay = $7, version = version + 1, update_time = now()
WHERE venue_id = $1 AND ($8::text IS NULL OR owner_organization = $8)
RETURNING *;

-- name: set_venue_state
UPDATE venues
SET state = $2, suspend_reason = $3, version = version + 1, update_time = now()
WHERE venue_id = $1 AND ($4::text IS NULL OR owner_organization = $4)
RETURNING *;

-- name: get_venue_for_share
-- Locks the venue against a concurrent suspend (whose UPDATE waits) until the
-- device registered at it commits, so no device joins a venue being suspended.
SELECT venue_id, state, owner_organization FROM venues
WHERE venue_id = $1 AND ($2::text IS NULL OR owner_organization = $2)
FOR SHARE;

-- name: insert_device
-- A new device has stored no scans yet, so its last sequence is 0. It belongs to
-- its venue's owner, read here from the venue row the caller may act on ($7): a
-- venue of another organisation inserts nothing.
INSERT INTO devices (device_id, venue_id, display_name, certificate_serial,
                     certificate_expire_time, created_by, owner_organization)
SELECT $1, v.venue_id, $3, $4, $5, $6, v.owner_organization
FROM venues v
WHERE v.venue_id = $2 AND ($7::text IS NULL OR v.owner_organization = $7)
RETURNING *, 0::bigint AS last_sequence;

-- name: get_device
-- A device with the highest sequence stored for it (0 if none; migration 0011).
SELECT d.*, device_last_sequence(d.device_id) AS last_sequence
FROM devices d
WHERE d.device_id = $1 AND ($2::text IS NULL OR d.owner_organization = $2);

-- name: get_device_for_update
SELECT d.*, device_last_sequence(d.device_id) AS last_sequence
FROM devices d
WHERE d.device_id = $1 AND ($2::text IS NULL OR d.owner_organization = $2)
FOR UPDATE OF d;

-- name: list_devices
-- Keyset page in (create_time, device_id) order, optionally of one venue (served
-- by devices_venue_idx) or of one organisation (devices_owner_idx); NULL filters
-- match everything.
SELECT d.*, device_last_sequence(d.device_id) AS last_sequence
FROM devices d
WHERE ($1::uuid IS NULL OR d.venue_id = $1)
  AND ($2::timestamptz IS NULL OR (d.create_time, d.device_id) > ($2, $3::uuid))
  AND ($5::text IS NULL OR d.owner_organization = $5)
ORDER BY d.create_time, d.device_id
LIMIT $4;

-- name: revoke_device
-- Revokes an active device; the devices_notify trigger tells every CheckIn server,
-- which closes the device's open streams. Returns nothing if it was not active.
WITH revoked AS (
    UPDATE devices
    SET state = 'revoked', revoke_time = now(), revoke_reason = $2
    WHERE device_id = $1 AND state = 'active'
      AND ($3::text IS NULL OR owner_organization = $3)
    RETURNING *
)
SELECT r.*, device_last_sequence(r.device_id) AS last_sequence
FROM revoked r;

-- name: transfer_venue
-- Hands a venue to another organisation (MPTC staff, TransferVenue); its devices
-- follow in transfer_devices, in the same transaction.
UPDATE venues
SET owner_organization = $2, version = version + 1, update_time = now()
WHERE venue_id = $1
RETURNING *;

-- name: transfer_devices
UPDATE devices SET owner_organization = $2 WHERE venue_id = $1;
