-- New scans go straight into the check-in store.
--
-- A scan can only conflict with the store's key if the same (device, sequence,
-- day) is stored already, and the device's one writer (0006) knows exactly which
-- numbers are stored: so the CheckIn servers COPY new scans into `checkins`
-- directly, in the group commit's transaction, and keep the inbox for the rest (a
-- day whose partition does not exist yet, or a group the store refused), which the
-- workers move as before. A commit whose outcome was lost with its connection is
-- recognised by its transaction id (pg_xact_status), not by retrying it: the store,
-- unlike the inbox, must not see a group twice.

GRANT INSERT ON checkins TO stopcovid_checkin;

-- The highest sequence number a device has used: retired with an expired day,
-- waiting in the inbox, or stored (the store's (device_id, sequence, day) key gives
-- one backward index probe per day partition). Owner's rights, so the Venue role
-- (device listings) needs no access to check-ins.
CREATE FUNCTION device_last_sequence(d uuid) RETURNS bigint
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public AS $$
    SELECT coalesce(greatest(
        (SELECT last_sequence FROM device_sequences WHERE device_id = d),
        (SELECT max(sequence) FROM scan_inbox WHERE device_id = d),
        (SELECT max(sequence) FROM checkins WHERE device_id = d)
    ), 0)
$$;
REVOKE ALL ON FUNCTION device_last_sequence(uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION device_last_sequence(uuid) TO stopcovid_checkin, stopcovid_venue;
