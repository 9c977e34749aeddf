-- Re-enable a job the worker disabled (retries exhausted or invalid config).
-- Fix the cause first (`syncworker check` validates configs); re-enabling clears
-- disabled_reason and retry_count and wakes the workers at once.
SELECT name, disabled_reason FROM syncworker.integrations WHERE NOT enabled;

UPDATE syncworker.integrations
   SET enabled = true,
       next_sync_at = now()          -- run now; leave this line out to wait for the schedule
 WHERE name = 'nightly-orders';
