-- An access request as the Exposure service shows it: the request and, once
-- approved, its grant. Every read of a request (by id, by request_id, the
-- approvers' list) wants the two together; one view instead of the same join
-- and column list in each query. The grant's columns carry a g_ prefix, every
-- column of access_grants, NULL while the request has no grant (the typed
-- record services/domain/exposure/records.py AccessRequest reads them so).
CREATE VIEW access_requests_with_grant AS
SELECT a.access_request_id, a.case_id, a.outbreak_reference, a.justification,
       a.window_start, a.window_end, a.state, a.requester, a.request_id, a.create_time,
       a.decider, a.decide_time, a.decision_comment,
       g.grant_id AS g_grant_id, g.access_request_id AS g_access_request_id,
       g.case_id AS g_case_id, g.window_start AS g_window_start,
       g.window_end AS g_window_end, g.create_time AS g_create_time,
       g.expire_time AS g_expire_time, g.revoke_time AS g_revoke_time,
       g.revoker AS g_revoker, g.revoke_reason AS g_revoke_reason
FROM access_requests a
LEFT JOIN access_grants g ON g.access_request_id = a.access_request_id;

GRANT SELECT ON access_requests_with_grant TO stopcovid_exposure;
