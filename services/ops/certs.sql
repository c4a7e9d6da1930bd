-- The PKI operators' commands (services/ops/certs.py), as the stopcovid_pki role.

-- name: insert_revocation
-- Revokes a certificate for good. A second revocation of the same serial changes
-- nothing (the first one's time and reason stand) and returns no row.
INSERT INTO certificate_revocations
    (serial, reason, note, principal, role, expire_time, revoked_by)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (serial) DO NOTHING
RETURNING revoke_time;

-- name: get_revocation
-- One revocation, by serial.
SELECT serial, revoke_time, reason FROM certificate_revocations WHERE serial = $1;

-- name: revocations_among
-- The revocations of the given serials (the certificates `certs list` shows).
SELECT serial, revoke_time, reason FROM certificate_revocations
WHERE serial = ANY($1::text[]);
