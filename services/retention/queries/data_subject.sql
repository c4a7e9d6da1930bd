-- Queries of data-subject requests: a person's export and the withdrawal of their
-- consent (services/retention/queries/data_subject.py). A person's rows are found
-- by their day pseudonyms ($1 days, $2 pseudonyms: one per day whose key is
-- alive) or by their person index.

-- name: person_checkins
-- A person's scans (store and inbox) by their day pseudonyms, admitted and
-- denied: a row being moved may be seen in both, and is returned once. Each
-- table is joined on its own, so each gets its plan (the store: a pseudonym
-- index scan per day's partition; a full inbox: one hash join). Through one view
-- of both, a full inbox turned the whole into a scan of every partition.
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

-- ===== withdrawal, in this order, in one transaction ========================

-- name: erase_person
-- The delete locks the row: a concurrent withdrawal waits, then finds nothing to
-- delete.
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
