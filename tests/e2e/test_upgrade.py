"""Upgrading a database in use: from the first revision, with jobs and history in it, one
revision at a time to the head; nothing is lost and a worker carries on with the same jobs.

The worker only runs on the head revision, so the data is written at 0001 with SQL, the way
a worker of that time left it (including a run interrupted by the upgrade), then the schema
is upgraded and a real `syncworker run` process takes over.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from helpers import execute, one, rows, wait_for, workers
from worker.db.migrate import head_revision, known_revisions, upgrade

pytestmark = pytest.mark.e2e

TABLES = ("integrations", "sync_runs", "sync_errors", "workers")

# Columns a migration rewrites on purpose, left out of the comparison:
# - integrations.updated_at: the row trigger sets it on every UPDATE, and migrations update rows;
# - integrations.max_retries: 0005 made it count retries after the first failure and lowered
#   every row by one, so that each job keeps failing over after as many failures as before.
REWRITTEN = {"integrations": {"updated_at", "max_retries"}}

SETUP_AT_0001 = """
CREATE TABLE public.ticks (id bigserial PRIMARY KEY, at timestamptz DEFAULT clock_timestamp());

INSERT INTO syncworker.workers (hostname, pid, version, started_at, heartbeat_at, stopped_at)
VALUES ('old-host', 4242, '0.0.9', now() - interval '2 days', now() - interval '1 day',
        now() - interval '1 day'),
       ('killed-host', 4343, '0.0.9', now() - interval '1 hour', now() - interval '1 minute', NULL);

INSERT INTO syncworker.integrations (name, kind, config, interval_seconds, next_sync_at, state,
                                     last_status, last_sync_at, last_success_at, retry_count, last_error)
VALUES ('ticks', 'sql', '{"statement": "INSERT INTO public.ticks DEFAULT VALUES"}', 1,
        now() - interval '1 minute', '{}', 'failed', now() - interval '2 minutes',
        now() - interval '3 minutes', 1, 'connection refused'),
       ('counter', 'python', '{"callable": "jobs:count_up", "options": {"batch": 500}}', 1,
        now() - interval '1 minute', '{"n": 41}', 'success', now() - interval '2 minutes',
        now() - interval '2 minutes', 0, NULL),
       ('interrupted', 'sql', '{"statement": "INSERT INTO public.ticks DEFAULT VALUES"}', 3600,
        now() + interval '50 minutes', '{"cursor": "c7"}', 'success', now() - interval '10 minutes',
        now() - interval '10 minutes', 0, NULL);

INSERT INTO syncworker.integrations (name, kind, config, cron, timezone, next_sync_at)
VALUES ('contacts', 'http',
        '{"url": "https://api.example.com/v1/contacts",
          "auth": {"type": "bearer", "token": {"env": "CRM_TOKEN"}}, "records_path": "data",
          "destination": {"table": "public.crm_contacts", "key": ["id"], "create_table": true,
                          "columns": {"id": "bigint", "email": "text"}}}',
        '0 3 * * *', 'Europe/Berlin', now() + interval '1 day');

INSERT INTO syncworker.integrations (name, kind, config, interval_seconds, enabled, disabled_reason)
VALUES ('orders-mirror', 'postgres',
        '{"source": {"dsn": {"env": "SHOP_DSN"}, "table": "public.orders", "key": ["id"],
                     "updated_at": "updated_at"},
          "destination": {"table": "public.orders_mirror", "key": ["id"], "create_table": true},
          "deletes": "hard", "realtime": true}',
        60, false, 'paused by an operator');

INSERT INTO syncworker.integrations (name, kind, config, next_sync_at)
VALUES ('leaderboard', 'redis',
        '{"url": {"env": "REDIS_URL"}, "source": {"type": "sorted_set", "key": "board"},
          "destination": {"table": "public.board", "key": ["member"]}}',
        NULL);

-- History: runs of every status, errors (one per record, one per run), a run still running.
INSERT INTO syncworker.sync_runs (integration_id, status, trigger, attempt, worker_id, scheduled_for,
                                  started_at, locked_at, finished_at, duration_ms, records_processed,
                                  records_failed, records_inserted, error_type, error)
SELECT i.id, r.status, r.trigger, r.attempt, w.id, now() - r.ago, now() - r.ago, now() - r.ago,
       now() - r.ago + interval '1 second', 1000, r.processed, r.failed, r.processed, r.error_type, r.error
  FROM (VALUES ('ticks', 'success', 'schedule', 1, interval '3 minutes', 1, 0, NULL, NULL),
               ('ticks', 'failed', 'schedule', 1, interval '2 minutes', 0, 0, 'connection',
                'connection refused'),
               ('counter', 'partial', 'manual', 1, interval '5 minutes', 10, 2, NULL, NULL),
               ('counter', 'success', 'schedule', 1, interval '2 minutes', 3, 0, NULL, NULL),
               ('interrupted', 'success', 'schedule', 1, interval '10 minutes', 1, 0, NULL, NULL),
               ('contacts', 'abandoned', 'rescue', 2, interval '1 day', 0, 0, 'abandoned', 'the worker died'))
         AS r (name, status, trigger, attempt, ago, processed, failed, error_type, error)
  JOIN syncworker.integrations i ON i.name = r.name
  JOIN syncworker.workers w ON w.hostname = 'old-host';

INSERT INTO syncworker.sync_errors (integration_id, run_id, error_type, message, record_key, context,
                                    resolved)
