-- Run a job now. During a run this queues exactly one follow-up run.
SELECT syncworker.trigger_sync('example-refresh-kpis');

-- Change a schedule. The new schedule applies from the next run; set next_sync_at
-- in the same statement to move the next run too.
UPDATE syncworker.integrations
   SET interval_seconds = NULL, cron = '30 2 * * *', timezone = 'Europe/Berlin', next_sync_at = now()
 WHERE name = 'example-refresh-kpis';

-- Pause and resume a job.
UPDATE syncworker.integrations SET enabled = false WHERE name = 'example-refresh-kpis';
UPDATE syncworker.integrations SET enabled = true WHERE name = 'example-refresh-kpis';
