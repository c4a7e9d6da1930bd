-- The trace's two lookups on the check-in store (services/core/tracing.py).

-- name: case_scans
-- A case's admitted scans, by (day, pseudonym) pairs: each pair probes one day
-- partition's person_ref index (run-time partition pruning on c.day).
SELECT c.day, c.venue_id, c.device_id, c.sequence, c.scan_time, c.direction,
       c.person_ref, c.person_enc
FROM unnest($1::date[], $2::bytea[]) AS k (day, ref)
JOIN checkins c ON c.day = k.day AND c.person_ref = k.ref
WHERE c.outcome = 'admitted' AND c.scan_time >= $3 AND c.scan_time < $4;

-- name: venues
SELECT venue_id, display_name, setting, default_stay FROM venues WHERE venue_id = ANY($1);

-- name: scans_near
-- Everyone's admitted scans at each visit's venue in [lo, hi): one range scan of
-- the (venue_id, scan_time) index per visit and day partition.
SELECT q.visit, c.day, c.venue_id, c.device_id, c.sequence, c.scan_time, c.direction,
       c.person_ref, c.person_enc
FROM unnest($1::int[], $2::uuid[], $3::timestamptz[], $4::timestamptz[], $5::date[], $6::date[])
     AS q (visit, venue_id, lo, hi, first_day, last_day)
JOIN checkins c ON c.venue_id = q.venue_id AND c.scan_time >= q.lo AND c.scan_time < q.hi
               AND c.day >= q.first_day AND c.day <= q.last_day
WHERE c.outcome = 'admitted';

-- name: straightforward_overlaps
-- The straightforward design, kept for the benchmark and as an oracle in tests:
-- one overlap query over the whole store. Stays are built for everyone with a
-- window function (an entry closed by the same person's next exit at the venue
-- that day within the maximum stay, else by the venue's default stay), then the
-- case's stays are joined to everyone else's at the same venue.
WITH scans AS (
    SELECT c.day, c.venue_id, c.person_ref, c.person_enc, c.device_id, c.sequence,
           c.scan_time, c.direction,
           lead(c.direction) OVER w AS next_direction,
           lead(c.scan_time) OVER w AS next_time
    FROM checkins c
    WHERE c.outcome = 'admitted'
    WINDOW w AS (PARTITION BY c.day, c.person_ref, c.venue_id ORDER BY c.scan_time)
), stays AS (
    SELECT s.day, s.venue_id, s.person_ref, s.person_enc, s.device_id, s.sequence, v.setting,
           s.scan_time AS start_time,
           CASE WHEN s.next_direction = 'exit' AND s.next_time - s.scan_time <= $5
                THEN s.next_time
                ELSE least(s.scan_time + v.default_stay, coalesce(s.next_time, 'infinity'))
           END AS end_time
    FROM scans s JOIN venues v USING (venue_id)
    WHERE s.direction = 'entry'
), case_stays AS (
    SELECT * FROM stays
    WHERE (day, person_ref) IN (SELECT * FROM unnest($1::date[], $2::bytea[]))
      AND end_time > $3 AND start_time < $4
)
SELECT k.day, k.venue_id, k.device_id, k.sequence, k.person_enc, cs.setting,
       cs.start_time AS case_start, cs.end_time AS case_end,
       k.start_time AS contact_start, k.end_time AS contact_end
FROM case_stays cs
JOIN stays k ON k.venue_id = cs.venue_id
            AND k.start_time < cs.end_time + $6
            AND k.end_time > cs.start_time
            AND (k.day, k.person_ref) NOT IN (SELECT * FROM unnest($1::date[], $2::bytea[]));