SELECT r.integration_id, r.id, e.error_type, e.message, e.record_key, e.context::jsonb, e.resolved
  FROM (VALUES ('failed', 'connection', 'connection refused', NULL, '{}', false),
               ('partial', 'record_invalid', 'amount is not a number', 'order-17', '{"field": "amount"}',
                false),
               ('partial', 'record_invalid', 'missing customer id', 'order-23', '{}', true))
         AS e (status, error_type, message, record_key, context, resolved)
  JOIN syncworker.sync_runs r ON r.status = e.status;

-- 'interrupted' was running on the replica killed for the upgrade.
WITH run AS (
  INSERT INTO syncworker.sync_runs (integration_id, status, trigger, worker_id, scheduled_for, started_at,
                                    locked_at)
  SELECT i.id, 'running', 'schedule', w.id, now() - interval '90 seconds', now() - interval '90 seconds',
         now() - interval '89 seconds'
    FROM syncworker.integrations i, syncworker.workers w
   WHERE i.name = 'interrupted' AND w.hostname = 'killed-host'
  RETURNING id, integration_id
)
UPDATE syncworker.integrations i SET running_run_id = run.id FROM run WHERE i.id = run.integration_id;
"""


def snapshot(url: str) -> dict[str, list[dict[str, Any]]]:
    return {table: rows(url, f"SELECT * FROM syncworker.{table} ORDER BY id") for table in TABLES}


def assert_kept(before: dict[str, list[dict[str, Any]]], url: str, at: str) -> None:
    """Every row of `before` is still there with the same values (new columns may be added)."""
    after = snapshot(url)
    for table, old_rows in before.items():
        new_rows = after[table]
        assert [r["id"] for r in new_rows] == [r["id"] for r in old_rows], (at, table)
        skip = REWRITTEN.get(table, set())
        for old, new in zip(old_rows, new_rows, strict=True):
            for column, value in old.items():
                if column not in skip:
                    assert new[column] == value, (at, table, old["id"], column, value, new[column])


def runs_of(url: str, name: str) -> list[dict[str, Any]]:
    return rows(
        url,
        "SELECT r.* FROM syncworker.sync_runs r JOIN syncworker.integrations i ON i.id = r.integration_id "
        "WHERE i.name = %s ORDER BY r.id",
        (name,),
    )


def test_upgrade_from_the_first_revision_keeps_data_and_jobs_run(empty_db: str, tmp_path: Path) -> None:
    url = empty_db
    first, *later = known_revisions()
    assert first == "0001"
    upgrade(url, first)
    execute(url, SETUP_AT_0001)
    before = snapshot(url)
    assert {r["kind"] for r in before["integrations"]} == {"sql", "python", "http", "postgres", "redis"}
    assert len(before["sync_runs"]) == 7 and len(before["sync_errors"]) == 3 and len(before["workers"]) == 2

    for revision in later:
        upgrade(url, revision)
        assert one(url, "SELECT version_num FROM syncworker_alembic_version") == revision
        assert_kept(before, url, revision)
    assert later[-1] == head_revision()

    # A replica with this code takes over.
    old_runs = {name: runs_of(url, name) for name in ("ticks", "counter", "interrupted", "contacts")}
    with workers(url, tmp_path) as (proc,):
        wait_for(lambda: len(runs_of(url, "ticks")) >= len(old_runs["ticks"]) + 2, 30, what="ticks to run")
        wait_for(
            lambda: (
                (
                    one(url, "SELECT (state->>'n')::int FROM syncworker.integrations WHERE name = 'counter'")
                    or 0
                )
                >= 43
            ),
            30,
            what="counter to carry on from its saved state",
        )
        # The run cut off by the upgrade is abandoned and its job runs again at once, as a rescue.
        wait_for(
            lambda: [r["status"] for r in runs_of(url, "interrupted")][-2:] == ["abandoned", "success"],
            30,
            what="the interrupted run to be rescued",
        )
        assert proc.terminate() == 0
        output = proc.output()
    assert "Traceback" not in output and "ERROR" not in output, output

    rescued = runs_of(url, "interrupted")
    assert rescued[-1]["trigger"] == "rescue"
    assert one(url, "SELECT state FROM syncworker.integrations WHERE name = 'interrupted'") == {
        "cursor": "c7"
    }
    ticks = runs_of(url, "ticks")
    assert all(r["status"] == "success" for r in ticks[len(old_runs["ticks"]) :])
    assert one(url, "SELECT retry_count FROM syncworker.integrations WHERE name = 'ticks'") == 0
    # Jobs that were not due did not run, and history from before is as it was.
    assert runs_of(url, "contacts") == old_runs["contacts"]
    assert runs_of(url, "orders-mirror") == runs_of(url, "leaderboard") == []
    for name, runs in old_runs.items():
        now = {r["id"]: r for r in runs_of(url, name)}
        for run in runs:
            if run["status"] != "running":
                assert now[run["id"]] == run, (name, run["id"])
    columns = ("id", "run_id", "error_type", "message", "record_key", "context", "resolved")
    errors = rows(url, f"SELECT {', '.join(columns)} FROM syncworker.sync_errors ORDER BY id")
    assert errors[: len(before["sync_errors"])] == [{k: e[k] for k in columns} for e in before["sync_errors"]]
    # ... and the only new one says why the interrupted run was abandoned.
    assert [(e["run_id"], e["error_type"]) for e in errors[len(before["sync_errors"]) :]] == [
        (rescued[-2]["id"], "abandoned")
    ]
    configs = {r["name"]: r["config"] for r in before["integrations"]}
    assert {
        r["name"]: r["config"] for r in rows(url, "SELECT name, config FROM syncworker.integrations")
    } == configs, json.dumps(configs)
    paused = rows(
        url, "SELECT enabled, disabled_reason FROM syncworker.integrations WHERE name = 'orders-mirror'"
    )
    assert paused == [{"enabled": False, "disabled_reason": "paused by an operator"}]
