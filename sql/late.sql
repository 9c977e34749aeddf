-- What is late: enabled jobs whose due time passed more than 5 minutes ago and that are not
-- running (the same rule as the `late` health word of syncworker.status).
-- With workers up, nothing should be here for long: check `SELECT * FROM syncworker.workers`.
SELECT name, kind, next_sync_at, now() - next_sync_at AS late_by, last_status, last_sync_at
  FROM syncworker.integrations
 WHERE enabled AND running_run_id IS NULL AND next_sync_at < now() - interval '5 minutes'
 ORDER BY next_sync_at;
