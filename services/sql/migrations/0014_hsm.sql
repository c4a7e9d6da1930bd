-- Wrapped data keys for the PKCS#11 key store (issue 15; services/kernel/hsm.py,
-- docs/production.md "Keys").
--
-- With STOPCOVID_KEYSTORE=pkcs11 every data key is kept here, wrapped (AES-GCM)
-- inside the HSM by a key that never leaves it, so that every host reaches the
-- same keys. A key that expiry destroys (a day's, a case's) is wrapped by an HSM
-- key of its own, which expiry destroys in the HSM: the wrapped copy that a
-- database backup still holds then opens with nothing, anywhere. Long-lived keys
-- (tokens, people, venues) are wrapped by the installation's master key.
--
-- A destroyed key keeps its row as a tombstone (wrapped NULL) so that the name
-- is never given a new key; a tombstone never changes again.

CREATE TABLE wrapped_keys (
    kind            text NOT NULL CHECK (kind IN ('day', 'case', 'token', 'people', 'venue', 'server')),
    name            text NOT NULL CHECK (name ~ '^[0-9A-Za-z][0-9A-Za-z._-]{0,63}$'),
    -- The HSM object that wraps it: its CKA_LABEL and CKA_ID.
    kek_label       text NOT NULL CHECK (length(kek_label) BETWEEN 1 AND 200),
    kek_id          bytea CHECK (length(kek_id) BETWEEN 1 AND 32),
    -- 12-byte nonce, ciphertext and tag; NULL once destroyed.
    wrapped         bytea CHECK (length(wrapped) BETWEEN 28 AND 200),
    create_time     timestamptz NOT NULL DEFAULT now(),
    destroy_time    timestamptz,
    PRIMARY KEY (kind, name),
    CHECK ((destroy_time IS NULL) = (wrapped IS NOT NULL AND kek_id IS NOT NULL))
);

CREATE FUNCTION wrapped_keys_tombstone_final() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.destroy_time IS NOT NULL THEN
        RAISE EXCEPTION 'the key %/% was destroyed; its tombstone cannot change',
            OLD.kind, OLD.name USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER wrapped_keys_tombstone_final BEFORE UPDATE ON wrapped_keys
    FOR EACH ROW EXECUTE FUNCTION wrapped_keys_tombstone_final();

-- Which key of a kind new data uses (token, people, venue); changed by rotation.
CREATE TABLE key_pointers (
    kind            text PRIMARY KEY CHECK (kind IN ('token', 'people', 'venue')),
    name            text NOT NULL,
    update_time     timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (kind, name) REFERENCES wrapped_keys (kind, name)
);

-- Every process reads keys and may create one on first use (a day key, a case key,
-- a first token key); only expiry (retention, worker) destroys; only the migrator
-- (`stopcovid keys rotate-*`) moves a pointer; nobody deletes a tombstone.
GRANT SELECT, INSERT ON wrapped_keys, key_pointers
    TO stopcovid_checkin, stopcovid_venue, stopcovid_exposure, stopcovid_retention,
       stopcovid_worker;
GRANT UPDATE (wrapped, kek_id, destroy_time) ON wrapped_keys
    TO stopcovid_retention, stopcovid_worker;
