"""Least privilege: the roles `syncworker migrate` creates (runner, operator, admin), `sql` jobs
that run as a role of their own (`run_as`), and the refusal of sql jobs on a superuser's session.

Logins are cluster-wide: each test creates its own with a unique name under the test databases'
prefix and drops it afterwards. The group roles syncworker_runner, syncworker_operator and
syncworker_admin are shared by every database on the server and never dropped.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from helpers import (
    ADMIN_URL,
    ROOT,
    add_job,
    create_database,
    db_prefix,
    drop_database,
    execute,
    one,
    rows,
    wait_for,
    worker_env,
    workers,
)
from worker.run.once import OneShotError, run_once

pytestmark = pytest.mark.e2e


def as_login(url: str, login: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    return urlunsplit(parts._replace(netloc=f"{login}@{host}:{parts.port or 5432}"))


Roles = Callable[..., str]


@pytest.fixture
def roles(jobdb: str) -> Iterator[Roles]:
    """`roles("LOGIN", "syncworker_operator")`: a new role (with LOGIN or NOLOGIN) that is a
    member of the given roles; unique names, all dropped after the test."""
    made: list[str] = []

    def make(option: str = "LOGIN", *member_of: str) -> str:
        name = f"{db_prefix()}role_{uuid.uuid4().hex[:10]}"
        execute(ADMIN_URL, f'CREATE ROLE "{name}" {option} NOSUPERUSER NOCREATEDB NOCREATEROLE')
        made.append(name)
        for group in member_of:
            execute(ADMIN_URL, f'GRANT "{group}" TO "{name}"')
        return name

    try:
        yield make
    finally:
        for name in reversed(made):
            execute(
                ADMIN_URL, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", [name]
            )
            execute(jobdb, f'DROP OWNED BY "{name}"')  # its privileges in this database
            execute(ADMIN_URL, f'DROP ROLE "{name}"')


def refused(url: str, sql: str, params: Any = None) -> str:
    """The message of the permission error `sql` gets as the login of `url`."""
    with pytest.raises(psycopg.errors.InsufficientPrivilege) as err:
        execute(url, sql, params)
    return str(err.value)


def run(url: str, name: str, **options: Any) -> Any:
    return asyncio.run(run_once(url, name, **options))


def last_run(url: str, name: str) -> dict[str, Any]:
    return rows(
        url,
        "SELECT r.status, r.error_type, r.error, i.enabled, i.disabled_reason FROM syncworker.sync_runs r"
        " JOIN syncworker.integrations i ON i.id = r.integration_id WHERE i.name = %s"
        " ORDER BY r.id DESC LIMIT 1",
        [name],
    )[0]


def cli(url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = worker_env(url, **env)
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        env=full,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


# -- the roles ------------------------------------------------------------------------------


def test_an_operator_reads_status_and_runs_jobs_but_cannot_change_them_or_read_their_config(
    jobdb: str, roles: Roles
) -> None:
    add_job(jobdb, "secretive", "sql", {"statement": "SELECT 1"}, interval_seconds=3600, state={"cursor": 7})
    execute(
        jobdb,
        "INSERT INTO syncworker.sync_errors (integration_id, error_type, message)"
        " SELECT id, 'sql_error', 'boom' FROM syncworker.integrations",
    )
    oncall = as_login(jobdb, roles("LOGIN", "syncworker_operator"))

    assert one(oncall, "SELECT health FROM syncworker.status WHERE name = 'secretive'") == "pending"
    for table in ("sync_runs", "sync_errors", "workers", "alerts"):
        assert one(oncall, f"SELECT count(*) >= 0 FROM syncworker.{table}") is True
    assert one(oncall, "SELECT enabled FROM syncworker.integrations WHERE name = 'secretive'") is True
    assert one(oncall, "SELECT syncworker.trigger_sync('secretive')") == "queued"
    assert one(oncall, "SELECT syncworker.pause_job('secretive', 'on-call')") == "paused"
    assert one(oncall, "SELECT syncworker.resume_job('secretive')") == "resumed"
    assert one(oncall, "SELECT syncworker.disable_job('secretive', 'on-call')") == "disabled"
    assert one(oncall, "SELECT syncworker.enable_job('secretive')") == "enabled"
    assert one(oncall, "SELECT syncworker.resolve_errors('secretive')") == 1

    assert "permission denied" in refused(oncall, "SELECT state FROM syncworker.integrations")
    assert "permission denied" in refused(oncall, "SELECT config FROM syncworker.integrations")
    assert "permission denied" in refused(
        oncall, "UPDATE syncworker.integrations SET enabled = false WHERE name = 'secretive'"
    )
    assert "permission denied" in refused(
        oncall, "INSERT INTO syncworker.integrations (name, kind) VALUES ('mine', 'sql')"
    )
    assert "permission denied" in refused(oncall, "UPDATE syncworker.sync_errors SET resolved = false")
    assert "permission denied" in refused(oncall, "SELECT syncworker.abandon_run(1, 'x')")
    # The commands an on-call engineer uses work with these rights alone.
    status = cli(oncall, "status")
    assert status.returncode == 0 and "secretive" in status.stdout, status.stderr
    assert cli(oncall, "trigger", "secretive").returncode == 0
    for command in (["history", "secretive"], ["errors", "secretive"], ["history", "secretive", "--json"]):
        shown = cli(oncall, *command)
        assert shown.returncode == 0 and "permission denied" not in shown.stderr, shown.stderr


def test_an_admin_adds_and_changes_jobs_but_cannot_act_as_the_runner(jobdb: str, roles: Roles) -> None:
    author = as_login(jobdb, roles("LOGIN", "syncworker_admin"))
    execute(
        author,
        "INSERT INTO syncworker.integrations (name, kind, config, cron, timezone)"
        " VALUES ('nightly', 'sql', '{\"statement\": \"SELECT 1\"}', '0 3 * * *', 'Europe/Berlin')",
    )
    execute(author, "UPDATE syncworker.integrations SET state = '{}', interval_seconds = 60, cron = NULL")
    assert one(author, "SELECT syncworker.trigger_sync('nightly')") == "queued"
    assert one(author, "SELECT health FROM syncworker.status") == "pending"

    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        execute(author, "SET ROLE syncworker_runner")
    assert (
        one(jobdb, "SELECT pg_has_role(%s, 'syncworker_runner', 'MEMBER')", [urlsplit(author).username])
        is False
    )
    assert "permission denied" in refused(author, "SELECT syncworker.abandon_run(1, 'x')")
    assert "permission denied" in refused(author, "SELECT syncworker.terminate_session(1)")
    assert "permission denied" in refused(author, "UPDATE syncworker.sync_runs SET status = 'success'")
    assert "permission denied" in refused(
        author,
        "INSERT INTO syncworker.sync_runs (integration_id) SELECT id FROM syncworker.integrations",
    )
    execute(author, "DELETE FROM syncworker.integrations WHERE name = 'nightly'")
    assert one(jobdb, "SELECT count(*) FROM syncworker.integrations") == 0


def test_no_function_is_public_and_every_security_definer_pins_its_search_path(
    jobdb: str, roles: Roles
) -> None:
    stranger = roles("NOLOGIN")
    execute(jobdb, f'GRANT USAGE ON SCHEMA syncworker TO "{stranger}"')
    callable_by_anyone = rows(
        jobdb,
        "SELECT p.oid::regprocedure::text AS f FROM pg_proc p"
        " WHERE p.pronamespace = 'syncworker'::regnamespace AND has_function_privilege(%s, p.oid, 'EXECUTE')",
        [stranger],
    )
    assert callable_by_anyone == []
    definers = rows(
        jobdb,
        "SELECT p.oid::regprocedure::text AS f, p.proconfig FROM pg_proc p"
        " WHERE p.pronamespace = 'syncworker'::regnamespace AND p.prosecdef",
    )
    assert {d["f"] for d in definers} >= {"syncworker.trigger_sync(text)", "syncworker.pause_job(text,text)"}
    for definer in definers:
        assert "search_path=pg_catalog, syncworker, pg_temp" in (definer["proconfig"] or []), definer


@pytest.fixture
def owner_db(roles: Roles) -> Iterator[tuple[str, str]]:
    """A database owned by a login that may not create roles: (its URL as that login, the login)."""
    owner = roles("LOGIN")
    name, url = create_database()
    try:
        execute(ADMIN_URL, f'ALTER DATABASE "{name}" OWNER TO "{owner}"')
        yield as_login(url, owner), owner
    finally:
        execute(url, f'DROP OWNED BY "{owner}"')
        drop_database(name)


def test_a_role_that_may_not_create_roles_migrates_and_is_told_what_to_run(
    owner_db: tuple[str, str], roles: Roles
) -> None:
    url, _owner = owner_db
    done = cli(url, "migrate", "--yes")
    assert done.returncode == 0, done.stderr
    assert "syncworker_runner, syncworker_operator and syncworker_admin are granted" in done.stdout
    oncall = as_login(url, roles("LOGIN", "syncworker_operator"))
    assert one(oncall, "SELECT count(*) FROM syncworker.status") == 0

    # Roles this login cannot create (as if nobody had created them yet): it says what to run.
    missing = f"{db_prefix()}missing_{uuid.uuid4().hex[:8]}"
    execute(
        url,
        "CREATE OR REPLACE FUNCTION syncworker.role_names() RETURNS text[] LANGUAGE sql IMMUTABLE"
        f" AS $$ SELECT ARRAY['{missing}'] $$",
    )
    told = cli(url, "migrate", "--yes")
    assert told.returncode == 0, told.stderr
    assert f"CREATE ROLE {missing} NOLOGIN;" in told.stderr
    assert "SELECT syncworker.setup_roles();" in told.stderr
    assert one(ADMIN_URL, "SELECT count(*) FROM pg_roles WHERE rolname = %s", [missing]) == 0


# -- sql jobs with run_as -------------------------------------------------------------------


@pytest.fixture
def job_role(jobdb: str, roles: Roles) -> str:
    """A NOLOGIN role for jobs: it may write public.job_events, and nothing else of the tests'."""
    role = roles("NOLOGIN")
    execute(jobdb, f'GRANT INSERT, SELECT ON public.job_events TO "{role}"')
    execute(jobdb, f'GRANT USAGE ON SEQUENCE public.job_events_id_seq TO "{role}"')
    return role


