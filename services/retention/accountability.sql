-- Queries of the Retention service's accountability part: grievances,
-- data-subject requests, the audit chain and transparency figures. Loaded by
-- name with services.kernel.db.load_queries.

-- ===== grievances =========================================================

-- name: insert_grievance
-- Files a grievance; with a request_id already used, returns nothing (the
-- caller then reads the grievance that request filed).
INSERT INTO grievances (grievance_id, tracking_id, secret_hash, category, description_enc,
                        contact_enc, text_key_id, venue_id, incident_date, denial_decision_id,
                        body, filer, request_id, due_time, denial_time, denial_venue_id,
                        denial_level, basis_reason, basis_exposure_time, basis_venue_id,
                        basis_venue_display_name, basis_overlap, basis_rule, person_enc,
                        people_key_id)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, now() + $14::interval,
        $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25)
ON CONFLICT (request_id) DO NOTHING
RETURNING *, (state <> 'resolved' AND due_time < now()) AS overdue;

-- name: tracking_id_taken
SELECT EXISTS (SELECT 1 FROM grievances WHERE tracking_id = $1);

-- name: grievance_by_request
SELECT *, (state <> 'resolved' AND due_time < now()) AS overdue
FROM grievances WHERE request_id = $1;

-- name: get_grievance
SELECT *, (state <> 'resolved' AND due_time < now()) AS overdue
FROM grievances WHERE tracking_id = $1;

-- name: get_grievance_for_update
SELECT *, (state <> 'resolved' AND due_time < now()) AS overdue
FROM grievances WHERE tracking_id = $1 FOR UPDATE;

-- name: grievance_responses
-- The messages of some grievances, oldest first.
SELECT grievance_id, message, create_time FROM grievance_responses
WHERE grievance_id = ANY ($1::uuid[])
ORDER BY grievance_id, response_id;

-- name: list_grievances
-- Keyset page in (due_time, tracking_id) order; NULL filters match everything.
SELECT *, (state <> 'resolved' AND due_time < now()) AS overdue
FROM grievances
WHERE ($1::text IS NULL OR state = $1)
  AND ($2::text IS NULL OR body = $2)
  AND ($3::text IS NULL OR category = $3)
  AND ($4::text IS NULL OR assignee = $4)
  AND (NOT $5::boolean OR (state <> 'resolved' AND due_time < now()))
  AND ($6::timestamptz IS NULL OR (due_time, tracking_id) > ($6, $7::text))
ORDER BY due_time, tracking_id
LIMIT $8;

-- name: assign_grievance
UPDATE grievances
SET assignee = $2, body = $3, state = 'in_progress', update_time = now()
WHERE grievance_id = $1
RETURNING *, (state <> 'resolved' AND due_time < now()) AS overdue;

-- name: insert_response
-- Adds a message; with a request_id already used, adds nothing.
INSERT INTO grievance_responses (grievance_id, message, author, request_id)
VALUES ($1, $2, $3, $4)
ON CONFLICT (request_id) DO NOTHING
RETURNING response_id;

-- name: response_by_request
SELECT g.tracking_id FROM grievance_responses r JOIN grievances g USING (grievance_id)
WHERE r.request_id = $1;

-- name: touch_grievance
UPDATE grievances SET update_time = now() WHERE grievance_id = $1
RETURNING *, (state <> 'resolved' AND due_time < now()) AS overdue;

-- name: resolve_grievance
UPDATE grievances
SET state = 'resolved', outcome = $2, resolution_summary = $3, resolve_time = now(),
    update_time = now()
WHERE grievance_id = $1
RETURNING *, (state <> 'resolved' AND due_time < now()) AS overdue;

-- name: denial_in_store
-- A denial held in the check-in store, found by its decision id
-- (checkins_decision_idx).
SELECT day, venue_id, device_id, sequence, scan_time, receive_time, person_enc
FROM checkins WHERE decision_id = $1 AND outcome = 'denied'
LIMIT 1;

-- name: denial_in_inbox
-- A denial acknowledged but not yet moved into the store by the workers.
SELECT day, venue_id, device_id, sequence, scan_time, receive_time, person_enc
FROM scan_inbox WHERE decision_id = $1 AND outcome = 'denied'
LIMIT 1;

-- name: risk_at
-- The risk level and basis in force for a person at a time: the latest change
-- at or before it.
SELECT level, reason, exposure_time, venue_id, venue_display_name, overlap, rule
FROM risk_history
WHERE person_id = $1 AND change_time <= $2
ORDER BY change_time DESC, change_id DESC
LIMIT 1;

-- name: current_risk
-- A person's level now ('none' past its expiry); no row when they are not enrolled.
SELECT CASE WHEN r.level IS NULL OR r.expire_time <= now() THEN 'none' ELSE r.level END AS level
FROM people p LEFT JOIN risk_status r ON r.person_id = p.person_id
WHERE p.person_id = $1;

