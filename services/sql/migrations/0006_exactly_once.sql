-- Exactly once, across streams, servers, reconnects and days.
--
-- For a device, a sequence number names one scan for as long as any scan of the
-- device is retained. Two things make that hold wherever a scan arrives:
--
-- 1. One writer per device. A device's scans are decided by whichever CheckIn
--    stream (or unary CheckIn call) holds the device's current epoch. Opening a
--    stream takes the next epoch; every group commit checks, in its own
--    transaction and under a share lock of the device's row, that the epoch its
--    rows were decided under is still current, and drops (does not acknowledge)
--    the rows of any device whose epoch moved on. Taking an epoch waits for the
--    commits that hold the old one, so the new writer reads a store that already
--    holds everything its predecessors committed, and they can commit nothing
--    after it. The writer's own record of the numbers it decided is then exact.
--
-- 2. Numbers outlive their rows. The store's unique key includes the day, so it
--    cannot see a number reused on another day; the writer looks numbers up on
--    every day instead. When a day expires, the highest number each device used
--    on it is folded into device_sequences.retired_through: any number at or
--    below it is answered SEQUENCE_REUSED (a resend of a scan that old is
--    SCAN_TIME_TOO_OLD first), since devices number their scans increasingly.

CREATE TABLE device_streams (
    device_id   uuid PRIMARY KEY REFERENCES devices (device_id),
    epoch       bigint NOT NULL CHECK (epoch >= 1),
    open_time   timestamptz NOT NULL DEFAULT now()
);

-- Tells every CheckIn server that a device has a new writer, so a stream that
-- lost its epoch ends at once instead of at its next commit.
CREATE TRIGGER device_streams_notify AFTER INSERT OR UPDATE ON device_streams
    FOR EACH ROW EXECUTE FUNCTION notify_change('stopcovid_stream', 'device_id');

ALTER TABLE device_sequences
    ADD COLUMN retired_through bigint NOT NULL DEFAULT 0 CHECK (retired_through >= 0);

-- The highest sequence number of each device on a day, recorded when the day is
-- sealed (counted once it can take no more scans), folded into
-- device_sequences.retired_through when the day expires.
CREATE TABLE device_day_sequences (
    day             date NOT NULL,
    device_id       uuid NOT NULL,
    max_sequence    bigint NOT NULL,
    PRIMARY KEY (day, device_id)
);

-- As in 0004, plus the retirement of the day's sequence numbers, in the same
-- transaction as the detach: a number is never free while its row still exists,
-- and never free after. A day never sealed is measured here (rare: expiry seals
-- days long before they expire).
CREATE OR REPLACE FUNCTION expire_checkin_day(d date, OUT dropped boolean, OUT inbox_rows bigint)
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
        IF NOT EXISTS (SELECT 1 FROM public.day_keys AS k
                       WHERE k.day = d AND k.count_time IS NOT NULL) THEN
            EXECUTE format(
                'INSERT INTO public.device_day_sequences (day, device_id, max_sequence)
                 SELECT %L::date, device_id, max(sequence) FROM public.%I
                 WHERE device_id IS NOT NULL AND sequence IS NOT NULL
                 GROUP BY device_id
                 ON CONFLICT (day, device_id) DO UPDATE
                    SET max_sequence = greatest(device_day_sequences.max_sequence,
                                                excluded.max_sequence)',
                d, name);
        END IF;
        EXECUTE format('ALTER TABLE public.checkins DETACH PARTITION public.%I', name);
        EXECUTE format('DROP TABLE IF EXISTS public.%I', 'expired_' || name);
        EXECUTE format('ALTER TABLE public.%I RENAME TO %I', name, 'expired_' || name);
        dropped := true;
    END IF;
    INSERT INTO public.device_day_sequences (day, device_id, max_sequence)
    SELECT d, i.device_id, max(i.sequence) FROM public.scan_inbox AS i
    WHERE i.day = d AND i.device_id IS NOT NULL AND i.sequence IS NOT NULL
    GROUP BY i.device_id
    ON CONFLICT (day, device_id) DO UPDATE
        SET max_sequence = greatest(device_day_sequences.max_sequence, excluded.max_sequence);
    DELETE FROM public.scan_inbox WHERE day = d;
    GET DIAGNOSTICS inbox_rows = ROW_COUNT;
    INSERT INTO public.device_sequences AS s (device_id, last_sequence, retired_through)
    SELECT device_id, max_sequence, max_sequence FROM public.device_day_sequences WHERE day = d
    ORDER BY device_id
    ON CONFLICT (device_id) DO UPDATE
        SET retired_through = greatest(s.retired_through, excluded.retired_through),
            last_sequence = greatest(s.last_sequence, excluded.last_sequence);
    DELETE FROM public.device_day_sequences WHERE day = d;
END
$$;
REVOKE ALL ON FUNCTION expire_checkin_day(date) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION expire_checkin_day(date) TO stopcovid_retention, stopcovid_worker;

GRANT SELECT, INSERT, UPDATE ON device_streams TO stopcovid_checkin;
GRANT SELECT, INSERT, UPDATE ON device_day_sequences TO stopcovid_retention, stopcovid_worker;