def events(url: str) -> list[tuple[str, str]]:
    return [
        (r["integration"], r["event"])
        for r in rows(url, "SELECT integration, event FROM public.job_events ORDER BY id")
    ]


WHO = (
    "INSERT INTO public.job_events (integration, event)"
    " VALUES (%(name)s, current_user || '/' || session_user)"
)


def test_a_run_as_job_runs_as_its_role_and_is_refused_what_the_role_may_not(
    jobdb: str, job_role: str
) -> None:
    add_job(jobdb, "as-role", "sql", {"statement": WHO, "params": {"name": "as-role"}, "run_as": job_role})
    add_job(
        jobdb,
        "forbidden",
        "sql",
        {"statement": "INSERT INTO public.ticks DEFAULT VALUES", "run_as": job_role},
    )
    assert run(jobdb, "as-role").status == "success"
    assert events(jobdb) == [("as-role", f"{job_role}/postgres")]
    assert one(jobdb, "SELECT records_processed FROM syncworker.sync_runs ORDER BY id DESC LIMIT 1") == 1

    assert run(jobdb, "forbidden").status == "failed"
    failed = last_run(jobdb, "forbidden")
    assert failed["error_type"] == "sql_error"
    assert "permission denied for table ticks" in failed["error"]
    assert one(jobdb, "SELECT count(*) FROM public.ticks") == 0


