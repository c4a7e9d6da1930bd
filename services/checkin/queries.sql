-- Queries of the CheckIn service. The hot path itself is a COPY into scan_inbox
-- (services/checkin/commit.py); everything here is per stream or per cache miss.

-- name: get_device
SELECT device_id, venue_id, state, certificate_serial FROM devices WHERE device_id = $1;

-- name: get_devices
SELECT device_id, venue_id, state, certificate_serial FROM devices WHERE device_id = ANY($1);

-- name: get_venue_state
SELECT venue_id, state, display_name FROM venues WHERE venue_id = $1;

-- name: get_venue_states
SELECT venue_id, state, display_name FROM venues WHERE venue_id = ANY($1);

-- name: high_risk_people
SELECT person_id, expire_time FROM risk_status WHERE level = 'high' AND expire_time > now();

-- name: risk_of_people
SELECT person_id, level, expire_time FROM risk_status WHERE person_id = ANY($1);

-- name: erased_people
SELECT person_id FROM erased_people;

-- name: erased_among
SELECT person_id FROM erased_people WHERE person_id = ANY($1);

-- name: take_device
-- Makes the caller the device's one writer: the next epoch (migration 0006).
-- Waits while a group commit holds the old epoch's share lock, so what the old
-- writer committed is visible to every statement after this one, and it can
-- commit nothing more. Its own transaction, kept short: it blocks those commits.
INSERT INTO device_streams AS s (device_id, epoch) VALUES ($1, 1)
ON CONFLICT (device_id) DO UPDATE SET epoch = s.epoch + 1, open_time = now()
RETURNING epoch;

-- name: device_epochs
-- The current epoch of these devices ($1), after a stopcovid_stream notification.
SELECT device_id, epoch FROM device_streams WHERE device_id = ANY($1::uuid[]);

-- name: hold_epochs
-- Inside a group commit's transaction, before its rows are written: the devices
-- ($1, with the epochs $2 their rows were decided under) whose epoch is still
-- current. The share lock makes a take_device of any of them wait until this
-- transaction ends. Rows of devices not returned are not written. In device
-- order, so commits that lock the same devices never deadlock.
SELECT s.device_id, s.epoch
FROM device_streams AS s
JOIN unnest($1::uuid[], $2::bigint[]) AS c (device_id, epoch) USING (device_id)
WHERE s.epoch = c.epoch
ORDER BY s.device_id
FOR SHARE OF s;

-- name: device_high_water
-- The highest sequence the device used (stored, in the inbox, or retired with an
-- expired day), and the highest one retired with an expired day (0 if none).
SELECT device_last_sequence($1) AS high_water,
       coalesce((SELECT retired_through FROM device_sequences WHERE device_id = $1), 0)
           AS retired_through;

-- name: mark_commit
-- The group commit's mark ($1, a fresh token) and its transaction id (migration
-- 0012): after a failover the id alone may name another transaction.
INSERT INTO commit_marks (token) VALUES ($1) RETURNING pg_current_xact_id()::text::bigint;

-- name: commit_outcome
-- What became of a group commit: its transaction's status ($1 from mark_commit)
-- and whether its mark ($2) is stored.
SELECT pg_xact_status($1::bigint::text::xid8) AS status,
       EXISTS (SELECT 1 FROM commit_marks WHERE token = $2) AS marked;

-- name: prune_commit_marks
-- Marks of commits long settled (migration 0012).
DELETE FROM commit_marks WHERE made < now() - interval '1 hour';

-- name: stored_scans
-- Scans of the device with these sequence numbers ($2), stored (on any day: the
-- store's key includes the day, a sequence number's uniqueness does not) or in
-- the inbox: how a resend is recognised as a duplicate, or a reused number. One
-- index probe per day partition and sequence.
SELECT sequence, scan_time, direction, person_ref FROM checkins
 WHERE device_id = $1 AND sequence = ANY($2::bigint[])
UNION ALL
SELECT sequence, scan_time, direction, person_ref FROM scan_inbox
 WHERE device_id = $1 AND sequence = ANY($2::bigint[]);

-- name: inbox_state
-- The ends of the inbox: their distance is the rows waiting for the workers, and
-- the smallest id rises as workers move rows (in id order). Reads only the ends of
-- the primary key, so it stays cheap however long the inbox grows. oldest_s: the
-- age of the oldest row in seconds (NULL when empty), by the same index.
SELECT min(inbox_id) AS low, max(inbox_id) AS high,
       (SELECT extract(epoch FROM now() - receive_time)::float8
        FROM scan_inbox ORDER BY inbox_id LIMIT 1) AS oldest_s
FROM scan_inbox;

-- name: touch_people
-- Activity for the inactive-enrollment retention class: people seen by this
-- server (scans, tokens issued). Rewrites a row at most hourly. The ids come as
-- the 16 bytes the server holds ($1) and become uuids here: making a Python UUID
-- of each, every minute, stopped the CheckIn server's event loop for tens of ms
-- (50,000 people in `./dev bench`: the minute's slowest second).
UPDATE people SET last_activity_time = now()
WHERE person_id = ANY (ARRAY(SELECT encode(p, 'hex')::uuid FROM unnest($1::bytea[]) AS p))
  AND last_activity_time < now() - interval '1 hour';

-- name: claim_self_checkin
-- A request_id is the caller's own ($5, tenancy.request_owner): another front-end
-- using the same id claims its own and never reads this one's outcome.
INSERT INTO self_checkin_requests (request_id, venue_id, outcome, decision_id, request_owner)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (request_owner, request_id) DO NOTHING
RETURNING request_id;

-- name: get_self_checkin
SELECT venue_id, outcome, decision_id FROM self_checkin_requests
WHERE request_owner = $1 AND request_id = $2;
