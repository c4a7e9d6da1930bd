-- Queries of the trace job (services/domain/exposure/trace_job.py), run by the
-- worker pool. Each step does its rows set-based (unnest of arrays, named in the
-- order of the records of trace_results.py), never one statement per row.

-- name: claim_trace
-- Claims the oldest trace waiting for a worker: queued, or running with a lease
-- that passed (its worker died, so it is re-run from scratch). SKIP LOCKED lets
-- any number of workers claim different traces. The counters restart, because a
-- re-run replaces whatever a dead run left. What interrupted an earlier run
-- (failure_step, failure_error) is returned: a trace given up names it. $1 lease
-- seconds, $2 worker id.
WITH next AS (
    SELECT trace_id
    FROM traces
    WHERE state = 'queued' OR (state = 'running' AND lease_until < now())
    ORDER BY create_time, trace_id
    LIMIT 1
    FOR UPDATE SKIP LOCKED
)
UPDATE traces AS t
SET state = 'running',
    start_time = coalesce(t.start_time, now()),
    lease_until = now() + make_interval(secs => $1),
    attempt_count = t.attempt_count + 1,
    worker_id = $2,
    visits_found = 0,
    visits_searched = 0,
    contacts_found = 0,
    error_message = ''
FROM next, cases AS c
WHERE t.trace_id = next.trace_id AND c.case_id = t.case_id
RETURNING t.trace_id, t.case_id, t.grant_id, t.window_start, t.window_end, t.attempt_count,
          t.failure_step, t.failure_error, c.person_enc AS case_person_enc;

-- name: trace_progress
-- Reports progress and renews the lease, only while this worker still holds the
-- trace (nothing is returned when it was cancelled, or re-claimed after the
-- lease passed). $1 trace, $2 worker, $3 lease seconds, $4 visits found,
-- $5 visits searched, $6 contacts found.
UPDATE traces
SET lease_until = now() + make_interval(secs => $3),
    visits_found = $4,
    visits_searched = $5,
    contacts_found = $6
WHERE trace_id = $1 AND worker_id = $2 AND state = 'running'
RETURNING trace_id;

-- name: lock_own_trace
-- Locks the trace for the final transaction, if this worker still holds it. A
-- revocation that cancels the trace waits for this transaction (or this one
-- sees the trace cancelled and stops).
SELECT trace_id FROM traces
WHERE trace_id = $1 AND worker_id = $2 AND state = 'running'
FOR UPDATE;

-- name: end_trace
-- Ends a trace this worker holds: $3 state (succeeded or cancelled), $4 error
-- message (never personal data), $5 level counts, $6 rows skipped by reason
-- (jsonb), $7 erased contacts, $8 contacts who are confirmed cases. What
-- interrupted an earlier run no longer matters.
UPDATE traces
SET state = $3,
    end_time = now(),
    lease_until = NULL,
    error_message = $4,
    level_counts = $5::jsonb,
    skipped_rows = coalesce($6::jsonb, '{}'),
    erased_contacts = coalesce($7::int, 0),
    case_contacts = coalesce($8::int, 0),
    failure_step = NULL,
    failure_error = ''
WHERE trace_id = $1 AND worker_id = $2 AND state = 'running'
RETURNING trace_id;

