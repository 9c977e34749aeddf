-- The replicas: who is alive, who leads, what they run. `alive` is whether the worker still
-- holds its liveness lock in this database; `lost_since` is when a rescuer first found it
-- gone (a replica lost for 10 s is marked stopped and its sessions are terminated). A
-- heartbeat much older than its interval (30 s by default) on a live-looking replica means a
-- frozen process.
SELECT id, hostname, pid, version, mode, concurrency, leader, running,
       syncworker.lock_held('worker', id) AS alive,
       now() - heartbeat_at AS since_heartbeat, lost_at AS lost_since,
       started_at, heartbeat_at, stopped_at
  FROM syncworker.workers
 WHERE stopped_at IS NULL OR stopped_at > now() - interval '1 day'
 ORDER BY stopped_at NULLS FIRST, started_at;
