-- Certificate revocation as the servers read it (services/kernel/revocation.py).
-- The table is small (one row per revoked certificate) and read whole.

-- name: revoked_serials
-- Every revoked serial: the full reload, at start and every cache_refresh_s.
SELECT serial FROM certificate_revocations;

-- name: revoked_among
-- Which of the serials a notification named are revoked: a notification is only
-- a hint (any role may NOTIFY), the table is the truth.
SELECT serial FROM certificate_revocations WHERE serial = ANY($1::text[]);
