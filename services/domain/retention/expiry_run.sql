-- Queries of one expiry run (services/domain/retention/expiry_run.py and its steps:
-- check_in_expiry.py, case_expiry.py, row_expiry.py; loaded by run_context.py),
-- shared by the Retention server (RunExpiry) and the workers (the schedule). Each
-- is set-based: a run makes a handful of round trips whatever the amount of data.

-- name: lock
-- One run at a time, cluster-wide: a second run waits here until the first is
-- done, then finds only what is left.
SELECT pg_advisory_lock(7210530681000000005);

-- name: unlock
SELECT pg_advisory_unlock(7210530681000000005);

-- name: policies
SELECT data_class, period_days FROM retention_policies;

-- name: expirable_days
-- Days up to $1 (the last day wholly past the period) that still hold something
-- to expire: a partition of the store, or a day key not yet recorded destroyed.
SELECT day FROM (
    SELECT to_date(substr(c.relname, 10), 'YYYYMMDD') AS day
    FROM pg_inherits AS i
    JOIN pg_class AS c ON c.oid = i.inhrelid
    WHERE i.inhparent = 'public.checkins'::regclass
      AND c.relname ~ '^checkins_[0-9]{8}$'
    UNION
    SELECT day FROM day_keys WHERE destroy_time IS NULL
) AS d
WHERE day <= $1
ORDER BY day;

-- name: unsealed_days
-- Days up to $1 (beyond the longest scan age: nothing new can arrive) whose rows
-- are not counted yet.
SELECT day FROM day_keys
WHERE count_time IS NULL AND destroy_time IS NULL AND day <= $1
ORDER BY day;

-- name: seal_day
-- Counts one day's rows (partition pruning reads only its partition) and how
-- many are denials at the door (the ENTRY_DECISIONS class lives there), once;
-- and records each device's highest sequence number on the day, which expiry
-- retires with it (migration 0006). One pass over the day.
WITH per_device AS (
    SELECT device_id, max(sequence) AS max_sequence, count(*) AS row_count,
           count(*) FILTER (WHERE outcome = 'denied') AS denied_count
    FROM checkins WHERE day = $1
    GROUP BY device_id
), recorded AS (
    INSERT INTO device_day_sequences (day, device_id, max_sequence)
    SELECT $1, device_id, max_sequence FROM per_device
    WHERE device_id IS NOT NULL AND max_sequence IS NOT NULL
    ON CONFLICT (day, device_id) DO UPDATE
        SET max_sequence = greatest(device_day_sequences.max_sequence, excluded.max_sequence)
    RETURNING 1
)
UPDATE day_keys AS k
SET row_count = c.row_count, denied_count = c.denied_count, count_time = now()
FROM (SELECT coalesce(sum(row_count), 0) AS row_count,
             coalesce(sum(denied_count), 0) AS denied_count,
             (SELECT count(*) FROM recorded) AS devices
      FROM per_device) AS c
WHERE k.day = $1;

-- name: sealed_count
SELECT row_count, denied_count FROM day_keys WHERE day = $1 AND count_time IS NOT NULL;

-- name: count_day
-- For a day never sealed (rows but no day_keys row, or expired before it could
-- be sealed): counted now.
SELECT count(*) AS row_count, count(*) FILTER (WHERE outcome = 'denied') AS denied_count
FROM checkins WHERE day = $1;

-- name: expire_day
-- Detaches the day's partition and deletes its inbox rows (SECURITY DEFINER, 0004).
SELECT dropped, inbox_rows FROM expire_checkin_day($1);

-- name: drop_expired
-- Removes the files of detached partitions (0004), after the expiry committed.
SELECT drop_expired_checkins();

-- name: record_day_keys_destroyed
-- Records the days' keys ($1) destroyed, also for a day that had a partition but
-- no day_keys row, so ingest never makes its partition again. Returns the days
-- whose destruction this run recorded.
INSERT INTO day_keys (day, key_id, destroy_time)
SELECT d.day, 'day-' || to_char(d.day, 'YYYY-MM-DD'), now()
FROM unnest($1::date[]) AS d (day)
ON CONFLICT (day) DO UPDATE SET destroy_time = now()
    WHERE day_keys.destroy_time IS NULL
RETURNING day, key_id;

