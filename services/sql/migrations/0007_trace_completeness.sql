-- A trace says what it left out and, when it fails, where; and one definition
-- of who is a confirmed case, for the trace workers and the outbox.

-- What a finished trace skipped (services/core/tracing.py, SKIP_REASONS): rows
-- of the store that can be nobody's, by reason; contacts whose enrollment is
-- gone (nothing kept about them); contacts who are confirmed cases themselves
-- (listed, neither raised nor notified). failure_step and failure_error (an
-- exception's class name, never a message) say where a failed trace failed;
-- while a trace is queued again after a database failure they hold what
-- interrupted it, so that a trace given up can still say so.
ALTER TABLE traces
    ADD COLUMN skipped_rows    jsonb NOT NULL DEFAULT '{}',
    ADD COLUMN erased_contacts integer NOT NULL DEFAULT 0 CHECK (erased_contacts >= 0),
    ADD COLUMN case_contacts   integer NOT NULL DEFAULT 0 CHECK (case_contacts >= 0),
    ADD COLUMN failure_step    text
        CHECK (failure_step IN ('find_visits', 'find_contacts', 'build_results', 'store_results')),
    ADD COLUMN failure_error   text NOT NULL DEFAULT ''
        CHECK (failure_error ~ '^[A-Za-z0-9_.]{0,100}$');

-- The people who are a confirmed case now: HIGH as a confirmed case
-- (ReportCase), neither cleared nor expired. A trace never raises or notifies
-- them as another case's contact.
CREATE VIEW confirmed_cases AS
SELECT person_id
FROM risk_status
WHERE reason = 'confirmed_case' AND level <> 'none' AND expire_time > now();

GRANT SELECT ON confirmed_cases TO stopcovid_worker;
