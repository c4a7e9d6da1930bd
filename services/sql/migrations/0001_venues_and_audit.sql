-- Venues and the audit log.
--
-- Applied by the migrator role, which owns every object; the service roles get
-- only the privileges they need. Tables that later hold per-venue data carry
-- venue_id so they can be distributed by venue (Citus) without a rewrite.

CREATE TABLE venues (
    venue_id        uuid PRIMARY KEY,
    display_name    text NOT NULL CHECK (length(display_name) BETWEEN 1 AND 200),
    setting         text NOT NULL CHECK (setting IN ('indoor', 'outdoor')),
    address         text NOT NULL DEFAULT '' CHECK (length(address) <= 500),
    region_code     text NOT NULL CHECK (length(region_code) BETWEEN 1 AND 16),
    capacity        integer NOT NULL DEFAULT 0 CHECK (capacity BETWEEN 0 AND 1000000),
    default_stay    interval NOT NULL DEFAULT interval '1 hour'
                    CHECK (default_stay BETWEEN interval '5 minutes' AND interval '12 hours'),
    state           text NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'suspended')),
    suspend_reason  text NOT NULL DEFAULT '',
    created_by      text NOT NULL,
    request_id      uuid UNIQUE,
    version         bigint NOT NULL DEFAULT 1,
    create_time     timestamptz NOT NULL DEFAULT now(),
    update_time     timestamptz NOT NULL DEFAULT now()
);

-- Keyset pagination order, with the filters that list RPCs offer.
CREATE INDEX venues_list_idx ON venues (create_time, venue_id);
CREATE INDEX venues_region_idx ON venues (region_code, create_time, venue_id);

-- Append-only: the services may insert, only retention (auditors) may read, and
-- nobody but the migrator may update or delete.
CREATE TABLE audit_events (
    event_id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    occur_time      timestamptz NOT NULL DEFAULT clock_timestamp(),
    principal       text NOT NULL,
    role            text NOT NULL,
    action          text NOT NULL,
    resource_type   text NOT NULL,
    resource_id     text NOT NULL,
    case_id         uuid,
    grant_id        uuid,
    details         jsonb NOT NULL DEFAULT '{}'
);

CREATE INDEX audit_events_time_idx ON audit_events (occur_time);

-- Workers report liveness here so operators can see the pool from SQL.
CREATE TABLE worker_heartbeats (
    worker_id       text PRIMARY KEY,
    host            text NOT NULL,
    pid             integer NOT NULL,
    start_time      timestamptz NOT NULL,
    beat_time       timestamptz NOT NULL
);

GRANT SELECT, INSERT, UPDATE ON venues TO stopcovid_venue;
GRANT SELECT ON venues TO stopcovid_checkin, stopcovid_exposure, stopcovid_worker;

GRANT INSERT ON audit_events
    TO stopcovid_checkin, stopcovid_venue, stopcovid_exposure, stopcovid_retention,
       stopcovid_worker;
GRANT SELECT ON audit_events TO stopcovid_retention;

GRANT SELECT, INSERT, UPDATE, DELETE ON worker_heartbeats TO stopcovid_worker;
GRANT SELECT ON worker_heartbeats TO stopcovid_retention;
