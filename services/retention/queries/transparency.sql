-- Queries of the transparency figures (services/retention/queries/transparency.py):
-- counts only, for a period [$1, $2), never a row's contents. Each column is named
-- as the GetTransparencyReportResponse or ProvinceCount field it fills.

-- name: transparency
SELECT
    (SELECT count(*) FROM cases WHERE report_time >= $1 AND report_time < $2) AS case_count,
    (SELECT count(*) FROM access_requests WHERE create_time >= $1 AND create_time < $2)
        AS access_request_count,
    (SELECT count(*) FROM access_requests
     WHERE state = 'approved' AND decide_time >= $1 AND decide_time < $2) AS approval_count,
    (SELECT count(*) FROM access_requests
     WHERE state = 'denied' AND decide_time >= $1 AND decide_time < $2) AS denial_count,
    (SELECT count(*) FROM access_grants
     WHERE revoke_time >= $1 AND revoke_time < $2 AND revoke_time < expire_time)
        AS revoked_grant_count,
    (SELECT count(*) FROM traces WHERE create_time >= $1 AND create_time < $2) AS trace_count,
    (SELECT count(*) FROM notifications
     WHERE state = 'sent' AND send_time >= $1 AND send_time < $2) AS notification_sent_count,
    (SELECT count(*) FROM notifications
     WHERE state = 'failed' AND finish_time >= $1 AND finish_time < $2)
        AS notification_failed_count,
    (SELECT count(*) FROM entry_denials WHERE scan_time >= $1 AND scan_time < $2)
        AS entry_denial_count,
    -- Overdue now, whatever the period.
    (SELECT count(*) FROM grievances_now WHERE overdue) AS overdue_grievance_count,
    (SELECT count(*) FROM erased_people WHERE erase_time >= $1 AND erase_time < $2)
        AS consent_withdrawal_count;

-- name: grievances_by_state
SELECT state, count(*) AS n FROM grievances
WHERE create_time >= $1 AND create_time < $2
GROUP BY state;

-- name: deletions_by_class
SELECT data_class, count(*) AS report_count, COALESCE(sum(row_count), 0)::bigint AS row_count,
       COALESCE(sum(cardinality(destroyed_key_ids)), 0)::bigint AS destroyed_key_count
FROM deletion_reports
WHERE create_time >= $1 AND create_time < $2
GROUP BY data_class;

-- name: province_figures
-- (figure, stored region code, count): venues registered (now, any period),
-- contacts found by traces started in the period, notifications sent and entry
-- denials in it. The joins to venues (a few thousand rows, by primary key) add
-- no personal data.
SELECT 'venue_count' AS figure, region_code, count(*) AS n
FROM venues
GROUP BY region_code
UNION ALL
SELECT 'contact_count', v.region_code, count(*)
FROM trace_contacts tc
JOIN traces t ON t.trace_id = tc.trace_id
JOIN venues v ON v.venue_id = tc.venue_id
WHERE t.create_time >= $1 AND t.create_time < $2
GROUP BY v.region_code
UNION ALL
SELECT 'notification_sent_count', v.region_code, count(*)
FROM notifications n
JOIN venues v ON v.venue_id = n.venue_id
WHERE n.state = 'sent' AND n.send_time >= $1 AND n.send_time < $2
GROUP BY v.region_code
UNION ALL
SELECT 'entry_denial_count', v.region_code, count(*)
FROM entry_denials d
JOIN venues v ON v.venue_id = d.venue_id
WHERE d.scan_time >= $1 AND d.scan_time < $2
GROUP BY v.region_code;
