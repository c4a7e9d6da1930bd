-- Queries of the hash-chained audit log (services/retention/queries/audit_log.py).
-- Migration 0005 chains audit_events in the database (a trigger); verification
-- recomputes each digest with the same SQL function that made it.

-- name: list_audit_events
-- Keyset page in chain order; NULL filters match everything.
SELECT * FROM audit_events
WHERE ($1::timestamptz IS NULL OR occur_time >= $1)
  AND ($2::timestamptz IS NULL OR occur_time < $2)
  AND ($3::text IS NULL OR principal = $3)
  AND ($4::text IS NULL OR action = $4)
  AND ($5::uuid IS NULL OR case_id = $5)
  AND ($6::bigint IS NULL OR sequence > $6)
ORDER BY sequence
LIMIT $7;

-- name: chain_head
SELECT * FROM audit_chain_head;

-- name: audit_hash_at
SELECT hash FROM audit_events WHERE sequence = $1;

-- name: verify_chain
-- Recomputes every entry's digest in (anchor, end] and checks it links to the
-- entry before it (the first one to the anchor: the entry at start - 1, or the
-- expiry checkpoint). Returns the first broken entry (if any), how many entries
-- verified before it, the hash of the last of those, and the highest sequence
-- seen. $1 anchor sequence, $2 anchor hash, $3 end sequence, $4 anchor is the
-- checkpoint.
WITH span AS (
    SELECT sequence, hash, previous_hash,
           audit_event_digest(previous_hash, sequence, occur_time, principal, role, action,
                              outcome, error_reason, case_id, grant_id, resource_type,
                              resource_id, details) AS digest,
           COALESCE(lag(sequence) OVER w, $1::bigint) AS prev_sequence,
           COALESCE(lag(hash) OVER w, $2::bytea) AS prev_hash,
           lag(sequence) OVER w IS NULL AS first
    FROM audit_events
    WHERE sequence > $1 AND sequence <= $3
    WINDOW w AS (ORDER BY sequence)
), judged AS (
    SELECT sequence, hash,
           CASE
               WHEN sequence <> prev_sequence + 1 THEN 'gap'
               WHEN previous_hash <> prev_hash AND first AND $4::boolean THEN 'checkpoint'
               WHEN previous_hash <> prev_hash THEN 'link'
               WHEN hash <> digest THEN 'modified'
           END AS problem
    FROM span
), first_broken AS (
    SELECT sequence, problem FROM judged WHERE problem IS NOT NULL ORDER BY sequence LIMIT 1
)
SELECT (SELECT sequence FROM first_broken) AS broken_sequence,
       (SELECT problem FROM first_broken) AS problem,
       count(*) FILTER (WHERE sequence < COALESCE((SELECT sequence FROM first_broken),
                                                  9223372036854775807)) AS verified,
       (SELECT hash FROM judged
        WHERE sequence < COALESCE((SELECT sequence FROM first_broken), 9223372036854775807)
        ORDER BY sequence DESC LIMIT 1) AS last_good_hash,
       max(sequence) AS max_sequence
FROM judged;
