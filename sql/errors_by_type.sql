-- Unresolved errors by job and type over the last 24 hours, with the latest message of each.
SELECT i.name, e.error_type, count(*) AS errors, max(e.created_at) AS latest,
       (array_agg(e.message ORDER BY e.created_at DESC))[1] AS latest_message
  FROM syncworker.sync_errors e
  JOIN syncworker.integrations i ON i.id = e.integration_id
 WHERE NOT e.resolved AND e.created_at > now() - interval '24 hours'
 GROUP BY i.name, e.error_type
 ORDER BY errors DESC;

-- Mark a job's errors as dealt with (they are then pruned after the retention period).
-- This file only reads: to write, copy the statement below, uncomment it, put in the job's
-- name and run it yourself.
-- UPDATE syncworker.sync_errors SET resolved = true
--  WHERE NOT resolved
--    AND integration_id = (SELECT id FROM syncworker.integrations WHERE name = 'nightly-orders');
-- The same, as `syncworker resolve nightly-orders [--type timeout]` does it (returns how many):
-- SELECT syncworker.resolve_errors('nightly-orders');             -- every type
-- SELECT syncworker.resolve_errors('nightly-orders', 'timeout');  -- one error_type
