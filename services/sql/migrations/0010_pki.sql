-- Certificate revocation (issue 11; docs/pki.md).
--
-- Any certificate of the platform's PKI can be revoked by its serial: an officer's,
-- a front-end's, a device's or a server's. `stopcovid certs revoke` (as the
-- stopcovid_pki role) inserts the row; the trigger tells every server, which
-- refuses the certificate from then on and ends the calls open under it; every
-- server also reloads the whole table periodically. A revocation is final:
-- nobody but the migrator can change or delete a row.

CREATE TABLE certificate_revocations (
    -- Lowercase hex without leading zeros, as the servers print serials.
    serial          text PRIMARY KEY CHECK (serial ~ '^[1-9a-f][0-9a-f]{0,39}$'),
    revoke_time     timestamptz NOT NULL DEFAULT now(),
    -- RFC 5280 CRLReason names that apply to this PKI.
    reason          text NOT NULL CHECK (reason IN (
                        'unspecified', 'key_compromise', 'ca_compromise',
                        'affiliation_changed', 'superseded', 'cessation_of_operation')),
    note            text NOT NULL DEFAULT '' CHECK (length(note) <= 500),
    -- From the certificate when the revoking operator had it; '' otherwise. A
    -- principal is a system's or a device's name (moh-tracer-01), never a person's.
    principal       text NOT NULL DEFAULT '' CHECK (length(principal) <= 200),
    role            text NOT NULL DEFAULT '' CHECK (length(role) <= 64),
    -- When the certificate expires, if known: after it the TLS layer refuses it anyway.
    expire_time     timestamptz,
    revoked_by      text NOT NULL CHECK (length(revoked_by) BETWEEN 1 AND 200)
);

CREATE TRIGGER certificate_revocations_notify AFTER INSERT ON certificate_revocations
    FOR EACH ROW EXECUTE FUNCTION notify_change('stopcovid_revocation', 'serial');

GRANT SELECT ON certificate_revocations
    TO stopcovid_checkin, stopcovid_venue, stopcovid_exposure, stopcovid_retention;
GRANT SELECT, INSERT ON certificate_revocations TO stopcovid_pki;
GRANT INSERT ON audit_events TO stopcovid_pki;
