-- How long runs take, per job, over the last 7 days (finished runs only).
SELECT i.name,
       count(*) AS runs,
       round(avg(r.duration_ms)) AS mean_ms,
       round(percentile_cont(0.5) WITHIN GROUP (ORDER BY r.duration_ms)::numeric) AS p50_ms,
       round(percentile_cont(0.95) WITHIN GROUP (ORDER BY r.duration_ms)::numeric) AS p95_ms,
       max(r.duration_ms) AS max_ms,
       round(100.0 * count(*) FILTER (WHERE r.status = 'success') / count(*), 1) AS success_pct
  FROM syncworker.sync_runs r
  JOIN syncworker.integrations i ON i.id = r.integration_id
 WHERE r.status <> 'running' AND r.started_at > now() - interval '7 days'
 GROUP BY i.name
 ORDER BY p95_ms DESC NULLS LAST;
