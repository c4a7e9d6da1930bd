-- Exposure: cases, two-person access grants, traces, case records, risk levels
-- and the notification outbox.
--
-- No table here holds a person id or phone number in clear next to a case or a
-- contact: a case's person, a contact's person and every case record are
-- encrypted under the case's key (services/core/keys.py, KeyStore.case_key),
-- which retention destroys with the case records. `person_index` columns are
-- HMAC(blind-index key, person id) (KeyStore.person_index), so a person's rows
-- can be found for export and withdrawal without storing the id.

-- A case identified by the Ministry of Health.
CREATE TABLE cases (
    case_id             uuid PRIMARY KEY,
    person_index        bytea NOT NULL,
    person_enc          bytea NOT NULL,          -- person id under the case key, aad b"case|" + case id
    external_reference  text NOT NULL DEFAULT '' CHECK (length(external_reference) <= 100),
    test_date           date NOT NULL,
    symptom_onset_date  date,
    window_start        timestamptz NOT NULL,
    window_end          timestamptz NOT NULL CHECK (window_end >= window_start),
    reporter            text NOT NULL,
    request_id          uuid UNIQUE,
    report_time         timestamptz NOT NULL DEFAULT now(),
    -- Set by retention when the case key is destroyed with the case records.
    purge_time          timestamptz
);
CREATE INDEX cases_person_idx ON cases (person_index);
CREATE INDEX cases_list_idx ON cases (report_time DESC, case_id DESC);

-- A health official's request for access to one case's contact data.
CREATE TABLE access_requests (
    access_request_id   uuid PRIMARY KEY,
    case_id             uuid NOT NULL REFERENCES cases (case_id),
    outbreak_reference  text NOT NULL CHECK (length(outbreak_reference) BETWEEN 1 AND 100),
    justification       text NOT NULL CHECK (length(justification) BETWEEN 20 AND 2000),
    window_start        timestamptz NOT NULL,
    window_end          timestamptz NOT NULL CHECK (window_end >= window_start),
    state               text NOT NULL DEFAULT 'pending'
                        CHECK (state IN ('pending', 'approved', 'denied')),
    requester           text NOT NULL,
    request_id          uuid UNIQUE,
    create_time         timestamptz NOT NULL DEFAULT now(),
    decider             text,
    decide_time         timestamptz,
    decision_comment    text NOT NULL DEFAULT '' CHECK (length(decision_comment) <= 2000),
    CHECK ((state = 'pending') = (decide_time IS NULL)),
    -- Two people: nobody decides their own request, whatever the code does.
    CHECK (decider IS NULL OR decider <> requester)
);
-- Approvers see one pending request per case at a time.
CREATE UNIQUE INDEX access_requests_one_pending ON access_requests (case_id) WHERE state = 'pending';
CREATE INDEX access_requests_list_idx ON access_requests (create_time, access_request_id);
CREATE INDEX access_requests_case_idx ON access_requests (case_id, create_time);

-- The permission an approval creates: one case, one window, until expire_time.
CREATE TABLE access_grants (
    grant_id            uuid PRIMARY KEY,
    access_request_id   uuid NOT NULL UNIQUE REFERENCES access_requests (access_request_id),
    case_id             uuid NOT NULL REFERENCES cases (case_id),
    window_start        timestamptz NOT NULL,
    window_end          timestamptz NOT NULL,
    create_time         timestamptz NOT NULL DEFAULT now(),
    expire_time         timestamptz NOT NULL CHECK (expire_time > create_time),
    revoke_time         timestamptz,
    revoker             text,
    revoke_reason       text NOT NULL DEFAULT '' CHECK (length(revoke_reason) <= 500),
    CHECK ((revoke_time IS NULL) = (revoker IS NULL))
);
CREATE INDEX access_grants_case_idx ON access_grants (case_id, expire_time);

-- A trace job. Workers claim queued traces (FOR UPDATE SKIP LOCKED) and hold a
-- lease while running; a trace whose worker died is claimed again after the
-- lease passes and re-run from scratch (its results are replaced atomically).
CREATE TABLE traces (
    trace_id            uuid PRIMARY KEY,
    case_id             uuid NOT NULL REFERENCES cases (case_id),
    grant_id            uuid NOT NULL REFERENCES access_grants (grant_id),
    state               text NOT NULL DEFAULT 'queued'
                        CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    window_start        timestamptz NOT NULL,
    window_end          timestamptz NOT NULL,
    starter             text NOT NULL,
    request_id          uuid UNIQUE,
    create_time         timestamptz NOT NULL DEFAULT now(),
    start_time          timestamptz,
    end_time            timestamptz,
    visits_found        integer NOT NULL DEFAULT 0,
    visits_searched     integer NOT NULL DEFAULT 0,
    contacts_found      integer NOT NULL DEFAULT 0,
    level_counts        jsonb NOT NULL DEFAULT '{}',   -- {"high": n, "medium": n, "low": n}
    error_message       text NOT NULL DEFAULT '',
    attempt_count       integer NOT NULL DEFAULT 0,
    lease_until         timestamptz,
    worker_id           text
);
-- While a trace of a grant is queued or running, StartTrace returns it.
CREATE UNIQUE INDEX traces_one_active ON traces (grant_id) WHERE state IN ('queued', 'running');
CREATE INDEX traces_queue_idx ON traces (create_time) WHERE state IN ('queued', 'running');
CREATE INDEX traces_list_idx ON traces (create_time DESC, trace_id DESC);
CREATE INDEX traces_case_idx ON traces (case_id, create_time DESC);

