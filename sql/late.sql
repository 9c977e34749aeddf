-- What is late: enabled jobs whose due time passed more than a minute ago and that are not running.
-- With workers up, nothing should be here for long: check `SELECT * FROM syncworker.workers`.
SELECT name, kind, next_sync_at, now() - next_sync_at AS late_by, last_status, last_sync_at
  FROM syncworker.integrations
 WHERE enabled AND running_run_id IS NULL AND next_sync_at < now() - interval '1 minute'
 ORDER BY next_sync_at;
