-- Observability (issue 16): a queued trace carries the W3C trace context of the
-- StartTrace call that queued it, so the worker's run of it joins the caller's
-- distributed trace (services/kernel/tracing.py). Written only when tracing is
-- configured; NULL otherwise. It is a random span id, no personal data.
ALTER TABLE traces ADD COLUMN traceparent text
    CHECK (traceparent IS NULL OR length(traceparent) <= 128);