-- One overlap found by a trace (ListTraceContacts). The contact's person id is
-- encrypted under the case key; contact_ref is a pseudonym stable within the
-- trace only. These rows are case records (retention class CASE_RECORDS).
CREATE TABLE trace_contacts (
    trace_id            uuid NOT NULL REFERENCES traces (trace_id),
    row_number          integer NOT NULL,
    case_id             uuid NOT NULL REFERENCES cases (case_id),
    contact_ref         text NOT NULL,
    level_rank          smallint NOT NULL CHECK (level_rank BETWEEN 2 AND 4),  -- RiskLevel number
    venue_id            uuid NOT NULL,
    case_visit_start    timestamptz NOT NULL,
    case_visit_end      timestamptz NOT NULL,
    contact_stay_start  timestamptz NOT NULL,
    contact_stay_end    timestamptz NOT NULL,
    overlap             interval NOT NULL,
    stay_end_estimated  boolean NOT NULL,
    rule                text NOT NULL CHECK (length(rule) <= 200),
    person_index        bytea NOT NULL,
    person_enc          bytea NOT NULL,          -- under the case key, aad b"contact|" + trace id
    PRIMARY KEY (trace_id, row_number)
);
-- Highest risk first, then row order.
CREATE INDEX trace_contacts_list_idx ON trace_contacts (trace_id, level_rank DESC, row_number);
CREATE INDEX trace_contacts_person_idx ON trace_contacts (person_index);

