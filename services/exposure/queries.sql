-- Queries of the Exposure server, called through the typed functions of
-- services/exposure/queries.py, which bind their :named parameters
-- (services/exposure/statements.py). Access-grant checks live in
-- services/domain/exposure/grants.sql (shared with the workers).

-- name: lock_key
-- Serialises writers of one key (a person's cases, a case's access requests) for
-- the rest of the transaction; the service role may not lock rows of cases.
SELECT pg_advisory_xact_lock(hashtextextended(:key::text, 7031));

-- ---------------------------------------------------------------------------
-- Cases

-- name: case_by_request
-- A request_id is its caller's (request_owner, migration 0012): another
-- principal's id never finds this one's case, trace or access request.
SELECT * FROM cases WHERE request_owner = :request_owner AND request_id = :request_id;

-- name: get_case
SELECT * FROM cases WHERE case_id = :case_id;

-- name: overlapping_case
-- A case of the same person whose infectious window overlaps [start, end).
SELECT case_id FROM cases
WHERE person_index = :person_index AND window_start < :window_end AND :window_start < window_end
ORDER BY report_time DESC
LIMIT 1;

-- name: insert_case
INSERT INTO cases (case_id, person_index, person_enc, external_reference, test_date,
                   symptom_onset_date, window_start, window_end, reporter, request_id,
                   report_time, purge_time, request_owner)
VALUES (:case_id, :person_index, :person_enc, :external_reference, :test_date,
        :symptom_onset_date, :window_start, :window_end, :reporter, :request_id,
        :report_time, :purge_time, :request_owner)
RETURNING *;

-- name: list_cases
-- Newest report first; keyset on (report_time, case_id) descending.
SELECT * FROM cases
WHERE (:start::timestamptz IS NULL OR report_time >= :start)
  AND (:end::timestamptz IS NULL OR report_time < :end)
  AND (:after_time::timestamptz IS NULL OR (report_time, case_id) < (:after_time, :after_id::uuid))
ORDER BY report_time DESC, case_id DESC LIMIT :limit;

-- name: raise_risk_to_case
-- Sets the person to high as a confirmed case, unless they already are one for
-- at least as long. A contact's status becomes a confirmed case's too (the basis
-- an appeal shows is then "confirmed case"), keeping the later expiry of the
-- two: a level is never lowered nor shortened. Returns the row when it changed;
-- the risk_status_notify trigger tells every CheckIn server and
-- record_risk_history keeps the change.
INSERT INTO risk_status AS r (person_id, level, expire_time, update_time, reason,
                              exposure_time, venue_id, venue_display_name, overlap, rule)
VALUES (:person_id, 'high', :expire_time, now(), 'confirmed_case', :exposure_time, NULL, '',
        NULL, 'confirmed case')
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
-- Access requests and grants (a request with its grant: the view
-- access_requests_with_grant)

-- name: access_request_by_request
SELECT * FROM access_requests_with_grant
WHERE access_request_id = (SELECT access_request_id FROM access_requests
                           WHERE request_owner = :request_owner AND request_id = :request_id);

-- name: get_access_request
SELECT * FROM access_requests_with_grant WHERE access_request_id = :access_request_id;

-- name: lock_access_request
SELECT * FROM access_requests WHERE access_request_id = :access_request_id FOR UPDATE;

-- name: open_access_of_case
-- The case's pending request, or the request of its active grant, if any.
SELECT access_request_id FROM access_requests_with_grant
WHERE case_id = :case_id
  AND (state = 'pending'
       OR (g_grant_id IS NOT NULL AND g_revoke_time IS NULL AND g_expire_time > now()))
ORDER BY create_time DESC
LIMIT 1;

-- name: insert_access_request
INSERT INTO access_requests (access_request_id, case_id, outbreak_reference, justification,
                             window_start, window_end, requester, request_id, request_owner)
VALUES (:access_request_id, :case_id, :outbreak_reference, :justification,
        :window_start, :window_end, :requester, :request_id, :request_owner)
RETURNING access_request_id;

