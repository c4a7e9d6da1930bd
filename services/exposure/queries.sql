-- Queries of the Exposure service. Loaded by name with services.kernel.db.load_queries.
-- Access-grant checks live in services/domain/exposure/grants.sql (shared with the workers).

-- name: lock_key
-- Serialises writers of one key (a person's cases, a case's access requests) for
-- the rest of the transaction; the service role may not lock rows of cases.
SELECT pg_advisory_xact_lock(hashtextextended($1::text, 7031));

-- ---------------------------------------------------------------------------
-- Cases

-- name: case_by_request
SELECT * FROM cases WHERE request_id = $1;

-- name: get_case
SELECT * FROM cases WHERE case_id = $1;

-- name: overlapping_case
-- A case of the same person whose infectious window overlaps [$2, $3).
SELECT case_id FROM cases
WHERE person_index = $1 AND window_start < $3 AND $2 < window_end
ORDER BY report_time DESC
LIMIT 1;

-- name: insert_case
INSERT INTO cases (case_id, person_index, person_enc, external_reference, test_date,
                   symptom_onset_date, window_start, window_end, reporter, request_id,
                   report_time)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $8)
RETURNING *;

-- name: list_cases
-- Newest report first; keyset on (report_time, case_id) descending.
SELECT * FROM cases
WHERE ($1::timestamptz IS NULL OR report_time >= $1)
  AND ($2::timestamptz IS NULL OR report_time < $2)
  AND ($3::timestamptz IS NULL OR (report_time, case_id) < ($3, $4::uuid))
ORDER BY report_time DESC, case_id DESC
LIMIT $5;

-- name: raise_risk_to_case
-- Sets the person to high as a confirmed case, unless they already are one for
-- at least as long. A contact's status becomes a confirmed case's too (the basis
-- an appeal shows is then "confirmed case"), keeping the later expiry of the
-- two: a level is never lowered nor shortened. Returns the row when it changed;
-- the risk_status_notify trigger tells every CheckIn server and
-- record_risk_history keeps the change.
INSERT INTO risk_status AS r (person_id, level, expire_time, update_time, reason,
                              exposure_time, venue_id, venue_display_name, overlap, rule)
VALUES ($1, 'high', $3, now(), 'confirmed_case', $2, NULL, '', NULL, 'confirmed case')
ON CONFLICT (person_id) DO UPDATE
SET level = 'high',
    expire_time = greatest(EXCLUDED.expire_time,
                           CASE WHEN r.level = 'high' THEN r.expire_time END),
    update_time = now(),
    reason = 'confirmed_case', exposure_time = EXCLUDED.exposure_time, venue_id = NULL,
    venue_display_name = '', overlap = NULL, rule = EXCLUDED.rule
WHERE NOT (r.reason = 'confirmed_case' AND r.level = 'high'
           AND r.expire_time >= EXCLUDED.expire_time)
RETURNING person_id;

-- ---------------------------------------------------------------------------
-- Access requests and grants

-- name: access_request_by_request
SELECT a.*, g.grant_id, g.window_start AS g_window_start, g.window_end AS g_window_end,
       g.create_time AS g_create_time, g.expire_time AS g_expire_time,
       g.revoke_time AS g_revoke_time, g.revoker AS g_revoker,
       g.revoke_reason AS g_revoke_reason
FROM access_requests a
LEFT JOIN access_grants g ON g.access_request_id = a.access_request_id
WHERE a.request_id = $1;

-- name: get_access_request
SELECT a.*, g.grant_id, g.window_start AS g_window_start, g.window_end AS g_window_end,
       g.create_time AS g_create_time, g.expire_time AS g_expire_time,
       g.revoke_time AS g_revoke_time, g.revoker AS g_revoker,
       g.revoke_reason AS g_revoke_reason
FROM access_requests a
LEFT JOIN access_grants g ON g.access_request_id = a.access_request_id
WHERE a.access_request_id = $1;

-- name: lock_access_request
SELECT * FROM access_requests WHERE access_request_id = $1 FOR UPDATE;

-- name: open_access_of_case
-- The case's pending request, or the request of its active grant, if any.
SELECT a.access_request_id
FROM access_requests a
LEFT JOIN access_grants g ON g.access_request_id = a.access_request_id
WHERE a.case_id = $1
  AND (a.state = 'pending'
       OR (g.grant_id IS NOT NULL AND g.revoke_time IS NULL AND g.expire_time > now()))
ORDER BY a.create_time DESC
LIMIT 1;

-- name: insert_access_request
INSERT INTO access_requests (access_request_id, case_id, outbreak_reference, justification,
                             window_start, window_end, requester, request_id)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
RETURNING access_request_id;

