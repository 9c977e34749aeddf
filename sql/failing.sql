-- What is failing: jobs retrying or disabled, with the latest error and when they try again.
SELECT name, enabled, retry_count, max_retries, last_status, last_sync_at,
       CASE WHEN enabled THEN next_sync_at END AS next_attempt_at,
       coalesce(disabled_reason, last_error) AS why
  FROM syncworker.integrations
 WHERE retry_count > 0 OR NOT enabled OR last_status IN ('failed', 'abandoned')
 ORDER BY enabled, retry_count DESC, name;
