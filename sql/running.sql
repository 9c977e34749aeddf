-- What is running right now, where, and for how long. `over_timeout`: the run has passed
-- its timeout_seconds; its worker should have stopped it, and if it cannot (frozen,
-- partitioned) any replica's rescuer terminates the run's session shortly after.
SELECT i.name, r.id AS run_id, r.trigger, r.attempt, w.hostname, w.pid,
       now() - r.started_at AS running_for, i.timeout_seconds,
       r.started_at < now() - make_interval(secs => i.timeout_seconds) AS over_timeout,
       syncworker.lock_held('worker', w.id) AS worker_alive
  FROM syncworker.sync_runs r
  JOIN syncworker.integrations i ON i.id = r.integration_id
  LEFT JOIN syncworker.workers w ON w.id = r.worker_id
 WHERE r.status = 'running'
 ORDER BY r.started_at;
