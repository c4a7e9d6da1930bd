-- The trace context a trace was queued under (migration 0012), for the worker's
-- span of its run (services/kernel/tracing.py). Used only when tracing is on.

-- name: set_trace_context
UPDATE traces SET traceparent = $2 WHERE trace_id = $1;

-- name: trace_context
SELECT traceparent FROM traces WHERE trace_id = $1;
