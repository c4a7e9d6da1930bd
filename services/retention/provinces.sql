-- Transparency figures by the province of the venue they concern. Loaded by name
-- with services.kernel.db.load_queries; run by services/retention/provinces.py.

-- name: province_figures
-- (figure, stored region code, count) for [$1, $2): venues registered (now, any
-- period), contacts found by traces started in the period, notifications sent
-- and entry denials in it. Counts only; the joins to venues (a few thousand
-- rows, by primary key) add no personal data.
SELECT 'venues' AS figure, region_code, count(*) AS n
FROM venues
GROUP BY region_code
UNION ALL
SELECT 'contacts', v.region_code, count(*)
FROM trace_contacts tc
JOIN traces t ON t.trace_id = tc.trace_id
JOIN venues v ON v.venue_id = tc.venue_id
WHERE t.create_time >= $1 AND t.create_time < $2
GROUP BY v.region_code
UNION ALL
SELECT 'notifications_sent', v.region_code, count(*)
FROM notifications n
JOIN venues v ON v.venue_id = n.venue_id
WHERE n.state = 'sent' AND n.send_time >= $1 AND n.send_time < $2
GROUP BY v.region_code
UNION ALL
SELECT 'entry_denials', v.region_code, count(*)
FROM (
    SELECT venue_id FROM checkins
    WHERE decision_id IS NOT NULL AND outcome = 'denied' AND scan_time >= $1 AND scan_time < $2
    UNION ALL
    SELECT venue_id FROM scan_inbox
    WHERE decision_id IS NOT NULL AND outcome = 'denied' AND scan_time >= $1 AND scan_time < $2
) d
JOIN venues v ON v.venue_id = d.venue_id
GROUP BY v.region_code;
