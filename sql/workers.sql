-- The replicas: who is alive, who leads, what they run. A worker killed with
-- SIGKILL is marked stopped by the leader; its runs are handed back at once.
SELECT id, hostname, pid, version, mode, concurrency, leader, running,
       started_at, heartbeat_at, now() - heartbeat_at AS since_heartbeat, stopped_at
  FROM syncworker.workers
 WHERE stopped_at IS NULL OR stopped_at > now() - interval '1 day'
 ORDER BY stopped_at NULLS FIRST, started_at;