-- The check-ins of a case and its contacts that a trace used, copied out of the
-- day partitions (which expire after the ordinary period) and kept, encrypted
-- under the case key, for the case-records period.
CREATE TABLE case_records (
    record_id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    case_id             uuid NOT NULL REFERENCES cases (case_id),
    trace_id            uuid NOT NULL REFERENCES traces (trace_id),
    subject             text NOT NULL CHECK (subject IN ('case', 'contact')),
    contact_ref         text NOT NULL DEFAULT '',
    venue_id            uuid NOT NULL,
    scan_time           timestamptz NOT NULL,
    direction           text NOT NULL CHECK (direction IN ('entry', 'exit')),
    person_index        bytea NOT NULL,
    person_enc          bytea NOT NULL,          -- under the case key, aad b"record|" + trace id
    create_time         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX case_records_case_idx ON case_records (case_id, trace_id);
CREATE INDEX case_records_person_idx ON case_records (person_index);
CREATE INDEX case_records_time_idx ON case_records (create_time);

-- The notification outbox: one message per contact per case, whatever the
-- retries, re-traces or worker deaths. The recipient is found by decrypting
-- person_enc (case key) only while the trace's grant is active.
CREATE TABLE notifications (
    notification_id     uuid PRIMARY KEY,
    trace_id            uuid NOT NULL REFERENCES traces (trace_id),
    grant_id            uuid NOT NULL REFERENCES access_grants (grant_id),
    case_id             uuid NOT NULL REFERENCES cases (case_id),
    contact_ref         text NOT NULL,
    person_index        bytea NOT NULL,
    person_enc          bytea NOT NULL,          -- under the case key, aad b"notification|" + id
    risk_level          text NOT NULL CHECK (risk_level IN ('low', 'medium', 'high')),
    template            text NOT NULL,
    venue_id            uuid,
    exposure_date       date,
    state               text NOT NULL DEFAULT 'queued'
                        CHECK (state IN ('queued', 'sent', 'failed', 'cancelled')),
    attempt_count       integer NOT NULL DEFAULT 0,
    last_error          text NOT NULL DEFAULT '' CHECK (length(last_error) <= 500),
    create_time         timestamptz NOT NULL DEFAULT now(),
    next_attempt_time   timestamptz NOT NULL DEFAULT now(),
    send_time           timestamptz,
    finish_time         timestamptz,             -- sent, given up or cancelled
    UNIQUE (case_id, person_index)
);
CREATE INDEX notifications_due_idx ON notifications (next_attempt_time) WHERE state = 'queued';
CREATE INDEX notifications_list_idx ON notifications (create_time, notification_id);
CREATE INDEX notifications_trace_idx ON notifications (trace_id, create_time);
CREATE INDEX notifications_person_idx ON notifications (person_index);

-- Risk status gains its basis (never naming the case) and manual clearing. A
-- cleared status stays as level 'none' with clear_time and clear_reason.
ALTER TABLE risk_status DROP CONSTRAINT risk_status_level_check;
ALTER TABLE risk_status
    ADD CONSTRAINT risk_status_level_check CHECK (level IN ('none', 'low', 'medium', 'high')),
    ADD COLUMN reason             text CHECK (reason IN ('confirmed_case', 'venue_contact')),
    ADD COLUMN exposure_time      timestamptz,
    ADD COLUMN venue_id           uuid,
    ADD COLUMN venue_display_name text NOT NULL DEFAULT '',
    ADD COLUMN overlap            interval,
    ADD COLUMN rule               text NOT NULL DEFAULT '' CHECK (length(rule) <= 200),
    ADD COLUMN clear_time         timestamptz,
    ADD COLUMN clear_reason       text;

-- Every risk change, so a denial can later be explained by the level and basis
-- in force when it was made (grievance appeals), without naming the case.
CREATE TABLE risk_history (
    change_id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    person_id           uuid NOT NULL,
    level               text NOT NULL,
    reason              text,
    exposure_time       timestamptz,
    venue_id            uuid,
    venue_display_name  text NOT NULL DEFAULT '',
    overlap             interval,
    rule                text NOT NULL DEFAULT '',
    expire_time         timestamptz,
    change_time         timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX risk_history_person_idx ON risk_history (person_id, change_time);

CREATE FUNCTION record_risk_history() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
BEGIN
    INSERT INTO risk_history (person_id, level, reason, exposure_time, venue_id,
                              venue_display_name, overlap, rule, expire_time)
    VALUES (NEW.person_id, NEW.level, NEW.reason, NEW.exposure_time, NEW.venue_id,
            NEW.venue_display_name, NEW.overlap, NEW.rule, NEW.expire_time);
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION record_risk_history() FROM PUBLIC;
CREATE TRIGGER risk_status_history AFTER INSERT OR UPDATE ON risk_status
    FOR EACH ROW EXECUTE FUNCTION record_risk_history();

-- The trace's two lookups on the store: a case's visits by day pseudonym, and
-- everyone at a venue around a visit. A partial index finds a denial by its id
-- (appeals); denials are rare, so it costs the hot path almost nothing.
CREATE INDEX checkins_person_idx ON checkins (person_ref);
CREATE INDEX checkins_venue_time_idx ON checkins (venue_id, scan_time);
CREATE INDEX checkins_decision_idx ON checkins (decision_id) WHERE decision_id IS NOT NULL;

-- Audit entries name their outcome: refusals (no grant, self-approval) are
-- recorded too, in a transaction of their own.
ALTER TABLE audit_events
    ADD COLUMN outcome      text NOT NULL DEFAULT 'succeeded'
                            CHECK (outcome IN ('succeeded', 'denied', 'failed')),
    ADD COLUMN error_reason text NOT NULL DEFAULT '';
CREATE INDEX audit_events_case_idx ON audit_events (case_id) WHERE case_id IS NOT NULL;
CREATE INDEX audit_events_grant_idx ON audit_events (grant_id) WHERE grant_id IS NOT NULL;

GRANT SELECT, INSERT ON cases TO stopcovid_exposure;
GRANT SELECT, INSERT, UPDATE ON access_requests TO stopcovid_exposure;
GRANT SELECT, INSERT, UPDATE ON access_grants TO stopcovid_exposure;
GRANT SELECT, INSERT, UPDATE ON traces TO stopcovid_exposure;
GRANT SELECT ON trace_contacts, case_records TO stopcovid_exposure;
GRANT SELECT, UPDATE ON notifications TO stopcovid_exposure;
GRANT SELECT ON venues TO stopcovid_retention;

-- The workers run traces and drain the outbox.
GRANT SELECT ON cases, access_requests, access_grants TO stopcovid_worker;
GRANT SELECT, UPDATE ON traces TO stopcovid_worker;
GRANT SELECT, INSERT, DELETE ON trace_contacts, case_records TO stopcovid_worker;
GRANT SELECT, INSERT, UPDATE ON notifications TO stopcovid_worker;
GRANT SELECT, INSERT, UPDATE ON risk_status TO stopcovid_worker;
GRANT SELECT ON people TO stopcovid_worker;

-- Retention reads everything it reports on, exports and expires.
GRANT SELECT ON cases, access_requests, access_grants, traces, trace_contacts, case_records,
    notifications, risk_history TO stopcovid_retention;
GRANT SELECT ON risk_status TO stopcovid_retention;
GRANT SELECT ON risk_history TO stopcovid_exposure;
