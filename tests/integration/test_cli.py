"""The command line: readable output, one clear line and a non-zero exit for expected failures."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from helpers import ROOT, TESTS, add_job, one
from worker.oneshot import run_once


def cli(url: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNCWORKER_", "PG"))}
    env["PYTHONPATH"] = str(TESTS)
    if url is not None:
        env["SYNCWORKER_DATABASE_URL"] = url
    return subprocess.run(
        [sys.executable, "-m", "worker", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], text: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and text in lines[0], result.stderr


def test_migrate_creates_the_schema_and_is_idempotent(empty_db: str) -> None:
    for _ in range(2):
        result = cli(empty_db, "migrate")
        assert result.returncode == 0, result.stderr
        assert "schema syncworker is at revision" in result.stdout


def test_status_history_errors_and_trigger(jobdb: str) -> None:
    add_job(jobdb, "orders", "python", {"callable": "jobs:some_records_fail"}, interval_seconds=300)
    add_job(jobdb, "ticks", "sql", {"statement": "INSERT INTO public.ticks DEFAULT VALUES"}, cron="0 3 * * *")
    asyncio.run(run_once(jobdb, "orders"))

    status = cli(jobdb, "status")
    assert status.returncode == 0
    header, *lines = status.stdout.splitlines()
    assert header.split()[:4] == ["NAME", "KIND", "HEALTH", "SCHEDULE"]
    assert lines[0].split()[:5] == ["orders", "python", "degraded", "every", "300s"]
    assert lines[1].split()[:3] == ["ticks", "sql", "pending"]

    history = cli(jobdb, "history", "orders")
    assert history.returncode == 0 and "partial" in history.stdout and "manual" in history.stdout

    errors = cli(jobdb, "errors", "orders")
    assert errors.returncode == 0 and "order-17" in errors.stdout and "missing customer id" in errors.stdout

    trigger = cli(jobdb, "trigger", "ticks")
    assert trigger.returncode == 0 and trigger.stdout.strip() == "ticks: queued"
    assert one(jobdb, "SELECT next_sync_at <= now() FROM syncworker.integrations WHERE name = 'ticks'")


def test_status_json(jobdb: str) -> None:
    add_job(jobdb, "ticks", "sql", {"statement": "select 1"})
    result = cli(jobdb, "status", "--json")
    assert result.returncode == 0 and '"name": "ticks"' in result.stdout


def test_check_lists_every_invalid_row_and_runs_nothing(jobdb: str) -> None:
    add_job(jobdb, "good", "sql", {"statement": "select 1"})
    add_job(jobdb, "typo", "sqll", {"statement": "select 1"})
    add_job(jobdb, "nostatement", "sql", {"query": "select 1"})
    add_job(jobdb, "badimport", "python", {"callable": "jobs_missing:run"})
    result = cli(jobdb, "check")
    assert result.returncode == 1
    out = result.stdout.splitlines()
    assert len(out) == 3
    assert out[0].startswith("badimport: callable: cannot load jobs_missing:run")
    assert out[1].startswith("nostatement: query: unknown setting")
    assert out[2].startswith('typo: kind: unknown kind "sqll"')
    assert one(jobdb, "SELECT count(*) FROM syncworker.sync_runs") == 0


def test_check_passes_when_all_rows_are_valid(jobdb: str) -> None:
    add_job(jobdb, "good", "sql", {"statement": "select 1"})
    result = cli(jobdb, "check")
    assert result.returncode == 0 and "all 1 integrations are valid" in result.stdout


@pytest.mark.parametrize(
    "args", [["trigger", "ghost"], ["history", "ghost"], ["errors", "ghost"], ["run-once", "ghost"]]
)
def test_unknown_name_is_one_line(jobdb: str, args: list[str]) -> None:
    assert_one_line_error(cli(jobdb, *args), 'no integration named "ghost"')


def test_unreachable_database_is_one_line() -> None:
    result = cli("postgresql://nobody:pw-should-not-show@127.0.0.1:1/nodb", "status")
    assert_one_line_error(result, "cannot connect to 127.0.0.1:1/nodb")
    assert "pw-should-not-show" not in result.stderr
    result = cli("postgresql://127.0.0.1:1/nodb", "run")
    assert_one_line_error(result, "cannot connect to 127.0.0.1:1/nodb")


def test_missing_schema_is_one_line(empty_db: str) -> None:
    assert_one_line_error(cli(empty_db, "status"), "run `syncworker migrate` first")
    assert_one_line_error(cli(empty_db, "run"), "run `syncworker migrate` first")


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["run", "--concurrency", "zero"], "--concurrency: expected a positive integer"),
        (["run", "--mode", "leader"], "--mode: expected one of active, single"),
        (["status", "--colour"], "unrecognized arguments: --colour"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["history", "x", "--limit", "-3"], "expected a positive integer"),
    ],
)
def test_bad_flags_are_one_line(jobdb: str, args: list[str], text: str) -> None:
    assert_one_line_error(cli(jobdb, *args), text)


def test_bad_environment_value_is_one_line(jobdb: str) -> None:
    env = {**os.environ, "SYNCWORKER_DATABASE_URL": jobdb, "SYNCWORKER_CONCURRENCY": "lots"}
    result = subprocess.run(
        [sys.executable, "-m", "worker", "run"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert_one_line_error(result, "SYNCWORKER_CONCURRENCY: expected a positive integer, got 'lots'")


def test_run_once_prints_the_outcome(jobdb: str) -> None:
    add_job(jobdb, "ticks", "sql", {"statement": "INSERT INTO public.ticks DEFAULT VALUES"})
    result = cli(jobdb, "run-once", "ticks")
    assert result.returncode == 0 and "ticks: run 1 success" in result.stdout
    dry = cli(jobdb, "run-once", "ticks", "--dry-run")
    assert dry.returncode == 0 and "nothing was written" in dry.stdout
    assert one(jobdb, "SELECT count(*) FROM public.ticks") == 1