@pytest.mark.parametrize(
    "escape",
    [
        "RESET ROLE; INSERT INTO public.ticks DEFAULT VALUES",
        "SET ROLE postgres; INSERT INTO public.ticks DEFAULT VALUES",
        "SELECT set_config('role', 'postgres', true); INSERT INTO public.ticks DEFAULT VALUES",
        "SET SESSION AUTHORIZATION postgres; INSERT INTO public.ticks DEFAULT VALUES",
        "SET LOCAL ROLE NONE; INSERT INTO public.ticks DEFAULT VALUES",
    ],
)
def test_a_run_as_job_cannot_take_back_the_workers_role(jobdb: str, job_role: str, escape: str) -> None:
    add_job(jobdb, "escape", "sql", {"statement": escape, "run_as": job_role})
    assert run(jobdb, "escape").status == "failed"
    failed = last_run(jobdb, "escape")
    assert failed["error_type"] == "sql_error"
    assert "within security-definer function" in failed["error"]
    assert one(jobdb, "SELECT count(*) FROM public.ticks") == 0


def test_a_run_as_role_that_is_missing_or_not_granted_to_the_login_disables_the_job(
    jobdb: str, roles: Roles, job_role: str
) -> None:
    login = roles("LOGIN", "syncworker_runner")
    as_worker = as_login(jobdb, login)
    add_job(jobdb, "stranger", "sql", {"statement": "SELECT 1", "run_as": job_role})
    add_job(jobdb, "nobody", "sql", {"statement": "SELECT 1", "run_as": f"{job_role}_gone"})
    for name, words in (
        ("stranger", f'is not a member of role "{job_role}": GRANT "{job_role}" TO "{login}"'),
        ("nobody", f'role "{job_role}_gone" does not exist'),
    ):
        assert run(as_worker, name, local_check=False).status == "failed"
        ended = last_run(jobdb, name)
        assert ended["error_type"] == "config_invalid" and words in ended["error"], ended
        assert ended["enabled"] is False and words in ended["disabled_reason"]


