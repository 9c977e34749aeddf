-- Everything at a glance: one row per job, worst first (the order of `syncworker status`).
-- A disabled job has no next run.
SELECT name, kind, health, schedule, last_status, last_sync_at,
       CASE WHEN enabled THEN next_sync_at END AS next_sync_at,
       retry_count, runs_24h, success_rate_24h, mean_duration_ms_24h, unresolved_errors,
       coalesce(disabled_reason, last_error) AS problem
  FROM syncworker.status
 ORDER BY coalesce(array_position(ARRAY['disabled', 'paused', 'failing', 'stale', 'overrunning',
                                        'late', 'degraded', 'pending', 'ok'], health), 7.5),
          name;
