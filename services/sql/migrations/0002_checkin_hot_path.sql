-- The check-in hot path: people, devices, the scan inbox, the day-partitioned
-- check-in store, and the state the CheckIn servers cache (risk, revocations).
--
-- No table here holds a plaintext phone number or a plaintext person id next to
-- a visit: people hold the phone encrypted plus a keyed blind index; the inbox
-- and the store hold a per-day pseudonym and the person id encrypted under the
-- day key. Keys live outside the database (services/core/keys.py); day_keys
-- only records which exist.

-- Enrolled people. phone_index = HMAC(blind-index key, E.164 number) finds a
-- number again without decrypting anything; phone_enc = AES-GCM under a people
-- data key (people_key_id), bound to person_id.
CREATE TABLE people (
    person_id            uuid PRIMARY KEY,
    phone_index          bytea NOT NULL UNIQUE,
    phone_enc            bytea NOT NULL,
    people_key_id        text NOT NULL,
    language_code        text NOT NULL CHECK (length(language_code) BETWEEN 1 AND 35),
    consent_text_version text NOT NULL CHECK (length(consent_text_version) BETWEEN 1 AND 64),
    consent_time         timestamptz NOT NULL,
    enroll_time          timestamptz NOT NULL DEFAULT now()
);

-- People erased on withdrawal of consent (issue: retention). Their tokens still
-- verify cryptographically, so the CheckIn servers keep this set in memory and
-- answer PERSON_NOT_ENROLLED. Holds only the opaque id.
CREATE TABLE erased_people (
    person_id   uuid PRIMARY KEY,
    erase_time  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE devices (
    device_id               uuid PRIMARY KEY,
    venue_id                uuid NOT NULL REFERENCES venues (venue_id),
    display_name            text NOT NULL CHECK (length(display_name) BETWEEN 1 AND 200),
    state                   text NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'revoked')),
    certificate_serial      text NOT NULL,
    certificate_expire_time timestamptz NOT NULL,
    created_by              text NOT NULL,
    create_time             timestamptz NOT NULL DEFAULT now(),
    revoke_time             timestamptz,
    revoke_reason           text NOT NULL DEFAULT '' CHECK (length(revoke_reason) <= 500),
    CHECK ((state = 'revoked') = (revoke_time IS NOT NULL))
);

CREATE INDEX devices_list_idx ON devices (create_time, device_id);
CREATE INDEX devices_venue_idx ON devices (venue_id, create_time, device_id);

-- Highest sequence stored per device, kept by the ingest workers.
CREATE TABLE device_sequences (
    device_id       uuid PRIMARY KEY,
    last_sequence   bigint NOT NULL
);

-- Append-only landing zone of acknowledged scans. The CheckIn servers COPY into
-- it (no unique index: a scan resent after a lost ack may land twice; the store
-- keeps it once). The workers move rows out in large batches.
CREATE TABLE scan_inbox (
    inbox_id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    day             date NOT NULL,
    venue_id        uuid NOT NULL,
    device_id       uuid,
    sequence        bigint,
    scan_time       timestamptz NOT NULL,
    direction       text NOT NULL CHECK (direction IN ('entry', 'exit')),
    outcome         text NOT NULL CHECK (outcome IN ('admitted', 'denied')),
    decision_id     uuid,
    day_key_id      text NOT NULL,
    person_ref      bytea NOT NULL,
    person_enc      bytea NOT NULL,
    receive_time    timestamptz NOT NULL
) WITH (autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_insert_scale_factor = 0.01);

-- Read by device when a stream opens (its highest sequence) and when a device
-- resends after a reconnect. Without this index each of those scans the whole
-- inbox, which after millions of moved rows stalled every stream for seconds;
-- it costs the COPY about a quarter of its raw speed (measured), which the hot
-- path has to spare (the store's ingest, not the inbox, is the bottleneck).
CREATE INDEX scan_inbox_device_idx ON scan_inbox (device_id, sequence);

-- The check-in store, one partition per UTC day, so expiry drops whole days.
-- A row is one scan: a visit (admitted) or a refusal at the door (denied, with
-- the decision id a person can appeal). Scans without a device (self check-in)
-- have device_id and sequence NULL and are deduplicated by request id instead.
CREATE TABLE checkins (
    day             date NOT NULL,
    venue_id        uuid NOT NULL,
    device_id       uuid,
    sequence        bigint,
    scan_time       timestamptz NOT NULL,
    direction       text NOT NULL CHECK (direction IN ('entry', 'exit')),
    outcome         text NOT NULL CHECK (outcome IN ('admitted', 'denied')),
    decision_id     uuid,
    day_key_id      text NOT NULL,
    person_ref      bytea NOT NULL,
    person_enc      bytea NOT NULL,
    receive_time    timestamptz NOT NULL,
    store_time      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT checkins_scan_key UNIQUE (device_id, sequence, day)
) PARTITION BY RANGE (day);

-- Creates the partition for `d` if missing. Runs with the owner's rights so the
-- worker role can create partitions without owning the table; serialized so
-- concurrent workers do not race.
CREATE FUNCTION ensure_checkin_partition(d date) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
DECLARE
    name text := 'checkins_' || to_char(d, 'YYYYMMDD');
BEGIN
    IF to_regclass('public.' || name) IS NOT NULL THEN
        RETURN false;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('ensure_checkin_partition'));
    IF to_regclass('public.' || name) IS NOT NULL THEN
        RETURN false;
    END IF;
    EXECUTE format('CREATE TABLE public.%I PARTITION OF public.checkins FOR VALUES FROM (%L) TO (%L)',
                   name, d, d + 1);
    RETURN true;
