"""Operator commands: pause, resume, enable, disable, resolve, runs, status --watch, --json on reads."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

from test_cli import assert_one_line_error, cli

from helpers import ROOT, TESTS, add_job, execute, one, rows
from worker.run.once import run_once


def health(url: str, name: str) -> str:
    return str(one(url, "SELECT health FROM syncworker.status WHERE name = %s", [name]))


def test_pause_keeps_the_schedule_and_resume_continues_it(jobdb: str) -> None:
    add_job(jobdb, "ticks", "sql", {"statement": "select 1"}, interval_seconds=300)
    execute(jobdb, "UPDATE syncworker.integrations SET next_sync_at = now() + interval '2 minutes'")
    slot = one(jobdb, "SELECT next_sync_at FROM syncworker.integrations")

    result = cli(jobdb, "pause", "ticks", "--reason", "upstream maintenance")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ticks: paused"
    assert health(jobdb, "ticks") == "paused"
    job = rows(jobdb, "SELECT enabled, disabled_reason, next_sync_at FROM syncworker.integrations")[0]
    assert job == {"enabled": False, "disabled_reason": "paused: upstream maintenance", "next_sync_at": slot}
    assert cli(jobdb, "pause", "ticks").stdout.strip() == "ticks: already paused"

    status = json.loads(cli(jobdb, "status", "--json").stdout)
    assert status[0]["health"] == "paused" and status[0]["problem"] == "paused: upstream maintenance"

    result = cli(jobdb, "resume", "ticks")
    assert result.returncode == 0 and result.stdout.strip() == "ticks: resumed"
    job = rows(jobdb, "SELECT enabled, disabled_reason, paused_at, next_sync_at FROM syncworker.integrations")
    job = job[0]
    assert job == {"enabled": True, "disabled_reason": None, "paused_at": None, "next_sync_at": slot}
    assert health(jobdb, "ticks") == "pending"
    assert cli(jobdb, "resume", "ticks").stdout.strip() == "ticks: not paused"


def test_the_same_writes_through_sql(jobdb: str) -> None:
    add_job(jobdb, "ticks", "sql", {"statement": "select 1"}, interval_seconds=300)
    assert one(jobdb, "SELECT syncworker.pause_job('ticks')") == "paused"
    assert health(jobdb, "ticks") == "paused"
    assert one(jobdb, "SELECT syncworker.enable_job('ticks')") == "enabled"
    assert health(jobdb, "ticks") == "pending"


def test_disable_needs_a_reason_and_enable_undoes_it(jobdb: str) -> None:
    add_job(jobdb, "ticks", "sql", {"statement": "select 1"}, interval_seconds=300)
    assert_one_line_error(cli(jobdb, "disable", "ticks"), "the following arguments are required: --reason")
    blank = cli(jobdb, "disable", "ticks", "--reason", "  ")
    assert_one_line_error(blank, 'disabling "ticks" needs a reason')

    result = cli(jobdb, "disable", "ticks", "--reason", "source retired")
    assert result.returncode == 0 and result.stdout.strip() == "ticks: disabled"
    assert health(jobdb, "ticks") == "disabled"
    assert one(jobdb, "SELECT disabled_reason FROM syncworker.integrations") == "source retired"

    # A disabled job is not paused: resume says so and points at enable.
    refused = cli(jobdb, "resume", "ticks")
    assert_one_line_error(refused, 'integration "ticks" is disabled (source retired), not paused')
    assert "syncworker.enable_job('ticks')" in refused.stderr
    assert_one_line_error(cli(jobdb, "pause", "ticks"), "nothing to pause")

    execute(jobdb, "UPDATE syncworker.integrations SET retry_count = 3")
    result = cli(jobdb, "enable", "ticks")
    assert result.returncode == 0 and result.stdout.strip() == "ticks: enabled"
    job = rows(jobdb, "SELECT enabled, disabled_reason, retry_count FROM syncworker.integrations")[0]
    assert job == {"enabled": True, "disabled_reason": None, "retry_count": 0}
    assert cli(jobdb, "enable", "ticks").stdout.strip() == "ticks: already enabled"


def test_a_paused_job_the_worker_disables_shows_disabled(jobdb: str) -> None:
    add_job(jobdb, "ticks", "sql", {"statement": "select 1"}, interval_seconds=300)
    cli(jobdb, "pause", "ticks")
    # What finish_run does when the last retry fails: a reason of its own.
    execute(jobdb, "UPDATE syncworker.integrations SET disabled_reason = '4 failures in a row'")
    assert health(jobdb, "ticks") == "disabled"
    assert_one_line_error(cli(jobdb, "resume", "ticks"), "not paused")


def test_resolve_marks_errors_by_type(jobdb: str) -> None:
    job = add_job(jobdb, "orders", "python", {"callable": "jobs:some_records_fail"}, interval_seconds=300)
    asyncio.run(run_once(jobdb, "orders"))
    execute(
        jobdb,
        "INSERT INTO syncworker.sync_errors (integration_id, error_type, message) "
        "VALUES (%s, 'timeout', 'slow')",
        [job],
    )
    unresolved = "SELECT count(*) FROM syncworker.sync_errors WHERE NOT resolved"
    before = one(jobdb, unresolved)
    assert before >= 2

    result = cli(jobdb, "resolve", "orders", "--type", "timeout")
    assert result.returncode == 0 and result.stdout.strip() == "orders: 1 timeout error marked resolved"
    assert one(jobdb, unresolved) == before - 1

    result = cli(jobdb, "resolve", "orders")
    assert result.stdout.strip() == f"orders: {before - 1} errors marked resolved"
    assert one(jobdb, unresolved) == 0
    assert cli(jobdb, "errors", "orders").stdout.strip() == "no unresolved errors"


def test_unknown_names_are_one_line(jobdb: str) -> None:
    for args in (["pause", "x"], ["resume", "x"], ["enable", "x"], ["disable", "x", "--reason", "r"]):
        result = cli(jobdb, *args)
        assert_one_line_error(result, 'no integration named "x"')
    assert_one_line_error(cli(jobdb, "resolve", "x"), 'no integration named "x"')


def test_runs_and_json_reads_print_numbers_as_numbers(jobdb: str) -> None:
    job = add_job(jobdb, "orders", "python", {"callable": "jobs:some_records_fail"}, interval_seconds=300)
    add_job(jobdb, "ticks", "sql", {"statement": "select 1"}, interval_seconds=300)
    asyncio.run(run_once(jobdb, "orders"))
    # A run in progress, by hand: what a worker's claim leaves.
    run = one(
        jobdb,
        "INSERT INTO syncworker.sync_runs (integration_id, started_at) "
        "VALUES (%s, now() - interval '2 hours') RETURNING id",
        [job],
    )

    table = cli(jobdb, "runs", "--running")
    assert table.returncode == 0, table.stderr
    header, *lines = table.stdout.splitlines()
    assert header.split()[:3] == ["RUN", "INTEGRATION", "STATUS"]
    assert len(lines) == 1 and lines[0].split()[:3] == [str(run), "orders", "running"]
    assert "past its timeout" in lines[0]

    running = json.loads(cli(jobdb, "runs", "--running", "--json").stdout)
    assert [r["id"] for r in running] == [run]
    assert running[0]["past_timeout"] is True
    assert isinstance(running[0]["duration_ms"], int) and running[0]["duration_ms"] >= 7_200_000

    every = json.loads(cli(jobdb, "runs", "--json").stdout)
    assert [r["status"] for r in every] == ["partial", "running"]  # newest first
    assert isinstance(every[0]["records_processed"], int)

    history = json.loads(cli(jobdb, "history", "orders", "--json").stdout)
    assert history[0]["status"] == "partial" and isinstance(history[0]["records_failed"], int)
    errors = json.loads(cli(jobdb, "errors", "--json").stdout)
    assert errors and isinstance(errors[0]["id"], int) and errors[0]["name"] == "orders"

    status = json.loads(cli(jobdb, "status", "--json").stdout)
    assert {r["name"] for r in status} == {"orders", "ticks"}
    orders = next(r for r in status if r["name"] == "orders")
    assert isinstance(orders["runs_24h"], int) and isinstance(orders["success_rate_24h"], int | float)

    assert cli(jobdb, "runs", "--running", "--limit", "1").returncode == 0
    execute(jobdb, "DELETE FROM syncworker.sync_runs WHERE id = %s", [run])
    assert cli(jobdb, "runs", "--running").stdout.strip() == "no run in progress"


def test_status_watch_repeats_until_interrupted(jobdb: str) -> None:
    add_job(jobdb, "ticks", "sql", {"statement": "select 1"}, interval_seconds=300)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNCWORKER_", "PG"))}
    env.update({"SYNCWORKER_DATABASE_URL": jobdb, "PYTHONPATH": str(TESTS)})
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "status", "--watch", "0.2", "--json"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        documents = [json.loads(proc.stdout.readline()) for _ in range(2)]
        execute(jobdb, "SELECT syncworker.pause_job('ticks')")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            latest = json.loads(proc.stdout.readline())
            if latest[0]["health"] == "paused":
                break
        else:
            raise AssertionError("status --watch never showed the paused job")
        assert documents[0][0]["name"] == "ticks"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_watch_interval_is_one_line(jobdb: str) -> None:
    assert_one_line_error(cli(jobdb, "status", "--watch", "0"), "expected between 0.1 and 86400 seconds")


def test_stale_health_and_recovery(jobdb: str) -> None:
    add_job(jobdb, "every-minute", "sql", {"statement": "select 1"}, interval_seconds=60)
    add_job(jobdb, "nightly", "sql", {"statement": "select 1"}, cron="0 3 * * *")
    add_job(jobdb, "by-hand", "sql", {"statement": "select 1"}, next_sync_at=None)
    execute(
        jobdb,
        "UPDATE syncworker.integrations SET created_at = now() - interval '30 days', "
        "last_status = 'success', last_success_at = now() - interval '4 minutes', "
        "next_sync_at = now() + interval '1 minute'",
    )
    stale_after = {
        r["name"]: (r["health"], r["stale_after_seconds"])
        for r in rows(jobdb, "SELECT name, health, stale_after_seconds FROM syncworker.status")
    }
    # 3 x the interval, or the cron's period; no schedule: never stale by default.
    assert stale_after == {"every-minute": ("stale", 180), "nightly": ("ok", 259200), "by-hand": ("ok", None)}

    execute(jobdb, "UPDATE syncworker.integrations SET stale_after_seconds = 120 WHERE name = 'by-hand'")
    assert health(jobdb, "by-hand") == "stale"
    execute(jobdb, "UPDATE syncworker.integrations SET last_success_at = now() - interval '4 days'")
    assert health(jobdb, "nightly") == "stale"
    # A success makes it fresh again.
    execute(jobdb, "UPDATE syncworker.integrations SET last_success_at = now()")
    assert {r["health"] for r in rows(jobdb, "SELECT health FROM syncworker.status")} == {"ok"}
    # stale ranks after failing and before overrunning.
    execute(jobdb, "UPDATE syncworker.integrations SET last_success_at = now() - interval '1 hour'")
    execute(jobdb, "UPDATE syncworker.integrations SET retry_count = 1 WHERE name = 'every-minute'")
    assert health(jobdb, "every-minute") == "failing"
    listed = cli(jobdb, "status").stdout.splitlines()[1:]
    assert [line.split()[0] for line in listed] == ["every-minute", "by-hand", "nightly"]


def test_check_json(jobdb: str) -> None:
    add_job(jobdb, "good", "sql", {"statement": "select 1"})
    add_job(jobdb, "typo", "sqll", {"statement": "select 1"})
    add_job(jobdb, "badimport", "python", {"callable": "jobs_missing:run"})
    result = cli(jobdb, "check", "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["valid"] == 1
    assert [(r["name"], r["problem"].split(":")[0]) for r in report["invalid"]] == [("typo", "kind")]
    assert [r["name"] for r in report["unchecked"]] == ["badimport"]
    execute(jobdb, "DELETE FROM syncworker.integrations WHERE name = 'typo'")
    assert cli(jobdb, "check", "--json").returncode == 0


def test_verify_json(jobdb: str) -> None:
    from helpers import create_database, drop_database

    name, source = create_database()
    try:
        execute(
            source, "CREATE TABLE public.orders (id int PRIMARY KEY, updated_at timestamptz DEFAULT now())"
        )
        execute(source, "INSERT INTO public.orders (id) SELECT generate_series(1, 20)")
        config = {
            "source": {
                "dsn": {"env": "TEST_SOURCE_DSN"},
                "table": "orders",
                "key": "id",
                "updated_at": "updated_at",
            },
            "destination": {"table": "orders_copy", "key": "id", "create_table": True},
        }
        add_job(jobdb, "orders", "postgres", config)
        env = {"TEST_SOURCE_DSN": source}
        os.environ["TEST_SOURCE_DSN"] = source
        try:
            assert asyncio.run(run_once(jobdb, "orders")).status == "success"
        finally:
            del os.environ["TEST_SOURCE_DSN"]
        execute(jobdb, "DELETE FROM public.orders_copy WHERE id = 7")
        result = cli(jobdb, "verify", "orders", "--json", env=env)
        assert result.returncode == 1, result.stderr
        report = json.loads(result.stdout)
        assert report["ok"] is False and report["missing"] == ["7"]
        assert (report["source"]["rows"], report["destination"]["rows"]) == (20, 19)
    finally:
        drop_database(name)
