-- Everything at a glance: one row per job, worst first.
SELECT name, kind, health, schedule, last_status, last_sync_at, next_sync_at,
       retry_count, runs_24h, success_rate_24h, mean_duration_ms_24h, unresolved_errors,
       coalesce(disabled_reason, last_error) AS problem
  FROM syncworker.status
 ORDER BY array_position(ARRAY['disabled', 'failing', 'late', 'degraded', 'pending', 'ok'], health), name;