-- name: list_access_requests
-- Oldest first (the approvers' work order); keyset on (create_time, id).
SELECT * FROM access_requests_with_grant
WHERE (:state::text IS NULL OR state = :state)
  AND (:case_id::uuid IS NULL OR case_id = :case_id)
  AND (:after_time::timestamptz IS NULL
       OR (create_time, access_request_id) > (:after_time, :after_id::uuid))
ORDER BY create_time, access_request_id LIMIT :limit;

-- name: decide_access_request
-- Approves or denies a pending request. The schema refuses a decider who is the
-- requester (two-person rule), whatever the code does.
UPDATE access_requests
SET state = :state, decider = :decider, decide_time = now(), decision_comment = :comment
WHERE access_request_id = :access_request_id AND state = 'pending'
RETURNING access_request_id;

-- name: insert_grant
-- The grant of an approved request: the request's case and window, from now.
INSERT INTO access_grants (grant_id, access_request_id, case_id, window_start, window_end,
                           create_time, expire_time)
SELECT :grant_id::uuid, access_request_id, case_id, window_start, window_end,
       now(), now() + :duration::interval
FROM access_requests WHERE access_request_id = :access_request_id
RETURNING grant_id;

-- name: lock_grant
SELECT * FROM access_grants WHERE grant_id = :grant_id FOR UPDATE;

-- name: revoke_grant
UPDATE access_grants
SET revoke_time = now(), revoker = :revoker, revoke_reason = :reason
WHERE grant_id = :grant_id AND revoke_time IS NULL
RETURNING *;

-- name: cancel_traces_of_grant
-- Queued and running traces of a revoked grant stop; a worker running one sees
-- the state change and discards its work.
UPDATE traces
SET state = 'cancelled', end_time = now(), lease_until = NULL,
    error_message = 'cancelled: the access grant was revoked'
WHERE grant_id = :grant_id AND state IN ('queued', 'running')
RETURNING trace_id;

-- name: cancel_notifications_of_grant
UPDATE notifications
SET state = 'cancelled', finish_time = now(), last_error = 'the access grant was revoked'
WHERE grant_id = :grant_id AND state = 'queued'
RETURNING notification_id;

-- ---------------------------------------------------------------------------
-- Traces and their contacts

-- name: trace_by_request
SELECT * FROM traces WHERE request_owner = :request_owner AND request_id = :request_id;

-- name: get_trace
SELECT * FROM traces WHERE trace_id = :trace_id;

-- name: active_trace_of_grant
SELECT * FROM traces WHERE grant_id = :grant_id AND state IN ('queued', 'running');

-- name: insert_trace
-- A queued trace of the grant's case and window. Nothing when the grant already
-- has a queued or running trace (traces_one_active) or the request_id was used;
-- the caller then returns that trace.
INSERT INTO traces (trace_id, case_id, grant_id, window_start, window_end, starter, request_id,
                    request_owner)
SELECT :trace_id::uuid, case_id, grant_id, window_start, window_end, :starter::text,
       :request_id::uuid, :request_owner::text
FROM access_grants WHERE grant_id = :grant_id
ON CONFLICT DO NOTHING
RETURNING *;

-- name: wake_trace_workers
-- Delivered at commit, so a worker never sees a trace that is not there yet.
SELECT pg_notify('stopcovid_trace', :trace_id::text);

-- name: list_traces
-- Newest first; keyset on (create_time, trace_id) descending.
SELECT * FROM traces
WHERE (:case_id::uuid IS NULL OR case_id = :case_id)
  AND (:state::text IS NULL OR state = :state)
  AND (:after_time::timestamptz IS NULL OR (create_time, trace_id) < (:after_time, :after_id::uuid))
ORDER BY create_time DESC, trace_id DESC LIMIT :limit;

-- name: list_trace_contacts
-- Highest risk first, then row order (trace_contacts_list_idx); keyset on
-- (level_rank descending, row_number).
SELECT * FROM trace_contacts
WHERE trace_id = :trace_id
  AND level_rank >= :min_rank
  AND (:after_rank::smallint IS NULL OR level_rank < :after_rank
       OR (level_rank = :after_rank AND row_number > :after_row))
ORDER BY level_rank DESC, row_number LIMIT :limit;

-- name: count_export_rows
-- How many rows the export will hold: audited before any row leaves.
SELECT count(*) FROM trace_contacts WHERE trace_id = :trace_id AND level_rank >= :min_rank;

-- name: export_rows
-- The rows, highest risk first then row order (trace_contacts_list_idx), with
-- their venue's name, address and province. Read through a cursor, a few
-- hundred rows at a time, so a large trace never sits whole in memory.
SELECT tc.*, coalesce(v.display_name, '') AS venue_name,
       coalesce(v.address, '') AS venue_address, coalesce(v.region_code, '') AS region_code
FROM trace_contacts tc
LEFT JOIN venues v ON v.venue_id = tc.venue_id
WHERE tc.trace_id = :trace_id AND tc.level_rank >= :min_rank
ORDER BY tc.level_rank DESC, tc.row_number;

-- ---------------------------------------------------------------------------
-- Risk status

-- name: get_risk_status
SELECT * FROM risk_status WHERE person_id = :person_id;

-- name: clear_risk_status
-- Back to none by hand; the risk_status_notify trigger tells every CheckIn server.
UPDATE risk_status
SET level = 'none', expire_time = now(), update_time = now(), reason = NULL,
    exposure_time = NULL, venue_id = NULL, venue_display_name = '', overlap = NULL,
    rule = '', clear_time = now(), clear_reason = :reason
WHERE person_id = :person_id
RETURNING *;

-- ---------------------------------------------------------------------------
-- Notifications

-- name: list_notifications
-- Oldest first; keyset on (create_time, notification_id). No recipient data.
SELECT notification_id, trace_id, contact_ref, risk_level, template, state, attempt_count,
       last_error, create_time, next_attempt_time, send_time
FROM notifications
WHERE (:trace_id::uuid IS NULL OR trace_id = :trace_id)
  AND (:state::text IS NULL OR state = :state)
  AND (:after_time::timestamptz IS NULL
       OR (create_time, notification_id) > (:after_time, :after_id::uuid))
ORDER BY create_time, notification_id LIMIT :limit;
