-- Views of what the Retention service's queries read again and again, each defined
-- once. They are security_invoker: a role reads through a view only what it may
-- read of the tables beneath, so the views grant nothing new.

-- The refusals at the door, each with the decision id a person appeals with: in
-- the store, or still in the inbox waiting for a worker (a row being moved may
-- show in both, with the same content). The columns are the inbox row's
-- (services/domain/checkins/inbox.py); the person is there only as the day's
-- pseudonym and sealed under the day key.
CREATE VIEW entry_denials WITH (security_invoker = true) AS
SELECT day, venue_id, device_id, sequence, scan_time, direction, outcome, decision_id,
       day_key_id, person_ref, person_enc, receive_time
FROM checkins
WHERE outcome = 'denied' AND decision_id IS NOT NULL
UNION ALL
SELECT day, venue_id, device_id, sequence, scan_time, direction, outcome, decision_id,
       day_key_id, person_ref, person_enc, receive_time
FROM scan_inbox
WHERE outcome = 'denied' AND decision_id IS NOT NULL;

-- Grievances, and whether each is overdue now (unresolved past its due time): the
-- one definition of overdue, for the officers' lists and the transparency
-- figures. The view is automatically updatable, so a change made through it
-- returns the grievance as the service shows it.
CREATE VIEW grievances_now WITH (security_invoker = true) AS
SELECT g.*, (g.state <> 'resolved' AND g.due_time < now()) AS overdue
FROM grievances AS g;

GRANT SELECT ON entry_denials TO stopcovid_retention;
GRANT SELECT, UPDATE ON grievances_now TO stopcovid_retention;
