-- Queries of the trace-contacts export (services/exposure/export.py). Loaded by
-- name with services.kernel.db.load_queries.

-- name: count_export_rows
-- How many rows the export will hold: audited before any row leaves.
SELECT count(*) FROM trace_contacts WHERE trace_id = $1 AND level_rank >= $2;

-- name: export_rows
-- The rows, highest risk first then row order (trace_contacts_list_idx), with
-- their venue's name, address and province. Read through a cursor, a few
-- hundred rows at a time, so a large trace never sits whole in memory.
SELECT tc.row_number, tc.contact_ref, tc.level_rank, tc.rule, tc.venue_id,
       coalesce(v.display_name, '') AS venue_name, coalesce(v.address, '') AS venue_address,
       coalesce(v.region_code, '') AS region_code,
       tc.case_visit_start, tc.case_visit_end, tc.contact_stay_start, tc.contact_stay_end,
       tc.overlap, tc.stay_end_estimated, tc.person_enc
FROM trace_contacts tc
LEFT JOIN venues v ON v.venue_id = tc.venue_id
WHERE tc.trace_id = $1 AND tc.level_rank >= $2
ORDER BY tc.level_rank DESC, tc.row_number;
