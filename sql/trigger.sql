-- Run a job now. During a run this queues exactly one follow-up run.
SELECT syncworker.trigger_sync('example-refresh-kpis');

-- Change a schedule. The new schedule applies from the next run; set next_sync_at
-- in the same statement to move the next run too.
UPDATE syncworker.integrations
   SET interval_seconds = NULL, cron = '30 2 * * *', timezone = 'Europe/Berlin', next_sync_at = now()
 WHERE name = 'example-refresh-kpis';

-- Pause and resume a job (`syncworker pause` / `resume`): a paused job keeps its schedule,
-- shows health `paused`, and a run in progress finishes.  resume_job runs it on its schedule
-- again.  (enable_job / disable_job(name, reason) and `UPDATE ... SET enabled` work too.)
SELECT syncworker.pause_job('example-refresh-kpis', 'upstream maintenance until 14:00');
SELECT syncworker.resume_job('example-refresh-kpis');
