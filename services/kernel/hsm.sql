-- The PKCS#11 key store's wrapped keys (services/kernel/hsm.py; migration 0014_hsm).

-- name: wrapped_key
-- One key's wrapped form and the HSM key that opens it; a tombstone has wrapped NULL.
SELECT kek_label, kek_id, wrapped, destroy_time FROM wrapped_keys
WHERE kind = $1 AND name = $2;

-- name: insert_wrapped_key
-- Store a new key unless the name has one (or a tombstone): the first one wins.
INSERT INTO wrapped_keys (kind, name, kek_label, kek_id, wrapped)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (kind, name) DO NOTHING
RETURNING name;

-- name: live_key_names
-- The names of a kind's keys that are not destroyed.
SELECT name FROM wrapped_keys
WHERE kind = $1 AND destroy_time IS NULL
ORDER BY name;

-- name: key_pointer
SELECT name FROM key_pointers WHERE kind = $1;

-- name: insert_key_pointer
-- The first current key of a kind; a process that loses the race keeps the winner's.
INSERT INTO key_pointers (kind, name) VALUES ($1, $2) ON CONFLICT (kind) DO NOTHING;

-- name: move_key_pointer
-- Rotation (the migrator only).
INSERT INTO key_pointers (kind, name) VALUES ($1, $2)
ON CONFLICT (kind) DO UPDATE SET name = excluded.name, update_time = now();

-- name: tombstone_key
-- Mark a key destroyed (or a name that never had one, so it never will), and say
-- whether a live key was there. A tombstone stays as it is.
WITH before AS (
    SELECT destroy_time IS NULL AS live FROM wrapped_keys
    WHERE kind = $1 AND name = $2
    FOR UPDATE
), marked AS (
    INSERT INTO wrapped_keys (kind, name, kek_label, kek_id, wrapped, destroy_time)
    VALUES ($1, $2, $3, NULL, NULL, now())
    ON CONFLICT (kind, name) DO UPDATE
        SET wrapped = NULL, kek_id = NULL, destroy_time = now()
        WHERE wrapped_keys.destroy_time IS NULL
)
SELECT coalesce((SELECT live FROM before), false) AS live;
