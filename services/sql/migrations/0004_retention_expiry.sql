-- Retention: policies per data class, expiry runs and their deletion reports,
-- and the owner-rights functions expiry needs to drop whole check-in days.
--
-- Expiry is written in services/core/expiry.py and run both by the Retention
-- server (RunExpiry, as stopcovid_retention) and by the workers on a schedule
-- (as stopcovid_worker), so both roles get the same privileges here.

-- One row per DataClass (names are the enum's without the prefix, lower case).
-- The bounds are the proto's; the CHECK repeats them so that no code path can
-- store a period the platform promised never to use.
CREATE TABLE retention_policies (
    data_class      text PRIMARY KEY,
    period_days     integer NOT NULL,
    update_time     timestamptz,                 -- NULL while at the default
    updater         text NOT NULL DEFAULT '',
    version         bigint NOT NULL DEFAULT 1,   -- the etag
    CHECK (
        CASE data_class
            WHEN 'check_ins' THEN period_days BETWEEN 28 AND 90
            WHEN 'case_records' THEN period_days BETWEEN 28 AND 90
            WHEN 'inactive_enrollments' THEN period_days BETWEEN 28 AND 365
            WHEN 'notifications' THEN period_days BETWEEN 28 AND 90
            WHEN 'grievances' THEN period_days BETWEEN 90 AND 1825
            WHEN 'audit_events' THEN period_days BETWEEN 365 AND 3650
            WHEN 'entry_decisions' THEN period_days BETWEEN 28 AND 90
            ELSE false
        END
    )
);

INSERT INTO retention_policies (data_class, period_days) VALUES
    ('check_ins', 28),
    ('case_records', 90),
    ('inactive_enrollments', 90),
    ('notifications', 28),
    ('grievances', 365),
    ('audit_events', 730),
    ('entry_decisions', 28);

-- What one expiry run deleted of one class. Holds counts, a time span and key
-- ids only: never personal data, never key material.
CREATE TABLE deletion_reports (
    deletion_report_id  uuid PRIMARY KEY,
    run_id              uuid NOT NULL,
    data_class          text NOT NULL REFERENCES retention_policies (data_class),
    period_days         integer NOT NULL,
    row_count           bigint NOT NULL CHECK (row_count >= 0),
    data_start          timestamptz,
    data_end            timestamptz,
    destroyed_key_ids   text[] NOT NULL DEFAULT '{}',
    trigger             text NOT NULL CHECK (trigger IN ('scheduled', 'on_demand')),
    requester           text NOT NULL DEFAULT '',
    create_time         timestamptz NOT NULL DEFAULT now(),
    UNIQUE (run_id, data_class)
);
-- ListDeletionReports: newest first, optionally of one class.
CREATE INDEX deletion_reports_list_idx ON deletion_reports (create_time DESC, deletion_report_id DESC);
CREATE INDEX deletion_reports_class_idx
    ON deletion_reports (data_class, create_time DESC, deletion_report_id DESC);

-- Inactive enrollments expire from the person's last check-in or token issued.
-- Until the CheckIn service touches it, it is the enrollment time (expiry then
-- counts from enrollment, which errs on the side of deleting).
ALTER TABLE people ADD COLUMN last_activity_time timestamptz;
UPDATE people SET last_activity_time = enroll_time;
ALTER TABLE people
    ALTER COLUMN last_activity_time SET DEFAULT now(),
    ALTER COLUMN last_activity_time SET NOT NULL;
CREATE INDEX people_activity_idx ON people (last_activity_time);

-- Finds expired notifications without reading the live outbox.
CREATE INDEX notifications_finish_idx ON notifications (finish_time)
    WHERE state IN ('sent', 'failed', 'cancelled');

-- Drops the check-in partition of day `d` (DETACH, then DROP: whole files go,
-- no row is deleted one at a time, no dead tuple or per-row WAL is left) and
-- deletes the day's rows still waiting in the inbox. Runs with the owner's
-- rights, because only the owner may drop a partition; callable by the roles
-- that run expiry. Refuses a day that is not wholly older than the shortest
-- period any policy allows (28 days) by the database's own clock, so a caller
-- with a wrong clock or a bug cannot drop recent data through it.
-- Returns the inbox rows deleted; whether a partition existed is in `dropped`.
CREATE FUNCTION expire_checkin_day(d date, OUT dropped boolean, OUT inbox_rows bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
DECLARE
    name text := 'checkins_' || to_char(d, 'YYYYMMDD');
BEGIN
    IF d + 29 > (now() AT TIME ZONE 'UTC')::date THEN
        RAISE EXCEPTION 'day % is younger than the shortest retention period (28 days)', d
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    dropped := false;
    IF to_regclass('public.' || name) IS NOT NULL THEN
        -- Out of the store at once (catalog work only); its files are removed by
        -- drop_expired_checkins() after this transaction, since freeing a file's
        -- blocks takes time in proportion to its size.
        EXECUTE format('ALTER TABLE public.checkins DETACH PARTITION public.%I', name);
        EXECUTE format('DROP TABLE IF EXISTS public.%I', 'expired_' || name);
        EXECUTE format('ALTER TABLE public.%I RENAME TO %I', name, 'expired_' || name);
        dropped := true;
    END IF;
    DELETE FROM public.scan_inbox WHERE day = d;
    GET DIAGNOSTICS inbox_rows = ROW_COUNT;
END
$$;
REVOKE ALL ON FUNCTION expire_checkin_day(date) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION expire_checkin_day(date) TO stopcovid_retention, stopcovid_worker;

-- Drops the detached partitions expire_checkin_day() left (expired_checkins_*),
-- each in its own statement after the expiry committed; a run that died before
-- doing so leaves them to the next. Returns how many were dropped.
CREATE FUNCTION drop_expired_checkins() RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
DECLARE
    t record;
    n integer := 0;
BEGIN
    FOR t IN SELECT c.relname FROM pg_class AS c
             JOIN pg_namespace AS ns ON ns.oid = c.relnamespace
             WHERE ns.nspname = 'public' AND c.relkind = 'r'
               AND c.relname ~ '^expired_checkins_[0-9]{8}$'
    LOOP
        EXECUTE format('DROP TABLE public.%I', t.relname);
        n := n + 1;
    END LOOP;
    RETURN n;
END
$$;
REVOKE ALL ON FUNCTION drop_expired_checkins() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION drop_expired_checkins() TO stopcovid_retention, stopcovid_worker;

GRANT SELECT, UPDATE ON retention_policies TO stopcovid_retention;
GRANT SELECT ON retention_policies TO stopcovid_worker;
GRANT SELECT, INSERT ON deletion_reports TO stopcovid_retention, stopcovid_worker;

-- A day's rows are counted once, when the day can no longer receive scans (the
-- longest scan age is 7 days), so the deletion report of its expiry reads the
-- count instead of scanning the day while it drops it: expiry then takes the
-- same time whatever the day's size.
ALTER TABLE day_keys
    ADD COLUMN row_count    bigint,
    ADD COLUMN denied_count bigint,
    ADD COLUMN count_time   timestamptz;

-- What expiry deletes, for both roles that run it.
GRANT SELECT, INSERT, UPDATE (destroy_time, row_count, denied_count, count_time)
    ON day_keys TO stopcovid_retention;
GRANT SELECT ON scan_inbox TO stopcovid_retention;
GRANT UPDATE (person_enc, purge_time) ON cases TO stopcovid_retention, stopcovid_worker;
GRANT SELECT, DELETE ON trace_contacts, case_records TO stopcovid_retention;
GRANT SELECT, DELETE ON notifications TO stopcovid_retention, stopcovid_worker;
GRANT SELECT, DELETE ON people TO stopcovid_retention, stopcovid_worker;
GRANT SELECT, INSERT ON erased_people TO stopcovid_retention, stopcovid_worker;
