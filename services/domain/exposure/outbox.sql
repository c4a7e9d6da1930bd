-- Queries of the notification outbox (services/domain/exposure/outbox.py), run by
-- the worker pool. Each handles a whole batch set-based, never one statement per row.

-- name: claim_notifications
-- Claims up to $1 due notifications and pushes their next attempt $2 seconds
-- ahead (a lease: a worker that dies mid-send leaves them to another after
-- it), counting the attempt. A short transaction of its own: the sending
-- happens outside any transaction.
WITH due AS (
    SELECT notification_id
    FROM notifications
    WHERE state = 'queued' AND next_attempt_time <= now()
    ORDER BY next_attempt_time, notification_id
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE notifications AS n
SET attempt_count = n.attempt_count + 1,
    next_attempt_time = now() + make_interval(secs => $2)
FROM due
WHERE n.notification_id = due.notification_id
RETURNING n.notification_id, n.trace_id, n.grant_id, n.case_id, n.person_enc, n.risk_level,
          n.template, n.venue_id, n.exposure_date, n.attempt_count;

-- name: recipients
-- The enrolled people among $1 (erased people have no row), with what a message
-- needs: the phone (encrypted) and the language, and whether they became a
-- confirmed case since the message was queued (then it is not sent).
SELECT p.person_id, p.phone_enc, p.people_key_id, p.language_code,
       EXISTS (SELECT 1 FROM confirmed_cases AS c WHERE c.person_id = p.person_id)
           AS confirmed_case
FROM people AS p
WHERE p.person_id = ANY ($1::uuid[]);

-- name: venue_names
SELECT venue_id, display_name FROM venues WHERE venue_id = ANY ($1::uuid[]);

-- name: finish_notifications
-- Records the outcome of each attempt: $2 state per notification (queued for a
-- retry at $4, sent, failed or cancelled), $3 last error (never personal data).
-- Only rows still queued change, so a revocation that cancelled one meanwhile
-- stands, unless the message had already gone out: then it says sent, the truth.
UPDATE notifications AS n
SET state = u.state,
    last_error = u.last_error,
    next_attempt_time = coalesce(u.next_attempt_time, n.next_attempt_time),
    send_time = CASE WHEN u.state = 'sent' THEN now() ELSE n.send_time END,
    finish_time = CASE WHEN u.state = 'queued' THEN NULL ELSE now() END
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::timestamptz[])
     AS u (notification_id, state, last_error, next_attempt_time)
WHERE n.notification_id = u.notification_id
  AND (n.state = 'queued' OR (n.state = 'cancelled' AND u.state = 'sent'))
RETURNING n.notification_id, n.state;