-- name: list_access_requests
-- Oldest first (the approvers' work order); keyset on (create_time, id).
SELECT a.*, g.grant_id, g.window_start AS g_window_start, g.window_end AS g_window_end,
       g.create_time AS g_create_time, g.expire_time AS g_expire_time,
       g.revoke_time AS g_revoke_time, g.revoker AS g_revoker,
       g.revoke_reason AS g_revoke_reason
FROM access_requests a
LEFT JOIN access_grants g ON g.access_request_id = a.access_request_id
WHERE ($1::text IS NULL OR a.state = $1)
  AND ($2::uuid IS NULL OR a.case_id = $2)
  AND ($3::timestamptz IS NULL OR (a.create_time, a.access_request_id) > ($3, $4::uuid))
ORDER BY a.create_time, a.access_request_id
LIMIT $5;

-- name: decide_access_request
-- Approves or denies a pending request. The schema refuses a decider who is the
-- requester (two-person rule), whatever the code does.
UPDATE access_requests
SET state = $2, decider = $3, decide_time = now(), decision_comment = $4
WHERE access_request_id = $1 AND state = 'pending'
RETURNING access_request_id;

-- name: insert_grant
INSERT INTO access_grants (grant_id, access_request_id, case_id, window_start, window_end,
                           create_time, expire_time)
VALUES ($1, $2, $3, $4, $5, now(), now() + $6::interval)
RETURNING grant_id;

-- name: lock_grant
SELECT * FROM access_grants WHERE grant_id = $1 FOR UPDATE;

-- name: revoke_grant
UPDATE access_grants
SET revoke_time = now(), revoker = $2, revoke_reason = $3
WHERE grant_id = $1 AND revoke_time IS NULL
RETURNING *;

-- name: cancel_traces_of_grant
-- Queued and running traces of a revoked grant stop; a worker running one sees
-- the state change and discards its work.
UPDATE traces
SET state = 'cancelled', end_time = now(), lease_until = NULL,
    error_message = 'cancelled: the access grant was revoked'
WHERE grant_id = $1 AND state IN ('queued', 'running')
RETURNING trace_id;

-- name: cancel_notifications_of_grant
UPDATE notifications
SET state = 'cancelled', finish_time = now(), last_error = 'the access grant was revoked'
WHERE grant_id = $1 AND state = 'queued'
RETURNING notification_id;

-- ---------------------------------------------------------------------------
-- Traces

-- name: trace_by_request
SELECT * FROM traces WHERE request_id = $1;

-- name: get_trace
SELECT * FROM traces WHERE trace_id = $1;

-- name: active_trace_of_grant
SELECT * FROM traces WHERE grant_id = $1 AND state IN ('queued', 'running');

-- name: insert_trace
-- Nothing when the grant already has a queued or running trace (traces_one_active)
-- or the request_id was used; the caller then returns that trace.
INSERT INTO traces (trace_id, case_id, grant_id, window_start, window_end, starter, request_id)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT DO NOTHING
RETURNING *;

-- name: wake_trace_workers
-- Delivered at commit, so a worker never sees a trace that is not there yet.
SELECT pg_notify('stopcovid_trace', $1::text);

-- name: list_traces
-- Newest first; keyset on (create_time, trace_id) descending.
SELECT * FROM traces
WHERE ($1::uuid IS NULL OR case_id = $1)
  AND ($2::text IS NULL OR state = $2)
  AND ($3::timestamptz IS NULL OR (create_time, trace_id) < ($3, $4::uuid))
ORDER BY create_time DESC, trace_id DESC
LIMIT $5;

-- name: list_trace_contacts
-- Highest risk first, then row order (trace_contacts_list_idx); keyset on
-- (level_rank descending, row_number).
SELECT * FROM trace_contacts
WHERE trace_id = $1
  AND level_rank >= $2
  AND ($3::smallint IS NULL OR level_rank < $3 OR (level_rank = $3 AND row_number > $4))
ORDER BY level_rank DESC, row_number
LIMIT $5;

-- ---------------------------------------------------------------------------
-- Risk status

-- name: get_risk_status
SELECT * FROM risk_status WHERE person_id = $1;

-- name: clear_risk_status
-- Back to none by hand; the risk_status_notify trigger tells every CheckIn server.
UPDATE risk_status
SET level = 'none', expire_time = now(), update_time = now(), reason = NULL,
    exposure_time = NULL, venue_id = NULL, venue_display_name = '', overlap = NULL,
    rule = '', clear_time = now(), clear_reason = $2
WHERE person_id = $1
RETURNING *;

-- ---------------------------------------------------------------------------
-- Notifications

-- name: list_notifications
-- Oldest first; keyset on (create_time, notification_id). No recipient data.
SELECT notification_id, trace_id, contact_ref, risk_level, template, state, attempt_count,
       last_error, create_time, next_attempt_time, send_time
FROM notifications
WHERE ($1::uuid IS NULL OR trace_id = $1)
  AND ($2::text IS NULL OR state = $2)
  AND ($3::timestamptz IS NULL OR (create_time, notification_id) > ($3, $4::uuid))
ORDER BY create_time, notification_id
LIMIT $5;
