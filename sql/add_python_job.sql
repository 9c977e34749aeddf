-- A Python function on a schedule: "module:function" must be importable by the worker
-- (installed in its virtualenv, or on its PYTHONPATH). "options" reaches the function
-- as ctx.config.options.
INSERT INTO syncworker.integrations (name, kind, config, interval_seconds, timeout_seconds, max_retries)
VALUES ('example-flush-metrics', 'python',
        '{"callable": "myapp.sync:flush_metrics", "options": {"batch": 500}}',
        300, 120, 5);