-- name: venue_exists
SELECT EXISTS (SELECT 1 FROM venues WHERE venue_id = $1);

-- ===== data-subject requests ==============================================

-- name: person_checkins
-- A person's scans (store and inbox) by their day pseudonyms, admitted and
-- denied: a row being moved may be seen in both, and is returned once.
WITH refs AS (
    SELECT * FROM unnest($1::date[], $2::bytea[]) AS r (day, person_ref)
), rows AS (
    SELECT c.venue_id, c.scan_time, c.direction, c.outcome, c.decision_id
    FROM checkins c JOIN refs r ON c.day = r.day AND c.person_ref = r.person_ref
    UNION ALL
    SELECT i.venue_id, i.scan_time, i.direction, i.outcome, i.decision_id
    FROM scan_inbox i JOIN refs r ON i.day = r.day AND i.person_ref = r.person_ref
)
SELECT DISTINCT ON (rows.venue_id, rows.scan_time, rows.direction, rows.outcome)
       rows.*, COALESCE(v.display_name, '') AS venue_display_name
FROM rows LEFT JOIN venues v ON v.venue_id = rows.venue_id
ORDER BY rows.venue_id, rows.scan_time, rows.direction, rows.outcome;

-- name: person_case_records
-- The person's case records, one per scan (a scan kept by several traces, or by
-- two cases, is one record of theirs), each with when it expires under the
-- CASE_RECORDS policy. ExportPersonData lists these and WithdrawConsent counts
-- them: one definition for both.
SELECT r.venue_id, r.scan_time, r.direction,
       COALESCE(max(v.display_name), '') AS venue_display_name,
       max(r.create_time) + make_interval(days => (
           SELECT period_days FROM retention_policies WHERE data_class = 'case_records'
       )) AS retained_until
FROM case_records r LEFT JOIN venues v ON v.venue_id = r.venue_id
WHERE r.person_index = $1
GROUP BY r.venue_id, r.scan_time, r.direction
ORDER BY r.scan_time, r.venue_id, r.direction;

-- name: person_risk
SELECT * FROM risk_status WHERE person_id = $1;

-- name: person_notifications
SELECT notification_id, risk_level, send_time FROM notifications
WHERE person_index = $1 AND state = 'sent'
ORDER BY send_time, notification_id;

-- name: person_data_accesses
-- The traces that used the person's data (as a case, a contact or in case
-- records), with the grant and its request's outbreak reference.
SELECT t.trace_id, t.grant_id, q.outbreak_reference,
       COALESCE(t.start_time, t.create_time) AS access_time
FROM traces t
JOIN access_grants g ON g.grant_id = t.grant_id
JOIN access_requests q ON q.access_request_id = g.access_request_id
WHERE t.trace_id IN (
    SELECT trace_id FROM trace_contacts WHERE person_index = $1
    UNION SELECT trace_id FROM case_records WHERE person_index = $1
    UNION SELECT t2.trace_id FROM traces t2 JOIN cases c ON c.case_id = t2.case_id
          WHERE c.person_index = $1
)
ORDER BY access_time, t.trace_id;

-- name: erase_person
DELETE FROM people WHERE person_id = $1 RETURNING person_id;

-- name: record_erasure
INSERT INTO erased_people (person_id) VALUES ($1)
ON CONFLICT (person_id) DO NOTHING
RETURNING erase_time;

-- name: delete_risk
DELETE FROM risk_status WHERE person_id = $1;

-- name: unlink_inbox
-- Inbox rows first: a row a worker is moving right now is waited for, and then
-- found in the store by the next statement.
UPDATE scan_inbox i SET person_ref = uuid_send(gen_random_uuid()), person_enc = ''::bytea
FROM unnest($1::date[], $2::bytea[]) AS r (day, person_ref)
WHERE i.day = r.day AND i.person_ref = r.person_ref;

-- name: unlink_checkins
-- The row's pseudonym becomes random bytes and its ciphertext empty: the visit
-- stays counted but belongs to nobody.
UPDATE checkins c SET person_ref = uuid_send(gen_random_uuid()), person_enc = ''::bytea
FROM unnest($1::date[], $2::bytea[]) AS r (day, person_ref)
WHERE c.day = r.day AND c.person_ref = r.person_ref;

-- name: cancel_notifications
UPDATE notifications SET state = 'cancelled', finish_time = now()
WHERE person_index = $1 AND state = 'queued';

-- name: list_audit_events
-- Keyset page in chain order; NULL filters match everything.
SELECT * FROM audit_events
WHERE ($1::timestamptz IS NULL OR occur_time >= $1)
  AND ($2::timestamptz IS NULL OR occur_time < $2)
  AND ($3::text IS NULL OR principal = $3)
  AND ($4::text IS NULL OR action = $4)
  AND ($5::uuid IS NULL OR case_id = $5)
  AND ($6::bigint IS NULL OR sequence > $6)
