"""The schema contract: migrations, row validation messages, trigger_sync, NOTIFY, the status view."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psycopg
import pytest

from helpers import ROOT, add_job, execute, one, rows
from worker.db.migrate import downgrade, upgrade


def test_upgrade_downgrade_upgrade_an_empty_database(empty_db: str) -> None:
    upgrade(empty_db)
    assert one(empty_db, "SELECT to_regclass('syncworker.integrations') IS NOT NULL")
    upgrade(empty_db)  # idempotent
    downgrade(empty_db, "base")
    assert one(empty_db, "SELECT count(*) FROM pg_namespace WHERE nspname = 'syncworker'") == 0
    upgrade(empty_db)
    assert one(empty_db, "SELECT count(*) FROM syncworker.integrations") == 0
    assert one(empty_db, "SELECT version_num FROM public.syncworker_alembic_version") is not None


def test_alembic_upgrade_head_from_the_repository_root(empty_db: str) -> None:
    env = {**os.environ, "SYNCWORKER_DATABASE_URL": empty_db}
    result = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert one(empty_db, "SELECT to_regclass('syncworker.status') IS NOT NULL")


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({"timezone": "Mars/Olympus"}, 'unknown timezone "Mars/Olympus"'),
        ({"timezone": "europe/berlin"}, 'unknown timezone "europe/berlin"'),
        ({"interval_seconds": 60, "cron": "* * * * *"}, "either interval_seconds or cron, not both"),
        ({"interval_seconds": 0}, "interval_seconds must be a positive number of seconds, got 0"),
        ({"cron": "61 * * * *"}, "minute"),
        ({"cron": "every day"}, "cron"),
        ({"max_retries": -1}, "integrations_max_retries_not_negative"),
        ({"name": "x" * 201}, "an integration name has at most 200 characters, got 201"),
        ({"config": []}, "integrations_config_is_object"),
        ({"name": " "}, "integrations_name_not_blank"),
    ],
)
def test_invalid_rows_are_rejected_with_a_readable_message(
    db: str, columns: dict[str, object], message: str
) -> None:
    name = str(columns.pop("name", "x"))
    config = columns.pop("config", {"statement": "select 1"})
    with pytest.raises(psycopg.errors.CheckViolation) as err:
        add_job(db, name, "sql", config, **columns)  # type: ignore[arg-type]
    assert message in str(err.value)


def test_valid_rows_are_accepted(db: str) -> None:
    add_job(db, "a", "sql", {"statement": "select 1"}, cron="*/5 * * * *", timezone="America/New_York")
    add_job(db, "b", "sql", {"statement": "select 1"}, interval_seconds=60, timezone="Etc/GMT+3")


def test_trigger_sync_errors_for_unknown_and_disabled_jobs(db: str) -> None:
    with pytest.raises(psycopg.errors.NoDataFound, match='no integration named "ghost"'):
        one(db, "SELECT syncworker.trigger_sync('ghost')")
    add_job(db, "off", "sql", {"statement": "select 1"}, enabled=False, disabled_reason="retries exhausted")
    with pytest.raises(psycopg.Error, match=r'integration "off" is disabled \(retries exhausted\)'):
        one(db, "SELECT syncworker.trigger_sync('off')")


def test_trigger_sync_makes_the_job_due_now_and_keeps_its_schedule_slot(db: str) -> None:
    add_job(
        db, "nightly", "sql", {"statement": "select 1"}, cron="0 3 * * *", next_sync_at="2099-01-01T03:00:00Z"
    )
    assert one(db, "SELECT syncworker.trigger_sync('nightly')") == "queued"
    job = rows(
        db,
        "SELECT next_sync_at <= now() AS due, scheduled_sync_at, pending_trigger "
        "FROM syncworker.integrations",
    )[0]
    assert job["due"] and job["pending_trigger"] == "manual"
    assert job["scheduled_sync_at"].year == 2099


def test_insert_trigger_and_reenable_notify_the_workers(db: str) -> None:
    with psycopg.connect(db, autocommit=True) as listener:
        listener.execute("LISTEN syncworker")
        add_job(db, "now", "sql", {"statement": "select 1"})
        add_job(db, "later", "sql", {"statement": "select 1"}, next_sync_at="2099-01-01")
        add_job(db, "off", "sql", {"statement": "select 1"}, enabled=False)
        execute(db, "UPDATE syncworker.integrations SET enabled = true WHERE name = 'off'")
        execute(db, "UPDATE syncworker.integrations SET config = '{}' WHERE name = 'now'")  # not a wake-up
        payloads = [json.loads(n.payload) for n in listener.notifies(timeout=1)]
    assert len(payloads) == 3
    assert payloads[0]["due_in"] <= 0 and payloads[1]["due_in"] > 1e9 and payloads[2]["due_in"] <= 0


def test_reenabling_clears_the_reason_and_the_retry_count(db: str) -> None:
    add_job(
        db,
        "x",
        "sql",
        {"statement": "select 1"},
        enabled=False,
        retry_count=3,
        disabled_reason="disabled after 3 failures in a row",
    )
    execute(db, "UPDATE syncworker.integrations SET enabled = true")
    job = rows(db, "SELECT retry_count, disabled_reason FROM syncworker.integrations")[0]
    assert job == {"retry_count": 0, "disabled_reason": None}


def test_status_view_health_words(db: str) -> None:
    add_job(db, "fresh", "sql", {"statement": "select 1"})
    add_job(db, "off", "sql", {"statement": "select 1"}, enabled=False)
    add_job(db, "failing", "sql", {"statement": "select 1"}, retry_count=1, last_status="failed")
    add_job(db, "late", "sql", {"statement": "select 1"}, last_status="success", next_sync_at="2000-01-01")
    add_job(db, "fine", "sql", {"statement": "select 1"}, last_status="success", next_sync_at="2099-01-01")
    add_job(db, "meh", "sql", {"statement": "select 1"}, last_status="partial", next_sync_at="2099-01-01")
    health = {r["name"]: r["health"] for r in rows(db, "SELECT name, health FROM syncworker.status")}
    assert health == {
        "fresh": "pending",
        "off": "disabled",
        "failing": "failing",
        "late": "late",
        "fine": "ok",
        "meh": "degraded",
    }


def test_claim_query_uses_the_due_index(db: str) -> None:
    execute(
        db,
        """INSERT INTO syncworker.integrations (name, kind, next_sync_at)
                   SELECT 'j' || g, 'sql', now() + g * interval '1 minute' FROM generate_series(1, 5000) g;
                   ANALYZE syncworker.integrations""",
    )
    plan = "\n".join(
        r["QUERY PLAN"]
        for r in rows(
            db,
            """EXPLAIN SELECT id FROM syncworker.integrations
        WHERE enabled AND running_run_id IS NULL AND next_sync_at <= now()
        ORDER BY next_sync_at, id LIMIT 4 FOR UPDATE SKIP LOCKED""",
        )
    )
    assert "integrations_due_idx" in plan