def test_a_worker_login_runs_run_as_jobs_and_its_session_is_its_own_again_after_each(
    jobdb: str, roles: Roles, job_role: str, tmp_path: Path
) -> None:
    login = roles("LOGIN", "syncworker_runner", job_role)
    execute(jobdb, f'GRANT INSERT ON public.job_events TO "{login}"')
    execute(jobdb, f'GRANT USAGE ON SEQUENCE public.job_events_id_seq TO "{login}"')
    # One run session (concurrency 1): the jobs take turns on it.
    add_job(
        jobdb,
        "as-role",
        "sql",
        {
            "statement": "CREATE TEMP TABLE left_behind (x int); " + WHO,
            "params": {"name": "as-role"},
            "run_as": job_role,
        },
        interval_seconds=1,
    )
    add_job(jobdb, "as-login", "sql", {"statement": WHO, "params": {"name": "as-login"}}, interval_seconds=1)
    add_job(
        jobdb, "escape", "sql", {"statement": "RESET ROLE; SELECT 1", "run_as": job_role}, interval_seconds=1
    )
    with workers(as_login(jobdb, login), tmp_path, 1, "--concurrency", "1") as (proc,):
        wait_for(lambda: len(events(jobdb)) >= 6, 30, what="three runs of each job")
        assert proc.terminate() == 0
    seen = events(jobdb)
    assert {event for name, event in seen if name == "as-role"} == {f"{job_role}/{login}"}
    assert {event for name, event in seen if name == "as-login"} == {f"{login}/{login}"}
    assert one(jobdb, "SELECT count(*) FROM syncworker.sync_runs WHERE status = 'success'") >= 6
    assert last_run(jobdb, "escape")["error_type"] == "sql_error"


# A run session ends each run with statements it prepared once (syncworker_finish_run, _begin_run,
# _claim): a job that prepares its own under those names, from dynamic SQL the worker cannot
# see, would have the worker's login run them.
PLANT = """DO $plant$ BEGIN
  EXECUTE 'DEALLOCATE ALL';
  EXECUTE 'PREPARE syncworker_finish_run(' || rtrim(repeat('text,', 17), ',')
          || ') AS INSERT INTO public.planted VALUES (1)';
  EXECUTE 'PREPARE syncworker_begin_run(text, text) AS INSERT INTO public.planted VALUES (2)';
  EXECUTE 'PREPARE syncworker_claim(text, text, text, text) AS INSERT INTO public.planted VALUES (3)';
END $plant$"""


def test_what_a_run_as_job_prepares_never_runs_as_the_worker(
    jobdb: str, roles: Roles, job_role: str, tmp_path: Path
) -> None:
    login = roles("LOGIN", "syncworker_runner", job_role)
    execute(jobdb, "CREATE TABLE public.planted (x int)")
    execute(jobdb, f'GRANT INSERT ON public.planted TO "{login}"')  # the worker may, the job's role not
    add_job(jobdb, "plants", "sql", {"statement": PLANT, "run_as": job_role}, interval_seconds=1)
    add_job(jobdb, "plain", "sql", {"statement": "SELECT 1"}, interval_seconds=1)

    def ran(name: str) -> int:
        return one(
            jobdb,
            "SELECT count(*) FROM syncworker.sync_runs r JOIN syncworker.integrations i"
            " ON i.id = r.integration_id WHERE i.name = %s AND r.status = 'success'",
            (name,),
        )

    # One run session (concurrency 1): every run ends on the session the planting job used.
    with workers(as_login(jobdb, login), tmp_path, 1, "--concurrency", "1") as (proc,):
        wait_for(lambda: ran("plants") >= 4 and ran("plain") >= 4, 30, what="four runs of each job")
        assert proc.terminate() == 0
    assert one(jobdb, "SELECT count(*) FROM public.planted") == 0
    ended = "SELECT count(*) FROM syncworker.sync_runs WHERE status NOT IN ('success', 'running')"
    assert one(jobdb, ended) == 0


