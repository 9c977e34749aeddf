"""A worker connecting as its own login, granted only syncworker_runner (sql/grants.sql),
runs jobs and leads.

The login is cluster-wide, so it gets a unique name with the test databases' prefix and is
dropped at the end whatever happens (the group roles are shared and stay).
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from helpers import ADMIN_URL, ROOT, add_job, db_prefix, execute, one, wait_for, worker_env, workers
from worker.db.migrate import EXIT_SCHEMA

pytestmark = pytest.mark.e2e


def as_role(url: str, role: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    return urlunsplit(parts._replace(netloc=f"{role}@{host}:{parts.port or 5432}"))


@pytest.fixture
def worker_role(jobdb: str) -> Iterator[str]:
    role = f"{db_prefix()}worker_{uuid.uuid4().hex[:10]}"
    execute(ADMIN_URL, f'CREATE ROLE "{role}" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE')
    try:
        yield role
    finally:
        with psycopg.connect(jobdb, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", [role])
            conn.execute(f'DROP OWNED BY "{role}"')  # its privileges in this database
        execute(ADMIN_URL, f'DROP ROLE "{role}"')


def grant(url: str, role: str, *variables: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "psql",
            url,
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-v",
            f"worker_role={role}",
            *variables,
            "-f",
            "sql/grants.sql",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )


def counter(url: str) -> int:
    return int(one(url, "SELECT (state->>'n')::int FROM syncworker.integrations WHERE name = 'counter'") or 0)


def test_a_worker_role_with_only_the_granted_privileges_runs_jobs(
    jobdb: str, worker_role: str, tmp_path: Path
) -> None:
    role_url = as_role(jobdb, worker_role)
    # Without the grants the worker says what is missing, and systemd would not restart it.
    refused = subprocess.run(
        [sys.executable, "-m", "worker", "run"],
        env=worker_env(role_url),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == EXIT_SCHEMA, refused.stderr
    assert "sql/grants.sql" in refused.stderr and "Traceback" not in refused.stderr

    result = grant(jobdb, worker_role)
    assert result.returncode == 0, result.stderr
    assert f'granted syncworker_runner to "{worker_role}"' in result.stdout
    assert one(jobdb, "SELECT pg_has_role(%s, 'syncworker_runner', 'MEMBER')", [worker_role]) is True
    # What a later migration creates is covered too (default privileges of the migrating role).
    execute(jobdb, "CREATE TABLE syncworker.added_later (id int)")
    assert one(role_url, "SELECT count(*) FROM syncworker.added_later") == 0
    execute(jobdb, "DROP TABLE syncworker.added_later")
    # A job's own tables are the job's business, granted separately.
    execute(jobdb, f'GRANT INSERT ON public.ticks TO "{worker_role}"')
    execute(jobdb, f'GRANT USAGE ON SEQUENCE public.ticks_id_seq TO "{worker_role}"')

    add_job(
        jobdb, "ticks", "sql", {"statement": "INSERT INTO public.ticks DEFAULT VALUES"}, interval_seconds=1
    )
    add_job(jobdb, "counter", "python", {"callable": "jobs:count_up"}, interval_seconds=1)
    with workers(role_url, tmp_path) as (proc,):
        wait_for(lambda: (one(jobdb, "SELECT count(*) FROM public.ticks") or 0) >= 3, 30, what="sql job")
        wait_for(lambda: counter(jobdb) >= 2, 30, what="python job")
        assert one(jobdb, "SELECT leader FROM syncworker.workers WHERE pid = %s", [proc.pid]) is True
        assert one(role_url, "SELECT syncworker.trigger_sync('ticks')") in ("queued", "running")
        assert proc.terminate() == 0
        output = proc.output()
    assert "permission denied" not in output and "Traceback" not in output, output
    assert one(jobdb, "SELECT count(*) FROM syncworker.sync_runs WHERE status <> 'success'") == 0
    assert one(jobdb, "SELECT stopped_at IS NOT NULL FROM syncworker.workers WHERE pid = %s", [proc.pid])


def test_grants_sql_refuses_what_it_cannot_grant(jobdb: str, worker_role: str) -> None:
    unknown = grant(jobdb, worker_role, "-v", "grant=pg_read_server_files")
    assert unknown.returncode == 0 and "nothing was granted" in unknown.stdout
    missing = grant(jobdb, f"{worker_role}_nobody")
    assert "does not exist: create it first" in missing.stdout
    assert one(jobdb, "SELECT pg_has_role(%s, 'pg_read_server_files', 'MEMBER')", [worker_role]) is False
    operator = grant(jobdb, worker_role, "-v", "grant=syncworker_operator")
    assert f'granted syncworker_operator to "{worker_role}"' in operator.stdout, operator.stderr
    assert one(jobdb, "SELECT pg_has_role(%s, 'syncworker_runner', 'MEMBER')", [worker_role]) is False


def test_a_role_may_terminate_its_own_sessions(jobdb: str, worker_role: str) -> None:
    # What the rescuer does to the sessions a dead replica left behind: no superuser needed
    # when every replica connects as the same role.
    role_url = as_role(jobdb, worker_role)
    with psycopg.connect(role_url, autocommit=True) as leftover:
        pid = leftover.info.backend_pid
        assert one(role_url, "SELECT pg_terminate_backend(%s)", [pid]) is True
        wait_for(lambda: not _alive(leftover), 10, what="the session to end")
    with (
        psycopg.connect(jobdb, autocommit=True) as other_role,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        execute(role_url, "SELECT pg_terminate_backend(%s)", [other_role.info.backend_pid])


def _alive(conn: psycopg.Connection[tuple[object, ...]]) -> bool:
    try:
        conn.execute("SELECT 1")
    except psycopg.OperationalError:
        return False
    return True
