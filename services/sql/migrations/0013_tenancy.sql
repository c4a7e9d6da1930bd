-- Tenancy: who owns venues, devices and enrollments, and whose request_id is whose.
--
-- An organisation is named by the organizationIdentifier of its principals'
-- certificates (`stopcovid certs issue --org`); the staff CA that issues them is
-- the register of organisations, so there is no table of them here. A venue
-- operator acts only on rows whose owner_organization is its own, a registration
-- front-end only on the people whose enrolled_by is its own; every query that
-- reads or changes such a row for them carries the organisation in its WHERE
-- clause (services/venue/queries.sql, services/domain/people/enrollment.sql).
--
-- Rows made before organisations existed belong to "mptc", the ministry that runs
-- the platform: MPTC staff (who act on every venue) and front-ends of the "mptc"
-- organisation reach them; nobody else does until a person proves themself with
-- their own token. Nothing is guessed from created_by, which names a principal,
-- not an organisation.

-- The default fills existing rows without rewriting them (and without firing the
-- change triggers the CheckIn caches listen to), and stays for rows written
-- outside the servers (fixtures, benchmarks): those are the ministry's too. The
-- servers always name the owner.
ALTER TABLE venues ADD COLUMN owner_organization text NOT NULL DEFAULT 'mptc';
ALTER TABLE venues ADD CONSTRAINT venues_owner_organization_check
        CHECK (owner_organization ~ '^[a-z0-9][a-z0-9.-]{0,62}$');
-- An operator's ListVenues: one organisation's venues in page order.
CREATE INDEX venues_owner_idx ON venues (owner_organization, create_time, venue_id);

-- A device belongs to its venue's owner when it is registered (every existing
-- venue is "mptc"'s, so is every existing device).
ALTER TABLE devices ADD COLUMN owner_organization text NOT NULL DEFAULT 'mptc';
ALTER TABLE devices ADD CONSTRAINT devices_owner_organization_check
        CHECK (owner_organization ~ '^[a-z0-9][a-z0-9.-]{0,62}$');
CREATE INDEX devices_owner_idx ON devices (owner_organization, create_time, device_id);

-- The organisation whose front-end enrolled the person.
ALTER TABLE people ADD COLUMN enrolled_by text NOT NULL DEFAULT 'mptc';
ALTER TABLE people ADD CONSTRAINT people_enrolled_by_check CHECK (enrolled_by ~ '^[a-z0-9][a-z0-9.-]{0,62}$');

-- request_id is scoped to its caller: request_owner names the principal
-- ("<role>:<organisation>:<name>", services/kernel/tenancy.py), and the unique key
-- is the pair, so another principal reusing an id makes its own row and never
-- reads this one's. Existing rows get the owner their recorded principal would
-- have had, so a retry that straddles the upgrade still finds its result where
-- the principal is known; self check-ins recorded none and match nobody.
ALTER TABLE venues ADD COLUMN request_owner text NOT NULL DEFAULT '';
UPDATE venues SET request_owner = 'ROLE_VENUE_OPERATOR::' || created_by
WHERE request_id IS NOT NULL;
ALTER TABLE venues DROP CONSTRAINT venues_request_id_key,
    ADD CONSTRAINT venues_request_key UNIQUE (request_owner, request_id);

ALTER TABLE grievances ADD COLUMN request_owner text NOT NULL DEFAULT '';
UPDATE grievances SET request_owner = 'ROLE_REGISTRAR::' || filer WHERE request_id IS NOT NULL;
ALTER TABLE grievances DROP CONSTRAINT grievances_request_id_key,
    ADD CONSTRAINT grievances_request_key UNIQUE (request_owner, request_id);
-- grievances_now (0008) is the table's columns and `overdue`: made again, since a
-- view's `g.*` is expanded when it is created.
DROP VIEW grievances_now;
CREATE VIEW grievances_now WITH (security_invoker = true) AS
SELECT g.*, (g.state <> 'resolved' AND g.due_time < now()) AS overdue
FROM grievances AS g;
GRANT SELECT, UPDATE ON grievances_now TO stopcovid_retention;

ALTER TABLE grievance_responses ADD COLUMN request_owner text NOT NULL DEFAULT '';
UPDATE grievance_responses SET request_owner = 'ROLE_GRIEVANCE_OFFICER::' || author
WHERE request_id IS NOT NULL;
ALTER TABLE grievance_responses DROP CONSTRAINT grievance_responses_request_id_key,
    ADD CONSTRAINT grievance_responses_request_key UNIQUE (request_owner, request_id);

ALTER TABLE self_checkin_requests ADD COLUMN request_owner text NOT NULL DEFAULT '';
ALTER TABLE self_checkin_requests DROP CONSTRAINT self_checkin_requests_pkey,
    ADD CONSTRAINT self_checkin_requests_pkey PRIMARY KEY (request_owner, request_id);

ALTER TABLE cases ADD COLUMN request_owner text NOT NULL DEFAULT '';
UPDATE cases SET request_owner = 'ROLE_HEALTH_OFFICIAL::' || reporter WHERE request_id IS NOT NULL;
ALTER TABLE cases DROP CONSTRAINT cases_request_id_key,
    ADD CONSTRAINT cases_request_key UNIQUE (request_owner, request_id);

ALTER TABLE access_requests ADD COLUMN request_owner text NOT NULL DEFAULT '';
UPDATE access_requests SET request_owner = 'ROLE_HEALTH_OFFICIAL::' || requester
WHERE request_id IS NOT NULL;
ALTER TABLE access_requests DROP CONSTRAINT access_requests_request_id_key,
    ADD CONSTRAINT access_requests_request_key UNIQUE (request_owner, request_id);

ALTER TABLE traces ADD COLUMN request_owner text NOT NULL DEFAULT '';
UPDATE traces SET request_owner = 'ROLE_HEALTH_OFFICIAL::' || starter WHERE request_id IS NOT NULL;
ALTER TABLE traces DROP CONSTRAINT traces_request_id_key,
    ADD CONSTRAINT traces_request_key UNIQUE (request_owner, request_id);
