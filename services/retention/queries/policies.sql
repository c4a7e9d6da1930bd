-- Queries of retention policies and stored deletion reports
-- (services/retention/queries/policies.py). The expiry run's own queries are in
-- services/domain/retention/expiry_run.sql.

-- name: get_policy
SELECT * FROM retention_policies WHERE data_class = $1;

-- name: all_policies
-- Seven rows; ordered by DataClass number in the service.
SELECT * FROM retention_policies;

-- name: lock_policy
SELECT * FROM retention_policies WHERE data_class = $1 FOR UPDATE;

-- name: update_policy
UPDATE retention_policies
SET period_days = $2, update_time = now(), updater = $3, version = version + 1
WHERE data_class = $1
RETURNING *;

-- name: get_report
SELECT * FROM deletion_reports WHERE deletion_report_id = $1;

-- name: list_reports
-- Keyset page, newest first, in (create_time, id) descending order; NULL filters
-- match everything: $1 class, $2/$3 create_time range [start, end), $4 run id.
SELECT * FROM deletion_reports
WHERE ($1::text IS NULL OR data_class = $1)
  AND ($2::timestamptz IS NULL OR create_time >= $2)
  AND ($3::timestamptz IS NULL OR create_time < $3)
  AND ($4::uuid IS NULL OR run_id = $4)
  AND ($5::timestamptz IS NULL OR (create_time, deletion_report_id) < ($5, $6::uuid))
ORDER BY create_time DESC, deletion_report_id DESC
LIMIT $7;
