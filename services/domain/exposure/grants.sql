-- Access-grant lookups shared by the Exposure service and the workers
-- (services/domain/exposure/grants.py). Loaded by name with services.kernel.db.load_queries.

-- name: grant_by_id
SELECT * FROM access_grants WHERE grant_id = $1;

-- name: latest_grant_of_case
-- The case's active grant if it has one, else its most recent grant (whose state
-- then explains the refusal); nothing when the case has never had a grant.
SELECT * FROM access_grants
WHERE case_id = $1
ORDER BY (revoke_time IS NULL AND expire_time > $2) DESC, create_time DESC, grant_id DESC
LIMIT 1;
