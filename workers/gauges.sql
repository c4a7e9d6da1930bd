-- Queries of the worker pool's gauges (workers/gauges.py): counts and ages only,
-- never a row's contents.

-- name: traces_by_state
-- How many traces are in each state (queued, running, done, failed, cancelled).
SELECT state, count(*) AS n FROM traces GROUP BY state;

-- name: notifications_due
-- The queued notifications due now, and how long the oldest of them has waited
-- since it was due (seconds; NULL when none is due).
SELECT count(*) AS due,
       extract(epoch FROM now() - min(next_attempt_time))::float8 AS oldest_s
FROM notifications
WHERE state = 'queued' AND next_attempt_time <= now();