-- name: expirable_cases
-- Cases not yet purged whose case records are past the period: counted from the
-- last of the case's report, trace (end, else creation) and case record. A
-- case with a trace queued or running is left for the next run.
SELECT c.case_id,
       (SELECT count(*) FROM trace_contacts AS tc
         WHERE tc.trace_id IN (SELECT t.trace_id FROM traces AS t WHERE t.case_id = c.case_id))
           AS contact_count,
       (SELECT count(*) FROM case_records AS r WHERE r.case_id = c.case_id) AS record_count,
       least((SELECT min(r.scan_time) FROM case_records AS r WHERE r.case_id = c.case_id),
             (SELECT min(t.window_start) FROM traces AS t WHERE t.case_id = c.case_id),
             c.window_start) AS data_start,
       greatest((SELECT max(r.scan_time) FROM case_records AS r WHERE r.case_id = c.case_id),
                (SELECT max(t.window_end) FROM traces AS t WHERE t.case_id = c.case_id),
                c.window_end) AS data_end
FROM cases AS c
WHERE c.purge_time IS NULL
  AND greatest(c.report_time,
               (SELECT max(coalesce(t.end_time, t.create_time)) FROM traces AS t
                 WHERE t.case_id = c.case_id),
               (SELECT max(r.create_time) FROM case_records AS r WHERE r.case_id = c.case_id))
      <= $1
  AND NOT EXISTS (SELECT 1 FROM traces AS t
                  WHERE t.case_id = c.case_id AND t.state IN ('queued', 'running'))
ORDER BY c.case_id;

-- name: purge_cases
-- Deletes the cases' trace contacts and case records and their encrypted person;
-- the cases stay (ids, dates, counts) with purge_time set.
WITH contacts AS (
    DELETE FROM trace_contacts
    WHERE trace_id IN (SELECT trace_id FROM traces WHERE case_id = ANY ($1::uuid[]))
    RETURNING 1
), records AS (
    DELETE FROM case_records WHERE case_id = ANY ($1::uuid[])
    RETURNING 1
), purged AS (
    UPDATE cases SET person_enc = '\x'::bytea, purge_time = now()
    WHERE case_id = ANY ($1::uuid[]) AND purge_time IS NULL
    RETURNING 1
)
SELECT (SELECT count(*) FROM contacts) AS contact_count,
       (SELECT count(*) FROM records) AS record_count,
       (SELECT count(*) FROM purged) AS case_count;

-- name: count_notifications
-- Notifications sent, given up or cancelled at or before $1.
SELECT count(*) AS row_count, min(finish_time) AS data_start, max(finish_time) AS data_end
FROM notifications
WHERE state IN ('sent', 'failed', 'cancelled') AND finish_time <= $1;

-- name: delete_notifications
WITH gone AS (
    DELETE FROM notifications
    WHERE state IN ('sent', 'failed', 'cancelled') AND finish_time <= $1
    RETURNING finish_time
)
SELECT count(*) AS row_count, min(finish_time) AS data_start, max(finish_time) AS data_end
FROM gone;

-- name: count_inactive_people
SELECT count(*) AS row_count, min(last_activity_time) AS data_start,
       max(last_activity_time) AS data_end
FROM people
WHERE last_activity_time <= $1;

-- name: delete_inactive_people
-- Deletes enrollments without activity since $1 and records them as erased, so
-- their tokens (which still verify cryptographically) are refused at the door.
WITH gone AS (
    DELETE FROM people WHERE last_activity_time <= $1
    RETURNING person_id, last_activity_time
), erased AS (
    INSERT INTO erased_people (person_id)
    SELECT person_id FROM gone
    ON CONFLICT (person_id) DO NOTHING
    RETURNING 1
)
SELECT count(*) AS row_count, min(last_activity_time) AS data_start,
       max(last_activity_time) AS data_end
FROM gone;

-- name: insert_report
INSERT INTO deletion_reports (deletion_report_id, run_id, data_class, period_days, row_count,
                              data_start, data_end, destroyed_key_ids, trigger, requester)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
RETURNING *;

-- name: expire_audit
-- Audit events (a prefix of the chain), with a checkpoint kept (0005).
SELECT expire_audit_before($1);

-- name: count_audit
-- What expire_audit would delete (dry runs, on demand: the Retention role).
SELECT count(*) FROM audit_events
WHERE sequence <= (SELECT max(sequence) FROM audit_events WHERE occur_time < $1);

-- name: expire_grievances
-- Grievances resolved before the cutoff, with their messages (0005).
SELECT expire_grievances_before($1);

-- name: count_grievances
SELECT count(*) FROM grievances WHERE state = 'resolved' AND resolve_time < $1;

-- name: delete_expired_challenges
-- EnrollPerson's one-time code challenges (migration 0016) past their own
-- expire time: not a data class with a period, they live minutes, and every run
-- deletes those that are dead (the CheckIn server deletes a number's dead ones
-- itself when it opens another).
WITH gone AS (DELETE FROM enrollment_challenges WHERE expire_time <= $1 RETURNING 1)
SELECT count(*) FROM gone;