-- name: fail_trace
-- Fails a trace: a step raised ($3 the step, $4 the error's class), or its runs
-- kept dying ($3, $4: what interrupted the last, when known). $2 error message
-- (never personal data).
UPDATE traces
SET state = 'failed', end_time = now(), lease_until = NULL, error_message = $2,
    failure_step = $3, failure_error = $4
WHERE trace_id = $1 AND state = 'running'
RETURNING trace_id;

-- name: requeue_trace
-- Hands a trace back (the worker is stopping, or the database failed mid-run) so
-- that it is claimed again at once rather than after its lease. $3, $4: the step
-- the database failed in and the error's class (NULL and '' when stopping).
UPDATE traces
SET state = 'queued', lease_until = NULL, worker_id = NULL,
    failure_step = coalesce($3, failure_step),
    failure_error = CASE WHEN $3::text IS NULL THEN failure_error ELSE $4 END
WHERE trace_id = $1 AND worker_id = $2 AND state = 'running';

-- name: contact_standing
-- The standing of the people a trace found ($1): erased (no longer enrolled:
-- withdrew, or the enrollment expired) or a confirmed case now.
SELECT u.person_id,
       p.person_id IS NULL AS erased,
       c.person_id IS NOT NULL AS confirmed_case
FROM unnest($1::uuid[]) AS u (person_id)
LEFT JOIN people AS p ON p.person_id = u.person_id
LEFT JOIN confirmed_cases AS c ON c.person_id = u.person_id;

-- name: delete_trace_contacts
-- A re-run replaces what an earlier, dead run may have left.
DELETE FROM trace_contacts WHERE trace_id = $1;

-- name: delete_case_records
DELETE FROM case_records WHERE trace_id = $1;

-- name: insert_trace_contacts
INSERT INTO trace_contacts (trace_id, row_number, case_id, contact_ref, level_rank, venue_id,
                            case_visit_start, case_visit_end, contact_stay_start,
                            contact_stay_end, overlap, stay_end_estimated, rule,
                            person_index, person_enc)
SELECT $1, u.row_number, $2, u.contact_ref, u.level_rank, u.venue_id, u.case_visit_start,
       u.case_visit_end, u.contact_stay_start, u.contact_stay_end, u.overlap,
       u.stay_end_estimated, u.rule, u.person_index, u.person_enc
FROM unnest($3::int[], $4::text[], $5::smallint[], $6::uuid[], $7::timestamptz[],
            $8::timestamptz[], $9::timestamptz[], $10::timestamptz[], $11::interval[],
            $12::boolean[], $13::text[], $14::bytea[], $15::bytea[])
     AS u (row_number, contact_ref, level_rank, venue_id, case_visit_start, case_visit_end,
           contact_stay_start, contact_stay_end, overlap, stay_end_estimated, rule,
           person_index, person_enc);

-- name: insert_case_records
INSERT INTO case_records (case_id, trace_id, subject, contact_ref, venue_id, scan_time,
                          direction, person_index, person_enc)
SELECT $1, $2, u.subject, u.contact_ref, u.venue_id, u.scan_time, u.direction,
       u.person_index, u.person_enc
FROM unnest($3::text[], $4::text[], $5::uuid[], $6::timestamptz[], $7::text[], $8::bytea[],
            $9::bytea[])
     AS u (subject, contact_ref, venue_id, scan_time, direction, person_index, person_enc)
ORDER BY u.scan_time;

-- name: raise_risk
-- Sets the contacts' risk levels, never lowering one: a row changes only when
-- its status is over (expired or cleared) or the new level is higher, or the
-- same level lasts longer. A confirmed case (the confirmed_cases view) is never
-- raised as a contact (the worker leaves them out; this holds for one reported
-- meanwhile); a status cleared by hand after this exposure (a negative test) is
-- not raised again by it; people erased meanwhile (no longer in people) are
-- skipped. Rows go in person order, so two traces cannot deadlock. Returns the
-- people changed.
WITH u AS (
    SELECT *
    FROM unnest($1::uuid[], $2::text[], $3::timestamptz[], $4::timestamptz[], $5::uuid[],
                $6::text[], $7::interval[], $8::text[])
         AS u (person_id, level, exposure_time, expire_time, venue_id, venue_display_name,
               overlap, rule)
    WHERE EXISTS (SELECT 1 FROM people AS p WHERE p.person_id = u.person_id)
    ORDER BY u.person_id
)
INSERT INTO risk_status AS r (person_id, level, expire_time, update_time, reason, exposure_time,
                              venue_id, venue_display_name, overlap, rule)
SELECT person_id, level, expire_time, now(), 'venue_contact', exposure_time, venue_id,
       venue_display_name, overlap, rule
FROM u
ON CONFLICT (person_id) DO UPDATE
SET level = excluded.level,
    expire_time = excluded.expire_time,
    update_time = now(),
    reason = excluded.reason,
    exposure_time = excluded.exposure_time,
    venue_id = excluded.venue_id,
    venue_display_name = excluded.venue_display_name,
    overlap = excluded.overlap,
    rule = excluded.rule
WHERE NOT (r.clear_time IS NOT NULL AND r.level = 'none'
           AND r.clear_time >= excluded.exposure_time)
  AND NOT EXISTS (SELECT 1 FROM confirmed_cases AS c WHERE c.person_id = r.person_id)
  AND (r.level = 'none'
       OR r.expire_time <= now()
       OR array_position(ARRAY['none', 'low', 'medium', 'high'], excluded.level)
          > array_position(ARRAY['none', 'low', 'medium', 'high'], r.level)
       OR (excluded.level = r.level AND excluded.expire_time > r.expire_time))
RETURNING person_id;

-- name: queue_notifications
-- One notification per contact per case, whatever re-traces find later: the
-- first one queued stands. People erased meanwhile get none, nor do confirmed
-- cases (one reported meanwhile included). The language of the template is the
-- person's. Wakes the outbox workers.
WITH u AS (
    SELECT u.*, p.language_code
    FROM unnest($4::uuid[], $5::bytea[], $6::bytea[], $7::text[], $8::text[], $9::uuid[],
                $10::date[], $11::uuid[])
         AS u (notification_id, person_index, person_enc, contact_ref, risk_level, venue_id,
               exposure_date, person_id)
    JOIN people AS p ON p.person_id = u.person_id
    WHERE NOT EXISTS (SELECT 1 FROM confirmed_cases AS c WHERE c.person_id = u.person_id)
), queued AS (
    INSERT INTO notifications (notification_id, trace_id, grant_id, case_id, contact_ref,
                               person_index, person_enc, risk_level, template, venue_id,
                               exposure_date)
    SELECT notification_id, $1, $2, $3, contact_ref, person_index, person_enc, risk_level,
           'exposure-' || risk_level || '-'
               || CASE WHEN language_code ILIKE 'en%' THEN 'en' ELSE 'km' END || '-1',
           venue_id, exposure_date
    FROM u
    ORDER BY person_index
    ON CONFLICT (case_id, person_index) DO NOTHING
    RETURNING notification_id
)
SELECT count(*) AS queued, pg_notify('stopcovid_notify', '') AS woke FROM queued;
