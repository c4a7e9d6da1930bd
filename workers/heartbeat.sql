-- Queries of the worker pool itself (workers/pool.py): its heartbeat row.

-- name: heartbeat
-- One row per live worker process ($1 id, $2 host, $3 pid, $4 start time), so
-- operators can see which workers run; beat_time shows the last sign of life.
INSERT INTO worker_heartbeats (worker_id, host, pid, start_time, beat_time)
VALUES ($1, $2, $3, $4, now())
ON CONFLICT (worker_id) DO UPDATE SET beat_time = now();

-- name: deregister
-- A worker's goodbye at a graceful stop: no stale heartbeat is left behind.
DELETE FROM worker_heartbeats WHERE worker_id = $1;