# -- a superuser's session ------------------------------------------------------------------


def test_a_superusers_session_refuses_sql_jobs_without_run_as_unless_allowed(
    jobdb: str, job_role: str
) -> None:
    add_job(jobdb, "plain", "sql", {"statement": "INSERT INTO public.ticks DEFAULT VALUES"})
    add_job(jobdb, "confined", "sql", {"statement": WHO, "params": {"name": "confined"}, "run_as": job_role})
    # The shell's own session: nothing runs, and the job is left as it is.
    with pytest.raises(OneShotError, match="--allow-superuser-jobs"):
        run(jobdb, "plain", allow_superuser_jobs=False)
    assert one(jobdb, "SELECT count(*) FROM syncworker.sync_runs") == 0
    # As the worker runs it: failed before its statement, and disabled saying how to fix it.
    assert run(jobdb, "plain", allow_superuser_jobs=False, local_check=False).status == "failed"
    ended = last_run(jobdb, "plain")
    assert ended["error_type"] == "config_invalid" and ended["enabled"] is False
    for fix in ("set run_as", "not a superuser", "--allow-superuser-jobs"):
        assert fix in ended["disabled_reason"]
    assert one(jobdb, "SELECT count(*) FROM public.ticks") == 0
    # run_as is the fix; and the flag lets the superuser's jobs run.
    assert run(jobdb, "confined", allow_superuser_jobs=False).status == "success"
    execute(jobdb, "SELECT syncworker.enable_job('plain')")
    assert run(jobdb, "plain", allow_superuser_jobs=True).status == "success"
    assert one(jobdb, "SELECT count(*) FROM public.ticks") == 1


def test_a_superuser_worker_refuses_sql_jobs_without_run_as_and_the_flag_allows_them(
    jobdb: str, tmp_path: Path
) -> None:
    add_job(
        jobdb, "plain", "sql", {"statement": "INSERT INTO public.ticks DEFAULT VALUES"}, interval_seconds=1
    )
    refusing = worker_env(jobdb, SYNCWORKER_ALLOW_SUPERUSER_JOBS="0")
    with workers(jobdb, tmp_path, 1, env=refusing) as (proc,):
        wait_for(
            lambda: one(jobdb, "SELECT NOT enabled FROM syncworker.integrations"), 30, what="the refusal"
        )
        assert proc.terminate() == 0
    assert one(jobdb, "SELECT count(*) FROM public.ticks") == 0
    assert "--allow-superuser-jobs" in one(jobdb, "SELECT disabled_reason FROM syncworker.integrations")

    check = cli(jobdb, "check", SYNCWORKER_ALLOW_SUPERUSER_JOBS="0")
    assert check.returncode == 0 and "warning: plain:" in check.stderr and "superuser" in check.stderr
    checked = json.loads(cli(jobdb, "check", "--json", SYNCWORKER_ALLOW_SUPERUSER_JOBS="0").stdout)
    assert [job["name"] for job in checked["unchecked"]] == ["plain"]
    assert (
        "warning"
        not in cli(jobdb, "check", "--allow-superuser-jobs", SYNCWORKER_ALLOW_SUPERUSER_JOBS="0").stderr
    )
    once = cli(jobdb, "run-once", "plain", SYNCWORKER_ALLOW_SUPERUSER_JOBS="0")
    assert (
        once.returncode == 1 and "this shell cannot run it" in once.stderr and "Traceback" not in once.stderr
    )

    execute(jobdb, "SELECT syncworker.enable_job('plain')")
    with workers(jobdb, tmp_path, 1, "--allow-superuser-jobs", env=refusing) as (proc,):
        wait_for(lambda: one(jobdb, "SELECT count(*) FROM public.ticks") >= 2, 30, what="runs with the flag")
        assert proc.terminate() == 0