ORDER BY sequence
LIMIT $7;

-- name: chain_head
SELECT * FROM audit_chain_head;

-- name: audit_hash_at
SELECT hash FROM audit_events WHERE sequence = $1;

-- name: verify_chain
-- Recomputes every entry's digest in (anchor, end] and checks it links to the
-- entry before it (the first one to the anchor: the entry at start - 1, or the
-- expiry checkpoint). Returns the first broken entry (if any), how many entries
-- verified before it, the hash of the last of those, and the highest sequence
-- seen. $1 anchor sequence, $2 anchor hash, $3 end sequence, $4 anchor is the
-- checkpoint.
WITH span AS (
    SELECT sequence, hash, previous_hash,
           audit_event_digest(previous_hash, sequence, occur_time, principal, role, action,
                              outcome, error_reason, case_id, grant_id, resource_type,
                              resource_id, details) AS digest,
           COALESCE(lag(sequence) OVER w, $1::bigint) AS prev_sequence,
           COALESCE(lag(hash) OVER w, $2::bytea) AS prev_hash,
           lag(sequence) OVER w IS NULL AS first
    FROM audit_events
    WHERE sequence > $1 AND sequence <= $3
    WINDOW w AS (ORDER BY sequence)
), judged AS (
    SELECT sequence, hash,
           CASE
               WHEN sequence <> prev_sequence + 1 THEN 'gap'
               WHEN previous_hash <> prev_hash AND first AND $4::boolean THEN 'checkpoint'
               WHEN previous_hash <> prev_hash THEN 'link'
               WHEN hash <> digest THEN 'modified'
           END AS problem
    FROM span
), first_broken AS (
    SELECT sequence, problem FROM judged WHERE problem IS NOT NULL ORDER BY sequence LIMIT 1
)
SELECT (SELECT sequence FROM first_broken) AS broken_sequence,
       (SELECT problem FROM first_broken) AS problem,
       count(*) FILTER (WHERE sequence < COALESCE((SELECT sequence FROM first_broken),
                                                  9223372036854775807)) AS verified,
       (SELECT hash FROM judged
        WHERE sequence < COALESCE((SELECT sequence FROM first_broken), 9223372036854775807)
        ORDER BY sequence DESC LIMIT 1) AS last_good_hash,
       max(sequence) AS max_sequence
FROM judged;

-- ===== transparency =======================================================

-- name: transparency
-- Counts for [$1, $2); no personal data.
SELECT
    (SELECT count(*) FROM cases WHERE report_time >= $1 AND report_time < $2) AS cases,
    (SELECT count(*) FROM access_requests WHERE create_time >= $1 AND create_time < $2)
        AS access_requests,
    (SELECT count(*) FROM access_requests
     WHERE state = 'approved' AND decide_time >= $1 AND decide_time < $2) AS approvals,
    (SELECT count(*) FROM access_requests
     WHERE state = 'denied' AND decide_time >= $1 AND decide_time < $2) AS denials,
    (SELECT count(*) FROM access_grants
     WHERE revoke_time >= $1 AND revoke_time < $2 AND revoke_time < expire_time)
        AS revoked_grants,
    (SELECT count(*) FROM traces WHERE create_time >= $1 AND create_time < $2) AS traces,
    (SELECT count(*) FROM notifications
     WHERE state = 'sent' AND send_time >= $1 AND send_time < $2) AS notifications_sent,
    (SELECT count(*) FROM notifications
     WHERE state = 'failed' AND finish_time >= $1 AND finish_time < $2) AS notifications_failed,
    (SELECT count(*) FROM checkins
     WHERE decision_id IS NOT NULL AND outcome = 'denied'
       AND scan_time >= $1 AND scan_time < $2)
    + (SELECT count(*) FROM scan_inbox
       WHERE decision_id IS NOT NULL AND outcome = 'denied'
         AND scan_time >= $1 AND scan_time < $2) AS entry_denials,
    (SELECT count(*) FROM grievances
     WHERE state <> 'resolved' AND due_time < now()) AS overdue_grievances,
    (SELECT count(*) FROM erased_people WHERE erase_time >= $1 AND erase_time < $2)
        AS consent_withdrawals;

-- name: transparency_grievances
SELECT state, count(*) AS n FROM grievances
WHERE create_time >= $1 AND create_time < $2
GROUP BY state;

-- name: transparency_deletions
SELECT data_class, count(*) AS reports, sum(row_count)::bigint AS rows,
       sum(cardinality(destroyed_key_ids))::bigint AS keys
FROM deletion_reports
WHERE create_time >= $1 AND create_time < $2
GROUP BY data_class;
