"""Every file in sql/ runs as written against a migrated database."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from helpers import ROOT, execute, one

FILES = sorted((ROOT / "sql").glob("*.sql"))


def test_there_is_a_cookbook() -> None:
    names = {f.name for f in FILES}
    assert {
        "status.sql",
        "failing.sql",
        "late.sql",
        "durations.sql",
        "errors_by_type.sql",
        "reenable.sql",
    } <= names
    assert {f"add_{kind}_job.sql" for kind in ("sql", "python", "http", "postgres", "redis")} <= names


@pytest.mark.parametrize("path", FILES, ids=[f.name for f in FILES])
def test_file_runs(db: str, path: object) -> None:
    # The examples refer to these tables of an imaginary application.
    execute(db, "CREATE TABLE public.orders (id bigint PRIMARY KEY, updated_at timestamptz)")
    for example in sorted((ROOT / "sql").glob("add_*.sql")):
        if example != path:
            subprocess.run(
                ["psql", db, "-v", "ON_ERROR_STOP=1", "-q", "-f", str(example)],
                check=True,
                capture_output=True,
            )
    result = subprocess.run(
        ["psql", db, "-v", "ON_ERROR_STOP=1", "-q", "-f", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_examples_add_one_job_of_each_kind(db: str) -> None:
    for example in sorted((ROOT / "sql").glob("add_*.sql")):
        subprocess.run(["psql", db, "-v", "ON_ERROR_STOP=1", "-q", "-f", str(example)], check=True)
    kinds = one(db, "SELECT array_agg(DISTINCT kind ORDER BY kind) FROM syncworker.integrations")
    assert kinds == ["http", "postgres", "python", "redis", "sql"]


# Examples whose purpose is to write: adding jobs, triggering, re-enabling, installing a trigger.
WRITE_EXAMPLES = {"trigger.sql", "reenable.sql", "realtime_trigger.sql"}
READ_FILES = [f for f in FILES if not f.name.startswith("add_") and f.name not in WRITE_EXAMPLES]


def psql(db: str, path: object, *, read_only: bool = False) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if read_only:
        env["PGOPTIONS"] = "-c default_transaction_read_only=on"
    return subprocess.run(
        ["psql", db, "-X", "-v", "ON_ERROR_STOP=1", "-f", str(path)],
        capture_output=True,
        text=True,
        env=env,
    )


def test_the_reading_files_are_the_rest() -> None:
    assert {f.name for f in READ_FILES} >= {"status.sql", "late.sql", "http_limits.sql", "errors_by_type.sql"}


@pytest.mark.parametrize("path", READ_FILES, ids=[f.name for f in READ_FILES])
def test_reading_files_write_nothing(db: str, path: object) -> None:
    # Something to read: one job of each kind, runs, an error, an open breaker.
    execute(db, "CREATE TABLE public.orders (id bigint PRIMARY KEY, updated_at timestamptz)")
    for example in sorted((ROOT / "sql").glob("add_*.sql")):
        assert psql(db, example).returncode == 0
    execute(
        db,
        """
        INSERT INTO syncworker.sync_runs (integration_id, status, started_at, finished_at, duration_ms)
        SELECT id, 'failed', now() - interval '1 minute', now(), 1234 FROM syncworker.integrations;
        INSERT INTO syncworker.sync_errors (integration_id, error_type, message)
        SELECT id, 'upstream_http', 'HTTP 503' FROM syncworker.integrations;
        INSERT INTO syncworker.circuit_breakers (host, state, consecutive_failures, opened_at)
        VALUES ('api.example.com', 'open', 5, now());
        """,
    )
    # Every statement of the file runs in a read-only transaction: a write would fail.
    result = psql(db, path, read_only=True)
    assert result.returncode == 0, result.stderr
    tags = re.findall(r"^(?:UPDATE|INSERT|DELETE|MERGE|COPY)\b.*$", result.stdout, re.M)
    assert tags == [], result.stdout


def test_durations_are_whole_milliseconds(db: str) -> None:
    execute(db, "INSERT INTO syncworker.integrations (name, kind, config) VALUES ('job', 'sql', '{}')")
    execute(
        db,
        "INSERT INTO syncworker.sync_runs (integration_id, status, finished_at, duration_ms)"
        " SELECT 1, 'success', now(), d FROM unnest(ARRAY[6001, 6322, 6400, 6450]) AS d",
    )
    out = subprocess.run(
        [
            "psql",
            db,
            "-X",
            "-A",
            "-t",
            "-F",
            "|",
            "-v",
            "ON_ERROR_STOP=1",
            "-f",
            str(ROOT / "sql/durations.sql"),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    name, runs, mean_ms, p50, p95, max_ms, _ = out.split("|")
    assert (name, runs, max_ms) == ("job", "4", "6450")
    for value in (mean_ms, p50, p95):
        assert value.isdigit(), out


@pytest.mark.parametrize(("minutes", "late"), [(3, False), (7, True)])
def test_late_agrees_with_the_late_health_word(db: str, minutes: int, late: bool) -> None:
    execute(
        db,
        "INSERT INTO syncworker.integrations (name, kind, config, interval_seconds, next_sync_at)"
        " VALUES ('job', 'sql', '{}', 3600, now() - make_interval(mins => %s))",
        [minutes],
    )
    assert (one(db, "SELECT health FROM syncworker.status") == "late") is late
    listed = subprocess.run(
        ["psql", db, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-f", str(ROOT / "sql/late.sql")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert ("job|" in listed) is late, listed
