-- A Python function on a schedule: "module:function" must be importable by the worker
-- (installed in its virtualenv, or on its PYTHONPATH) and allowed by its
-- SYNCWORKER_PYTHON_MODULES (here: myapp.sync, or myapp). "options" reaches the function
-- as ctx.config.options. Add "isolation": "process" to run it in a child process, so that
-- a crash there fails the run instead of the worker.
INSERT INTO syncworker.integrations (name, kind, config, interval_seconds, timeout_seconds, max_retries)
VALUES ('example-flush-metrics', 'python',
        '{"callable": "myapp.sync:flush_metrics", "options": {"batch": 500}}',
        300, 120, 5);
