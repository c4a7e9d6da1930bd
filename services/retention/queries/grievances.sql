-- Queries of grievances and denied-entry appeals (services/retention/queries/grievances.py).
-- A grievance is read through grievances_now (migration 0008): the table's columns
-- and whether it is overdue now.

-- name: insert_grievance
-- Files a grievance; with a request_id this caller ($26, tenancy.request_owner)
-- already used, returns nothing (the caller then reads the grievance that request
-- filed); another caller's request_id never conflicts. $1 to $24 are the fields of
-- NewGrievance in order, its DenialSnapshot's in place; $25 how long it has until
-- it is due.
INSERT INTO grievances (grievance_id, tracking_id, secret_hash, category, description_enc,
                        contact_enc, text_key_id, venue_id, incident_date, denial_decision_id,
                        body, filer, request_id, denial_time, denial_venue_id, denial_level,
                        basis_reason, basis_exposure_time, basis_venue_id,
                        basis_venue_display_name, basis_overlap, basis_rule, person_enc,
                        people_key_id, due_time, request_owner)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19,
        $20, $21, $22, $23, $24, now() + $25::interval, $26)
ON CONFLICT (request_owner, request_id) DO NOTHING
RETURNING grievance_id, tracking_id, body, due_time;

-- name: filed_by_request
SELECT grievance_id, tracking_id, body, due_time FROM grievances
WHERE request_owner = $1 AND request_id = $2;

-- name: tracking_id_taken
SELECT EXISTS (SELECT 1 FROM grievances WHERE tracking_id = $1);

-- name: get_grievance
SELECT * FROM grievances_now WHERE tracking_id = $1;

-- name: lock_grievance
-- The grievance, locked until the transaction ends: the officers' changes are
-- read-check-write.
SELECT * FROM grievances_now WHERE tracking_id = $1 FOR UPDATE;

-- name: list_grievances
-- Keyset page in (due_time, tracking_id) order; NULL filters match everything.
SELECT * FROM grievances_now
WHERE ($1::text IS NULL OR state = $1)
  AND ($2::text IS NULL OR body = $2)
  AND ($3::text IS NULL OR category = $3)
  AND ($4::text IS NULL OR assignee = $4)
  AND (NOT $5::boolean OR overdue)
  AND ($6::timestamptz IS NULL OR (due_time, tracking_id) > ($6, $7::text))
ORDER BY due_time, tracking_id
LIMIT $8;

-- name: grievance_responses
-- The messages of some grievances, oldest first.
SELECT grievance_id, message, create_time FROM grievance_responses
WHERE grievance_id = ANY ($1::uuid[])
ORDER BY grievance_id, response_id;

-- name: assign_grievance
UPDATE grievances_now
SET assignee = $2, body = $3, state = 'in_progress', update_time = now()
WHERE grievance_id = $1
RETURNING *;

-- name: insert_response
-- Adds a message; with a request_id this caller ($5) already used, adds nothing.
INSERT INTO grievance_responses (grievance_id, message, author, request_id, request_owner)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (request_owner, request_id) DO NOTHING;

-- name: response_by_request
-- The tracking id of the grievance a message of this caller with this request_id
-- was added to.
SELECT g.tracking_id FROM grievance_responses r JOIN grievances g USING (grievance_id)
WHERE r.request_owner = $1 AND r.request_id = $2;

-- name: touch_grievance
UPDATE grievances_now SET update_time = now() WHERE grievance_id = $1
RETURNING *;

-- name: resolve_grievance
UPDATE grievances_now
SET state = 'resolved', outcome = $2, resolution_summary = $3, resolve_time = now(),
    update_time = now()
WHERE grievance_id = $1
RETURNING *;

-- name: venue_exists
SELECT EXISTS (SELECT 1 FROM venues WHERE venue_id = $1);

-- ===== denied-entry appeals ================================================

-- name: find_denial
-- A denial held in the store or still in the inbox, by its decision id
-- (checkins_decision_idx in the store).
SELECT day, venue_id, device_id, sequence, scan_time, receive_time, person_enc
FROM entry_denials WHERE decision_id = $1
LIMIT 1;

-- name: risk_at
-- The risk level and basis in force for a person at a time: the latest change
-- at or before it.
SELECT level, reason, exposure_time, venue_id, venue_display_name, overlap, rule
FROM risk_history
WHERE person_id = $1 AND change_time <= $2
ORDER BY change_time DESC, change_id DESC
LIMIT 1;

-- name: current_risk
-- A person's level now ('none' past its expiry); no row when they are not enrolled.
SELECT CASE WHEN r.level IS NULL OR r.expire_time <= now() THEN 'none' ELSE r.level END AS level
FROM people p LEFT JOIN risk_status r ON r.person_id = p.person_id
WHERE p.person_id = $1;
