"""The command line: readable output, one clear line and a non-zero exit for expected failures."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from typing import Any
from urllib.parse import urlsplit

import pytest

from helpers import ROOT, TESTS, add_job, execute, one
from worker.run.once import run_once


def cli(
    url: str | None, *args: str, env: dict[str, str] | None = None, stdin: Any = subprocess.DEVNULL
) -> subprocess.CompletedProcess[str]:
    """`syncworker ARGS` with SYNCWORKER_DATABASE_URL=url, no other database variable, and `env` on top."""
    full = {
        k: v for k, v in os.environ.items() if not k.startswith(("SYNCWORKER_", "PG")) and k != "DATABASE_URL"
    }
    full["PYTHONPATH"] = str(TESTS)
    full["SYNCWORKER_ALLOW_SUPERUSER_JOBS"] = "1"  # as helpers.worker_env: the tests connect as postgres
    full["SYNCWORKER_PYTHON_MODULES"] = "jobs"  # as helpers.worker_env: tests/jobs.py
    if url is not None:
        full["SYNCWORKER_DATABASE_URL"] = url
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        env=full,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=stdin,
    )


def libpq_env(url: str) -> dict[str, str]:
    """PG* variables naming the database of `url`, for runs where no URL variable is set."""
    parts = urlsplit(url)
    return {
        "PGHOST": parts.hostname or "127.0.0.1",
        "PGPORT": str(parts.port or 5432),
        "PGUSER": parts.username or "postgres",
        "PGDATABASE": parts.path.lstrip("/"),
    }


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
    add_job(jobdb, "badimport", "python", {"callable": "jobs.missing:run"})
    result = cli(jobdb, "check")
    assert result.returncode == 1
    out = result.stdout.partition("environment:\n")[0].splitlines()  # the rows, before that section
    assert len(out) == 2
    assert out[0].startswith("nostatement: query: unknown setting")
    assert out[1].startswith('typo: kind: unknown kind "sqll"')
    # A module this shell cannot import may well be on the worker's path: a warning.
    assert (
        "warning: badimport: cannot be checked from this shell (callable: cannot load jobs.missing:run"
        in (result.stderr)
    )
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


def test_version() -> None:
    result = cli(None, "--version")
    assert result.returncode == 0
    assert result.stdout.strip().startswith("syncworker ") and result.stdout.strip()[-1].isdigit()


# -- database errors: one line, by class, hints kept -----------------------------------------------


def test_trigger_on_a_disabled_job_gives_the_reason_and_the_hint(jobdb: str) -> None:
    add_job(jobdb, "off", "sql", {"statement": "select 1"}, enabled=False)
    execute(jobdb, "UPDATE syncworker.integrations SET disabled_reason = '4 failures in a row'")
    result = cli(jobdb, "trigger", "off")
    assert_one_line_error(result, 'integration "off" is disabled (4 failures in a row)')
    assert "cannot connect" not in result.stderr
    assert (
        "hint: Re-enable it first: UPDATE syncworker.integrations SET enabled = true WHERE name = 'off';"
        in result.stderr
    )


def test_trigger_on_an_unknown_name_keeps_the_hint(jobdb: str) -> None:
    result = cli(jobdb, "trigger", "zzz")
    assert_one_line_error(result, 'no integration named "zzz"')
    assert "hint: SELECT name FROM syncworker.integrations lists the names." in result.stderr


def _http_job(url: str, name: str, **config: Any) -> None:
    add_job(
        url,
        name,
        "http",
        {
            "url": "http://127.0.0.1:9/items",
            "records_path": "",
            "destination": {
                "table": "public.api_items",
                "key": ["id"],
                "create_table": True,
                "columns": {"id": "bigint"},
            },
            **config,
        },
    )


def test_dry_run_with_an_unset_secret_is_one_line(jobdb: str) -> None:
    _http_job(jobdb, "api", auth={"type": "bearer", "token": {"env": "SWTEST_UNSET_TOKEN"}})
    result = cli(jobdb, "run-once", "api", "--dry-run")
    assert_one_line_error(result, "api: this shell cannot run it")
    assert "SWTEST_UNSET_TOKEN" in result.stderr


def test_dry_run_with_an_open_circuit_breaker_is_one_line(jobdb: str) -> None:
    _http_job(jobdb, "api")
    execute(
        jobdb,
        "INSERT INTO syncworker.circuit_breakers (host, state, consecutive_failures, opened_at, last_error)"
        " VALUES ('127.0.0.1:9', 'open', 5, now(), 'HTTP 503')",
    )
    result = cli(jobdb, "run-once", "api", "--dry-run")
    assert_one_line_error(result, "dry run of api failed: circuit_open")


# -- which database ------------------------------------------------------------------------------


def test_every_report_names_the_database_and_how_it_was_chosen(jobdb: str) -> None:
    add_job(jobdb, "ticks", "sql", {"statement": "select 1"})
    where = "127.0.0.1:5432/" + urlsplit(jobdb).path.lstrip("/")
    for result, how in [
        (cli(jobdb, "status"), "from SYNCWORKER_DATABASE_URL"),
        (cli(None, "status", env={"DATABASE_URL": jobdb}), "from DATABASE_URL"),
        (cli("postgresql://127.0.0.1:1/nodb", "status", "--database-url", jobdb), "from --database-url"),
        (cli(None, "status", env=libpq_env(jobdb)), "libpq defaults"),
        (cli(jobdb, "trigger", "ticks"), "from SYNCWORKER_DATABASE_URL"),
        (cli(jobdb, "history", "ticks"), "from SYNCWORKER_DATABASE_URL"),
        (cli(jobdb, "errors"), "from SYNCWORKER_DATABASE_URL"),
        (cli(jobdb, "check"), "from SYNCWORKER_DATABASE_URL"),
        (cli(jobdb, "migrate"), "from SYNCWORKER_DATABASE_URL"),
    ]:
        assert result.returncode == 0, result.stderr
        assert f"{where} ({how}" in result.stdout + result.stderr, (how, result.stdout, result.stderr)
    failed = cli(None, "trigger", "ghost", env=libpq_env(jobdb))
    assert_one_line_error(failed, 'no integration named "ghost"')
    assert f"{where} (libpq defaults" in failed.stderr and "PGDATABASE" in failed.stderr


def test_an_unnamed_database_is_never_migrated_unasked(empty_db: str) -> None:
    env = libpq_env(empty_db)
    name = env["PGDATABASE"]

    def has_schema() -> bool:
        return bool(one(empty_db, "SELECT to_regnamespace('syncworker') IS NOT NULL"))

    status = cli(None, "status", env=env)
    assert_one_line_error(status, f"no syncworker schema in 127.0.0.1:5432/{name} (libpq defaults")
    assert "--database-url" in status.stderr

    refused = cli(None, "migrate", env=env)  # no TTY
    assert_one_line_error(refused, "--yes")
    assert name in refused.stderr and not has_schema()

    import pty

    for answer, migrated in ((b"n\n", False), (b"y\n", True)):
        leader, follower = pty.openpty()
        try:
            os.write(leader, answer)
            asked = cli(None, "migrate", env=env, stdin=follower)
        finally:
            os.close(follower)
            os.close(leader)
        assert f"127.0.0.1:5432/{name}" in asked.stderr
        assert (asked.returncode == 0) is migrated, asked.stderr
        assert has_schema() is migrated
        assert "Traceback" not in asked.stderr


def test_migrate_yes_migrates_an_unnamed_database(empty_db: str) -> None:
    result = cli(None, "migrate", "--yes", env=libpq_env(empty_db))
    assert result.returncode == 0, result.stderr
    assert one(empty_db, "SELECT to_regnamespace('syncworker') IS NOT NULL")


@pytest.mark.parametrize("driver", ["+psycopg", "+psycopg2", "+asyncpg"])
def test_sqlalchemy_style_urls_are_accepted(jobdb: str, driver: str) -> None:
    add_job(jobdb, "ticks", "sql", {"statement": "INSERT INTO public.ticks DEFAULT VALUES"})
    url = jobdb.replace("postgresql://", f"postgresql{driver}://")
    for result in [
        cli(url, "status"),
        cli(None, "status", env={"DATABASE_URL": url}),
        cli(None, "--database-url", url, "status"),
        cli(url, "migrate"),
        cli(url, "run-once", "ticks"),
    ]:
        assert result.returncode == 0, result.stderr
    assert one(jobdb, "SELECT count(*) FROM public.ticks") == 1


def test_database_url_before_or_after_the_command(jobdb: str) -> None:
    add_job(jobdb, "ticks", "sql", {"statement": "select 1"})
    unreachable = "postgresql://127.0.0.1:1/nodb"
    for args in (["--database-url", jobdb, "status"], ["status", "--database-url", jobdb]):
        result = cli(unreachable, *args)
        assert result.returncode == 0 and "ticks" in result.stdout, result.stderr
    assert cli(None, "--database-url", jobdb, "trigger", "ticks").returncode == 0


@pytest.mark.parametrize(
    "args",
    [
        ["status"],
        ["status", "--json"],
        ["trigger", "x"],
        ["history", "x"],
        ["errors"],
        ["errors", "x"],
        ["check"],
        ["run-once", "x"],
        ["run-once", "x", "--dry-run"],
        ["install-trigger", "x"],
        ["verify", "x"],
        ["drop-slot", "x"],
        ["run"],
    ],
)
def test_every_command_on_an_unmigrated_database_says_to_migrate(empty_db: str, args: list[str]) -> None:
    name = urlsplit(empty_db).path.lstrip("/")
    assert_one_line_error(
        cli(empty_db, *args),
        f"syncworker: error: no syncworker schema in 127.0.0.1:5432/{name} (from SYNCWORKER_DATABASE_URL):"
        " run `syncworker migrate` first",
    )


# -- status ----------------------------------------------------------------------------------


def _status_jobs(url: str) -> None:
    later = "now() + interval '1 hour'"
    for name, columns, when in [
        ("alpha", {"last_status": "success"}, later),
        ("bravo", {}, later),
        ("charlie", {"enabled": False}, "now() + interval '9 minutes'"),
        ("delta", {"last_status": "failed", "retry_count": 1}, later),
        ("echo", {"last_status": "success"}, "now() - interval '1 hour'"),
        ("foxtrot", {"last_status": "partial"}, later),
    ]:
        add_job(url, name, "sql", {"statement": "select 1"}, interval_seconds=600, **columns)
        execute(url, f"UPDATE syncworker.integrations SET next_sync_at = {when} WHERE name = %s", [name])


WORST_FIRST = [
    ("charlie", "disabled"),
    ("delta", "failing"),
    ("echo", "late"),
    ("foxtrot", "degraded"),
    ("bravo", "pending"),
    ("alpha", "ok"),
]


def test_status_puts_the_worst_first_and_no_next_run_on_disabled_jobs(jobdb: str) -> None:
    _status_jobs(jobdb)
    result = cli(jobdb, "status")
    assert result.returncode == 0, result.stderr
    header, *lines = result.stdout.splitlines()
    assert [tuple(line.split()[::2][:2]) for line in lines] == WORST_FIRST
    start = header.index("NEXT RUN")
    end = header.index("RETRIES")
    next_runs = {line.split()[0]: line[start:end].strip() for line in lines}
    assert next_runs["charlie"] == "-"
    assert next_runs["echo"] == "due now" and next_runs["alpha"].startswith("in ")


def test_status_json_has_numbers_and_iso_times(jobdb: str) -> None:
    import json
    from datetime import datetime

    _status_jobs(jobdb)
    add_job(jobdb, "ran", "sql", {"statement": "INSERT INTO public.ticks DEFAULT VALUES"})
    asyncio.run(run_once(jobdb, "ran"))
    result = cli(jobdb, "status", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [(r["name"], r["health"]) for r in rows] == [*WORST_FIRST[:5], ("alpha", "ok"), ("ran", "ok")]
    ran = rows[-1]
    for key in ("success_rate_24h", "mean_duration_ms_24h", "runs_24h", "retry_count", "unresolved_errors"):
        assert isinstance(ran[key], int | float) and not isinstance(ran[key], bool), (key, ran[key])
    assert ran["success_rate_24h"] == 1 and ran["runs_24h"] == 1
    assert datetime.fromisoformat(ran["last_sync_at"]).tzinfo is not None
    assert rows[0]["success_rate_24h"] is None


def _untouched(url: str, name: str) -> dict[str, Any]:
    found = one(
        url,
        "SELECT json_build_object('enabled', enabled, 'retry_count', retry_count, 'last_status', last_status,"
        " 'runs', (SELECT count(*) FROM syncworker.sync_runs r WHERE r.integration_id = i.id))"
        " FROM syncworker.integrations i WHERE name = %s",
        (name,),
    )
    assert found == {"enabled": True, "retry_count": 0, "last_status": None, "runs": 0}, found
    return dict(found)


def test_run_once_and_check_from_a_shell_without_the_workers_environment_leave_the_job_alone(
    jobdb: str,
) -> None:
    # The worker has tests/ on its path and SHOP_DSN set; this shell has neither.
    add_job(jobdb, "py", "python", {"callable": "jobs:count_up"}, interval_seconds=3600)
    add_job(
        jobdb, "remote", "sql", {"statement": "SELECT 1", "dsn": {"env": "SHOP_DSN"}}, interval_seconds=3600
    )
    shell = {"PYTHONPATH": ""}
    for name, missing in (("py", "jobs"), ("remote", "SHOP_DSN")):
        for args in (["run-once", name], ["run-once", name, "--dry-run"]):
            result = cli(jobdb, *args, env=shell)
            assert result.returncode == 1, result
            assert "this shell cannot run it" in result.stderr and missing in result.stderr, result.stderr
            assert "Traceback" not in result.stderr
            _untouched(jobdb, name)
    result = cli(jobdb, "check", env=shell)
    assert result.returncode == 0, result
    assert "warning: py: cannot be checked from this shell" in result.stderr
    assert "warning: remote: cannot be checked from this shell" in result.stderr
    # The worker's own environment runs them (and check agrees).
    assert cli(jobdb, "check", env={"SHOP_DSN": jobdb}).returncode == 0
    assert cli(jobdb, "run-once", "py").returncode == 0
    assert one(jobdb, "SELECT last_status FROM syncworker.integrations WHERE name = 'py'") == "success"


def test_check_reports_rows_that_would_crash_a_parser_without_a_traceback(jobdb: str) -> None:
    add_job(jobdb, "nulls", "sql", {"statement": None}, interval_seconds=60)
    add_job(jobdb, "badurl", "http", {"url": "http://[::1"}, interval_seconds=60)
    add_job(jobdb, "pg-null", "postgres", {"source": None}, interval_seconds=60)
    result = cli(jobdb, "check")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result
    lines = sorted(result.stdout.partition("environment:\n")[0].strip().splitlines())
    assert [line.split(":")[0] for line in lines] == ["badurl", "nulls", "pg-null"]
    assert "statement: expected" in result.stdout and "got null" in result.stdout
