-- Accountability: the hash-chained audit log, grievances and appeals, and what
-- the Retention service needs to erase a person who withdraws consent.

-- ---------------------------------------------------------------------------
-- The audit log's hash chain.
--
-- Every entry gets a gapless sequence (from 1), the previous entry's hash and
-- its own: hash = sha256(previous_hash || canonical content). A deferred
-- constraint trigger fills the three columns at COMMIT while holding the one
-- row of audit_chain_head, so concurrent transactions serialize only for their
-- commit, and a rolled-back transaction never touches the head (no gap).
-- Linking at commit rather than at insert matters: a transaction that audited
-- early would otherwise hold the head while taking other locks (a partition
-- drop, a row lock), blocking every audited action in the platform meanwhile
-- and deadlocking with any transaction that took those locks before auditing. The services' roles still only INSERT;
-- they cannot touch the head, and nobody but the migrator may update or delete
-- entries. Entries are removed only by expire_audit_before(), which records a
-- checkpoint (the last removed entry's sequence and hash) so the oldest kept
-- entry's link stays verifiable.

-- The canonical content of an entry: a JSON array (jsonb's text form is
-- deterministic: keys sorted, fixed spacing), time as integer microseconds
-- since the epoch so it does not depend on the session's time zone.
CREATE FUNCTION audit_event_digest(
    previous_hash bytea, sequence bigint, occur_time timestamptz, principal text, role text,
    action text, outcome text, error_reason text, case_id uuid, grant_id uuid,
    resource_type text, resource_id text, details jsonb
) RETURNS bytea
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog AS $$
    SELECT sha256(previous_hash || convert_to(jsonb_build_array(
        sequence,
        (extract(epoch FROM occur_time) * 1000000)::bigint,
        principal, role, action, outcome, error_reason,
        case_id::text, grant_id::text, resource_type, resource_id, details
    )::text, 'UTF8'))
$$;
REVOKE ALL ON FUNCTION audit_event_digest(bytea, bigint, timestamptz, text, text, text, text,
    text, uuid, uuid, text, text, jsonb) FROM PUBLIC;

-- One row: the newest entry, and the checkpoint left by audit expiry (sequence
-- 0 and the genesis hash of 32 zero bytes until anything expires).
CREATE TABLE audit_chain_head (
    singleton           boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    last_sequence       bigint NOT NULL,
    last_hash           bytea NOT NULL,
    checkpoint_sequence bigint NOT NULL DEFAULT 0,
    checkpoint_hash     bytea NOT NULL,
    checkpoint_time     timestamptz
);

-- Every expiry of audit entries, for the record (the head keeps the latest).
CREATE TABLE audit_checkpoints (
    checkpoint_sequence bigint PRIMARY KEY,
    checkpoint_hash     bytea NOT NULL,
    cutoff              timestamptz NOT NULL,
    deleted_count       bigint NOT NULL,
    create_time         timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE audit_events
    ADD COLUMN sequence      bigint,
    ADD COLUMN hash          bytea,
    ADD COLUMN previous_hash bytea;

-- Chain the entries written before this migration, in the order they were written.
DO $$
DECLARE
    prev bytea := '\x0000000000000000000000000000000000000000000000000000000000000000';
    n bigint := 0;
    e record;
BEGIN
    FOR e IN SELECT * FROM audit_events ORDER BY event_id LOOP
        n := n + 1;
        UPDATE audit_events
        SET sequence = n, previous_hash = prev,
            hash = audit_event_digest(prev, n, e.occur_time, e.principal, e.role, e.action,
                                      e.outcome, e.error_reason, e.case_id, e.grant_id,
                                      e.resource_type, e.resource_id, e.details)
        WHERE event_id = e.event_id
        RETURNING hash INTO prev;
    END LOOP;
    INSERT INTO audit_chain_head (last_sequence, last_hash, checkpoint_hash)
    VALUES (n, prev, '\x0000000000000000000000000000000000000000000000000000000000000000');
END
$$;

-- The three columns stay NULL only until the inserting transaction commits
-- (see audit_chain_link); a committed entry always has them.
ALTER TABLE audit_events
    ADD CONSTRAINT audit_events_sequence_key UNIQUE (sequence);
CREATE INDEX audit_events_principal_idx ON audit_events (principal, sequence);
CREATE INDEX audit_events_action_idx ON audit_events (action, sequence);

CREATE FUNCTION audit_chain_link() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
DECLARE
    head record;
    seq bigint;
    at timestamptz;
    digest bytea;
BEGIN
    SELECT last_sequence, last_hash INTO head FROM audit_chain_head FOR UPDATE;
    seq := head.last_sequence + 1;
    -- Taken under the lock, so times follow the chain order.
    at := clock_timestamp();
    digest := audit_event_digest(head.last_hash, seq, at, NEW.principal, NEW.role, NEW.action,
                                 NEW.outcome, NEW.error_reason, NEW.case_id, NEW.grant_id,
                                 NEW.resource_type, NEW.resource_id, NEW.details);
    UPDATE audit_events
    SET sequence = seq, previous_hash = head.last_hash, occur_time = at, hash = digest
    WHERE event_id = NEW.event_id;
    UPDATE audit_chain_head SET last_sequence = seq, last_hash = digest;
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION audit_chain_link() FROM PUBLIC;
CREATE CONSTRAINT TRIGGER audit_events_chain AFTER INSERT ON audit_events
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION audit_chain_link();

-- Audit expiry (retention class AUDIT_EVENTS): deletes the entries older than
-- `cutoff` (a prefix of the chain: up to the newest such entry) and records the
-- last deleted entry as the checkpoint. Returns how many were deleted.
CREATE FUNCTION expire_audit_before(cutoff timestamptz) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
DECLARE
    last record;
    deleted bigint;
BEGIN
    PERFORM 1 FROM audit_chain_head FOR UPDATE;
    SELECT sequence, hash INTO last FROM audit_events
    WHERE occur_time < cutoff ORDER BY sequence DESC LIMIT 1;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    DELETE FROM audit_events WHERE sequence <= last.sequence;
    GET DIAGNOSTICS deleted = ROW_COUNT;
    UPDATE audit_chain_head
    SET checkpoint_sequence = last.sequence, checkpoint_hash = last.hash,
        checkpoint_time = clock_timestamp();
    INSERT INTO audit_checkpoints (checkpoint_sequence, checkpoint_hash, cutoff, deleted_count)
    VALUES (last.sequence, last.hash, cutoff, deleted);
    RETURN deleted;
END
$$;
REVOKE ALL ON FUNCTION expire_audit_before(timestamptz) FROM PUBLIC;

-- ---------------------------------------------------------------------------
-- Grievances. The complainant's secret is kept only as its SHA-256. A
-- denied-entry appeal keeps a snapshot of the denial: when and where, and the
-- risk level and basis in force then (never the case); the person is kept only
-- encrypted under the people key (aad b"grievance|" + grievance id), to show the
-- officer their current level.
CREATE TABLE grievances (
    grievance_id        uuid PRIMARY KEY,
    tracking_id         text NOT NULL UNIQUE,
    secret_hash         bytea NOT NULL,
    category            text NOT NULL
                        CHECK (category IN ('misuse_of_data', 'privacy', 'denied_entry',
                                            'wrong_data', 'other')),
    -- The complainant's words and contact are personal data: AES-GCM under the
    -- people key named by text_key_id, bound to the grievance (aad
    -- b"grievance-description|" / b"grievance-contact|" + grievance id).
    description_enc     bytea NOT NULL,
    contact_enc         bytea NOT NULL,
    text_key_id         text NOT NULL,
    venue_id            uuid,
    incident_date       date,
    denial_decision_id  uuid,
    body                text NOT NULL CHECK (body IN ('committee', 'mptc', 'regulator')),
    state               text NOT NULL DEFAULT 'open'
                        CHECK (state IN ('open', 'in_progress', 'resolved')),
    assignee            text NOT NULL DEFAULT '',
    outcome             text CHECK (outcome IN ('upheld', 'not_upheld', 'referred', 'withdrawn')),
    resolution_summary  text NOT NULL DEFAULT '' CHECK (length(resolution_summary) <= 5000),
    filer               text NOT NULL,
    request_id          uuid UNIQUE,
    create_time         timestamptz NOT NULL DEFAULT now(),
    update_time         timestamptz NOT NULL DEFAULT now(),
    due_time            timestamptz NOT NULL,
    resolve_time        timestamptz,
    denial_time         timestamptz,
    denial_venue_id     uuid,
    denial_level        text,
    basis_reason        text,
    basis_exposure_time timestamptz,
    basis_venue_id      uuid,
    basis_venue_display_name text NOT NULL DEFAULT '',
    basis_overlap       interval,
    basis_rule          text NOT NULL DEFAULT '',
    person_enc          bytea,
    people_key_id       text,
    CHECK ((state = 'resolved') = (resolve_time IS NOT NULL)),
    CHECK ((state = 'resolved') = (outcome IS NOT NULL))
);
CREATE INDEX grievances_due_idx ON grievances (due_time, tracking_id);
CREATE INDEX grievances_create_idx ON grievances (create_time);
CREATE INDEX grievances_resolve_idx ON grievances (resolve_time) WHERE resolve_time IS NOT NULL;

-- Messages from officers to the complainant.
CREATE TABLE grievance_responses (
    response_id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    grievance_id        uuid NOT NULL REFERENCES grievances (grievance_id) ON DELETE CASCADE,
    message             text NOT NULL CHECK (length(message) BETWEEN 1 AND 5000),
    author              text NOT NULL,
    request_id          uuid UNIQUE,
    create_time         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX grievance_responses_idx ON grievance_responses (grievance_id, response_id);

-- Grievance expiry (retention class GRIEVANCES, counted from resolution):
-- deletes the grievances resolved before `cutoff`, with their messages, and
-- returns how many. Unresolved grievances are never expired.
CREATE FUNCTION expire_grievances_before(cutoff timestamptz) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
DECLARE
    deleted bigint;
BEGIN
    DELETE FROM grievances WHERE state = 'resolved' AND resolve_time < cutoff;
    GET DIAGNOSTICS deleted = ROW_COUNT;
    RETURN deleted;
END
$$;
REVOKE ALL ON FUNCTION expire_grievances_before(timestamptz) FROM PUBLIC;

-- Consent withdrawals by time, for the transparency figures.
CREATE INDEX erased_people_time_idx ON erased_people (erase_time);

-- ---------------------------------------------------------------------------
GRANT SELECT, INSERT, UPDATE ON grievances, grievance_responses TO stopcovid_retention;
GRANT SELECT ON audit_chain_head, audit_checkpoints TO stopcovid_retention;
GRANT EXECUTE ON FUNCTION audit_event_digest(bytea, bigint, timestamptz, text, text, text, text,
    text, uuid, uuid, text, text, jsonb) TO stopcovid_retention;
GRANT EXECUTE ON FUNCTION expire_audit_before(timestamptz)
    TO stopcovid_retention, stopcovid_worker;
GRANT EXECUTE ON FUNCTION expire_grievances_before(timestamptz)
    TO stopcovid_retention, stopcovid_worker;

-- Withdrawal of consent: erase the enrollment and risk status, record the
-- erasure, unlink check-ins (only the two person columns), cancel messages.
GRANT DELETE ON people TO stopcovid_retention;
GRANT SELECT, INSERT ON erased_people TO stopcovid_retention;
GRANT DELETE ON risk_status TO stopcovid_retention;
GRANT UPDATE (person_ref, person_enc) ON checkins TO stopcovid_retention;
GRANT SELECT, UPDATE (person_ref, person_enc) ON scan_inbox TO stopcovid_retention;
GRANT UPDATE (state, finish_time) ON notifications TO stopcovid_retention;
