-- What is running right now, where, and for how long.
SELECT i.name, r.id AS run_id, r.trigger, r.attempt, w.hostname, w.pid,
       now() - r.started_at AS running_for, i.timeout_seconds
  FROM syncworker.sync_runs r
  JOIN syncworker.integrations i ON i.id = r.integration_id
  LEFT JOIN syncworker.workers w ON w.id = r.worker_id
 WHERE r.status = 'running'
 ORDER BY r.started_at;
