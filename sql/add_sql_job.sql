-- A SQL statement on a schedule. Without "dsn" it runs in the run's own transaction on
-- this database: its effects commit if and only if the run is recorded as done.
INSERT INTO syncworker.integrations (name, kind, config, cron, timezone)
VALUES ('example-refresh-kpis', 'sql',
        '{"statement": "REFRESH MATERIALIZED VIEW CONCURRENTLY public.daily_kpis"}',
        '0 3 * * *', 'UTC');

-- On another database, with parameters; the DSN comes from the worker's environment.
INSERT INTO syncworker.integrations (name, kind, config, interval_seconds)
VALUES ('example-archive-events', 'sql',
        '{"statement": "DELETE FROM events WHERE created_at < now() - make_interval(days => %(days)s)",
          "params": {"days": 90},
          "dsn": {"env": "ANALYTICS_DSN"}}',
        3600);
