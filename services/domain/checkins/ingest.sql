-- Queries of the ingest and days-ahead steps (services/domain/checkins/ingest.py),
-- run by the worker pool. Each is one round trip across the workers' trio/asyncio
-- bridge, so each does a whole batch's work set-based, never a row at a time.

-- name: ingest_batch
-- Moves up to $1 inbox rows into the check-in store in one statement, and so in
-- one transaction: the claimed rows are deleted from the inbox and inserted into
-- the store together, or not at all. SKIP LOCKED lets any number of workers
-- claim disjoint batches; a row another worker holds is simply not seen.
--
-- A scan resent after a lost ack can be in the inbox twice, in one batch or in
-- two, or already be stored: ON CONFLICT DO NOTHING keeps the first copy (also
-- against an earlier row of the same INSERT). Self check-ins have NULL device and
-- sequence, and NULLs never conflict, so each of them is stored.
--
-- Rows are inserted in key order so that two batches that hold copies of the
-- same scans take their index locks in the same order and cannot deadlock; the
-- same goes for the device_sequences upsert. The deletion looks the claimed ids
-- up by primary key (= ANY(ARRAY(...))) rather than joining, so it never scans
-- the whole inbox however long the backlog is.
WITH claimed AS (
    SELECT inbox_id
    FROM scan_inbox
    ORDER BY inbox_id
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), moved AS (
    DELETE FROM scan_inbox
    WHERE inbox_id = ANY (ARRAY(SELECT inbox_id FROM claimed))
    RETURNING inbox_id, day, venue_id, device_id, sequence, scan_time, direction, outcome,
              decision_id, day_key_id, person_ref, person_enc, receive_time
), stored AS (
    INSERT INTO checkins (day, venue_id, device_id, sequence, scan_time, direction, outcome,
                          decision_id, day_key_id, person_ref, person_enc, receive_time)
    SELECT day, venue_id, device_id, sequence, scan_time, direction, outcome,
           decision_id, day_key_id, person_ref, person_enc, receive_time
    FROM moved
    ORDER BY day, device_id, sequence, inbox_id
    ON CONFLICT (device_id, sequence, day) DO NOTHING
    RETURNING 1
), sequences AS (
    INSERT INTO device_sequences AS s (device_id, last_sequence)
    SELECT device_id, max(sequence)
    FROM moved
    WHERE device_id IS NOT NULL AND sequence IS NOT NULL
    GROUP BY device_id
    ORDER BY device_id
    ON CONFLICT (device_id) DO UPDATE
        SET last_sequence = greatest(s.last_sequence, excluded.last_sequence)
        WHERE s.last_sequence < excluded.last_sequence
    RETURNING 1
)
SELECT (SELECT count(*) FROM moved) AS claimed,
       (SELECT count(*) FROM stored) AS stored,
       (SELECT count(*) FROM sequences) AS devices_advanced;

-- name: ensure_inbox_partitions
-- After an insert found no partition for a row: creates the partitions of every
-- day waiting in the inbox. Days whose key was destroyed are left alone, so a
-- stray old scan can never bring back a day that expiry removed.
SELECT d.day, ensure_checkin_partition(d.day) AS created
FROM (SELECT DISTINCT day FROM scan_inbox) AS d
WHERE NOT EXISTS (
    SELECT 1 FROM day_keys AS k WHERE k.day = d.day AND k.destroy_time IS NOT NULL
)
ORDER BY d.day;

-- name: ensure_partitions
-- Creates the partitions of the given days ($1), ahead of the scans, except for
-- days whose key was destroyed.
SELECT d.day, ensure_checkin_partition(d.day) AS created
FROM unnest($1::date[]) AS d (day)
WHERE NOT EXISTS (
    SELECT 1 FROM day_keys AS k WHERE k.day = d.day AND k.destroy_time IS NOT NULL
)
ORDER BY d.day;

-- name: register_day_keys
-- Records which day keys exist ($1 days, $2 key ids); the key material stays in
-- the key store. A day already registered keeps its row.
INSERT INTO day_keys (day, key_id)
SELECT d.day, d.key_id
FROM unnest($1::date[], $2::text[]) AS d (day, key_id)
ON CONFLICT (day) DO NOTHING;