EXCEPTION
    -- The re-check above may read a catalog cache that an advisory lock does not
    -- refresh; a partition made meanwhile by another worker is success, not failure.
    WHEN duplicate_table OR unique_violation THEN
        RETURN false;
END
$$;
REVOKE ALL ON FUNCTION ensure_checkin_partition(date) FROM PUBLIC;

-- Which day keys exist (no key material: the keys live in the key store).
CREATE TABLE day_keys (
    day             date PRIMARY KEY,
    key_id          text NOT NULL,
    create_time     timestamptz NOT NULL DEFAULT now(),
    destroy_time    timestamptz
);

-- Risk level per person, written by the Exposure service. The CheckIn servers
-- hold the people at the highest level in memory.
CREATE TABLE risk_status (
    person_id       uuid PRIMARY KEY,
    level           text NOT NULL CHECK (level IN ('low', 'medium', 'high')),
    expire_time     timestamptz NOT NULL,
    update_time     timestamptz NOT NULL DEFAULT now()
);

-- Self check-ins by request id, so a retried SelfCheckIn stores nothing more
-- and returns the first answer.
CREATE TABLE self_checkin_requests (
    request_id      uuid PRIMARY KEY,
    venue_id        uuid NOT NULL,
    outcome         text NOT NULL CHECK (outcome IN ('admitted', 'denied')),
    decision_id     uuid,
    create_time     timestamptz NOT NULL DEFAULT now()
);

-- Cache invalidation for the CheckIn servers: the payload is an opaque id.
CREATE FUNCTION notify_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    id text;
BEGIN
    IF TG_OP = 'DELETE' THEN
        id := row_to_json(OLD) ->> TG_ARGV[1];
    ELSE
        id := row_to_json(NEW) ->> TG_ARGV[1];
    END IF;
    PERFORM pg_notify(TG_ARGV[0], id);
    RETURN NULL;
END
$$;

CREATE TRIGGER devices_notify AFTER UPDATE OR DELETE ON devices
    FOR EACH ROW EXECUTE FUNCTION notify_change('stopcovid_device', 'device_id');
CREATE TRIGGER venues_notify AFTER UPDATE OR DELETE ON venues
    FOR EACH ROW EXECUTE FUNCTION notify_change('stopcovid_venue', 'venue_id');
CREATE TRIGGER risk_status_notify AFTER INSERT OR UPDATE OR DELETE ON risk_status
    FOR EACH ROW EXECUTE FUNCTION notify_change('stopcovid_risk', 'person_id');
CREATE TRIGGER erased_people_notify AFTER INSERT OR DELETE ON erased_people
    FOR EACH ROW EXECUTE FUNCTION notify_change('stopcovid_erased', 'person_id');

-- Wakes the ingest workers; statement-level, so one COPY sends one notification.
CREATE FUNCTION notify_inbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('stopcovid_inbox', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER scan_inbox_notify AFTER INSERT ON scan_inbox
    FOR EACH STATEMENT EXECUTE FUNCTION notify_inbox();

GRANT SELECT, INSERT, UPDATE ON people TO stopcovid_checkin;
GRANT SELECT ON people TO stopcovid_exposure, stopcovid_retention;
GRANT SELECT ON erased_people TO stopcovid_checkin;
GRANT SELECT ON devices TO stopcovid_checkin;
GRANT SELECT, INSERT, UPDATE ON devices TO stopcovid_venue;
GRANT SELECT ON device_sequences TO stopcovid_checkin, stopcovid_venue;
GRANT SELECT, INSERT, UPDATE ON device_sequences TO stopcovid_worker;
GRANT INSERT, SELECT ON scan_inbox TO stopcovid_checkin;
GRANT SELECT, DELETE ON scan_inbox TO stopcovid_worker;
-- Only because claiming rows FOR UPDATE SKIP LOCKED requires UPDATE on a column;
-- inbox_id is generated always, so nothing can actually be updated through it.
GRANT UPDATE (inbox_id) ON scan_inbox TO stopcovid_worker;
GRANT INSERT, SELECT ON checkins TO stopcovid_worker;
GRANT SELECT ON checkins TO stopcovid_checkin, stopcovid_exposure, stopcovid_retention;
GRANT EXECUTE ON FUNCTION ensure_checkin_partition(date) TO stopcovid_worker;
GRANT SELECT, INSERT, UPDATE ON day_keys TO stopcovid_worker;
GRANT SELECT ON day_keys TO stopcovid_checkin, stopcovid_exposure, stopcovid_retention;
GRANT SELECT ON risk_status TO stopcovid_checkin;
GRANT SELECT, INSERT, UPDATE, DELETE ON risk_status TO stopcovid_exposure;
GRANT SELECT, INSERT ON self_checkin_requests TO stopcovid_checkin;
