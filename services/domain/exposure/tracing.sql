-- The trace's two lookups on the check-in store (services/domain/exposure/tracing.py).

-- name: case_scans
-- A case's admitted scans, by (day, pseudonym) pairs, each with its venue: each
-- pair probes one day partition's person_ref index (run-time partition pruning
-- on c.day); the venue is one primary-key probe per row of a few dozen.
SELECT c.day, c.venue_id, c.device_id, c.sequence, c.scan_time, c.direction,
       c.person_ref, c.person_enc, v.display_name, v.setting, v.default_stay
FROM unnest($1::date[], $2::bytea[]) AS k (day, ref)
JOIN checkins c ON c.day = k.day AND c.person_ref = k.ref
JOIN venues v ON v.venue_id = c.venue_id
WHERE c.outcome = 'admitted' AND c.scan_time >= $3 AND c.scan_time < $4;

-- name: scans_near
-- Everyone's admitted scans at each visit's venue in [lo, hi]: one range scan of
-- the (venue_id, scan_time) index per visit and day partition. Both ends are
-- inclusive, as the rules' limits are: an exit exactly 12 h after an entry made
-- exactly 30 minutes after the case left still ends that stay (found by the
-- property test).
SELECT q.visit, c.day, c.venue_id, c.device_id, c.sequence, c.scan_time, c.direction,
       c.person_ref, c.person_enc
FROM unnest($1::int[], $2::uuid[], $3::timestamptz[], $4::timestamptz[], $5::date[], $6::date[])
     AS q (visit, venue_id, lo, hi, first_day, last_day)
JOIN checkins c ON c.venue_id = q.venue_id AND c.scan_time >= q.lo AND c.scan_time <= q.hi
               AND c.day >= q.first_day AND c.day <= q.last_day
WHERE c.outcome = 'admitted';

-- name: straightforward_overlaps
-- The straightforward design, kept for the benchmark and as an oracle in tests:
-- one overlap query over the whole store. Stays are built for everyone with
-- window functions over each person's scans at a venue that day, by the rules of
-- tracing.pair_stays: an entry right after an entry less than the default stay
-- later repeats it (the same stay); a stay's latest entry is ended by the next
-- scan when that is an exit within the maximum stay ($5), else by the default
-- stay. (This equals pair_stays while default stays do not exceed the maximum
-- stay, which the venues' CHECK and the default setting ensure.) Then the case's
-- stays are joined to everyone else's at the same venue. Grouped by day
-- pseudonym, it cannot link a stay across 00:00 UTC.
WITH scans AS (
    SELECT c.day, c.venue_id, c.person_ref, c.person_enc, c.device_id, c.sequence,
           c.scan_time, c.direction, v.setting, v.default_stay,
           lag(c.direction) OVER w AS prev_direction,
           lag(c.scan_time) OVER w AS prev_time,
           lead(c.direction) OVER w AS next_direction,
           lead(c.scan_time) OVER w AS next_time
    FROM checkins c JOIN venues v USING (venue_id)
    WHERE c.outcome = 'admitted'
    WINDOW w AS (PARTITION BY c.day, c.person_ref, c.venue_id ORDER BY c.scan_time, c.direction)
), entries AS (
    SELECT s.*,
           count(*) FILTER (
               WHERE s.prev_direction IS DISTINCT FROM 'entry'
                  OR s.scan_time >= s.prev_time + s.default_stay
           ) OVER (PARTITION BY s.day, s.person_ref, s.venue_id
                   ORDER BY s.scan_time, s.direction) AS stay_number,
           s.next_direction IS DISTINCT FROM 'entry'
               OR s.next_time >= s.scan_time + s.default_stay AS latest
    FROM scans s
    WHERE s.direction = 'entry'
), stays AS (
    SELECT e.day, e.venue_id, e.person_ref, e.setting,
           min(e.scan_time) AS start_time,
           max(CASE WHEN NOT e.latest THEN NULL
                    WHEN e.next_direction = 'exit' AND e.next_time - e.scan_time <= $5
                    THEN e.next_time
                    ELSE e.scan_time + e.default_stay END) AS end_time,
           (array_agg(e.person_enc ORDER BY e.scan_time))[1] AS person_enc,
           (array_agg(e.device_id ORDER BY e.scan_time))[1] AS device_id,
           (array_agg(e.sequence ORDER BY e.scan_time))[1] AS sequence
    FROM entries e
    GROUP BY e.day, e.venue_id, e.person_ref, e.setting, e.stay_number
), case_stays AS (
    SELECT * FROM stays
    WHERE (day, person_ref) IN (SELECT * FROM unnest($1::date[], $2::bytea[]))
      AND end_time > $3 AND start_time < $4
)
SELECT k.day, k.venue_id, k.device_id, k.sequence, k.person_ref, k.person_enc, cs.setting,
       cs.start_time AS case_start, cs.end_time AS case_end,
       k.start_time AS contact_start, k.end_time AS contact_end
FROM case_stays cs
JOIN stays k ON k.venue_id = cs.venue_id
            AND k.start_time < cs.end_time + $6
            AND k.end_time > cs.start_time
            AND (k.day, k.person_ref) NOT IN (SELECT * FROM unnest($1::date[], $2::bytea[]));
