"""A hostile world: rows no connector expects, jobs that fight the worker's session, runs stuck
inside Postgres, a frozen leader.  No row may stop a replica or loop, and rescue never waits on
a statement to end or on one process to be healthy."""

from __future__ import annotations

import os
import signal
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
import pytest

from helpers import WorkerProcess, add_job, execute, one, rows, wait_for, worker_env, workers

pytestmark = pytest.mark.e2e


def runs_of(url: str, name: str) -> list[dict[str, Any]]:
    return rows(
        url,
        """SELECT r.id, r.status, r.trigger, r.error_type, r.error, r.started_at, r.finished_at, w.pid
             FROM syncworker.sync_runs r JOIN syncworker.integrations i ON i.id = r.integration_id
             LEFT JOIN syncworker.workers w ON w.id = r.worker_id
            WHERE i.name = %s ORDER BY r.id""",
        (name,),
    )


def job(url: str, name: str) -> dict[str, Any]:
    return rows(
        url,
        "SELECT id, name, enabled, disabled_reason, last_error, retry_count, last_status "
        "FROM syncworker.integrations WHERE name = %s",
        (name,),
    )[0]


def assert_alive(procs: list[WorkerProcess]) -> None:
    for p in procs:
        assert p.proc.poll() is None, f"a worker exited with {p.proc.returncode}:\n{p.output()[-3000:]}"


# -- 1. one row must not stop the fleet -------------------------------------------------------


def test_a_realtime_row_with_a_null_source_disables_itself_and_stops_no_replica(
    jobdb: str, tmp_path: Path
) -> None:
    execute(
        jobdb,
        """INSERT INTO syncworker.integrations (name, kind, config, interval_seconds)
           VALUES ('rt-bad', 'postgres', '{"realtime": true, "source": null}', 60)""",
    )
    add_job(
        jobdb, "control", "sql", {"statement": "INSERT INTO public.ticks DEFAULT VALUES"}, interval_seconds=1
    )
    with workers(jobdb, tmp_path, 2) as procs:
        wait_for(lambda: not job(jobdb, "rt-bad")["enabled"], timeout=15, what="rt-bad to be disabled")
        before = one(jobdb, "SELECT count(*) FROM public.ticks")
        wait_for(
            lambda: one(jobdb, "SELECT count(*) FROM public.ticks") >= before + 3,
            timeout=10,
            what="the control job to keep running",
        )
        assert_alive(procs)
        output = "".join(p.output() for p in procs)
    bad = job(jobdb, "rt-bad")
    assert bad["disabled_reason"].startswith("invalid configuration: source")
    assert (
        one(
            jobdb,
            "SELECT count(*) FROM syncworker.sync_errors e JOIN syncworker.integrations i "
            "ON i.id = e.integration_id WHERE i.name = 'rt-bad' AND e.error_type = 'config_invalid'",
        )
        >= 1
    )
    assert "CRITICAL" not in output and "Traceback" not in output


# -- 2. invalid rows are disabled once, never looped ----------------------------------------------

INVALID = {
    "a": ("sql", {"statement": None}, "statement"),
    "b": ("python", {"callable": None}, "callable"),
    "c": ("postgres", {"source": None}, "source"),
    "d": ("http", {"url": "http://[::1"}, "url"),
    "e": ("redis", {"url": None}, "url"),
    "f": ("http", {"url": "http://127.0.0.1:9/x", "destination": None}, "destination"),
}


def test_invalid_rows_are_disabled_with_a_reason_after_one_failed_run(jobdb: str, tmp_path: Path) -> None:
    for name, (kind, config, _) in INVALID.items():
        add_job(jobdb, name, kind, config, interval_seconds=5)
    add_job(
        jobdb, "control", "sql", {"statement": "INSERT INTO public.ticks DEFAULT VALUES"}, interval_seconds=1
    )
    with workers(jobdb, tmp_path, 1) as procs:
        for name in INVALID:
            wait_for(lambda n=name: not job(jobdb, n)["enabled"], timeout=15, what=f"{name} disabled")
        # Two more runs of the control job: the main loop has gone round since, and a disabled
        # row that loops would have run again in between.
        ticks = one(jobdb, "SELECT count(*) FROM public.ticks")
        wait_for(lambda: one(jobdb, "SELECT count(*) FROM public.ticks") >= ticks + 2, what="two more ticks")
        assert_alive(procs)
        output = procs[0].output()
    for name, (_, _, field) in INVALID.items():
        found = runs_of(jobdb, name)
        assert [r["status"] for r in found] == ["failed"], (name, found)
        assert found[0]["error_type"] == "config_invalid"
        assert job(jobdb, name)["disabled_reason"].startswith(f"invalid configuration: {field}"), name
    assert one(jobdb, "SELECT count(*) FROM public.ticks") >= 3
    assert "run task crashed" not in output and "Traceback" not in output


def test_the_database_rejects_a_cron_that_never_fires_a_huge_name_and_an_infinite_due_time(
    db: str,
) -> None:
    with pytest.raises(psycopg.errors.CheckViolation, match="never fires"):
        add_job(db, "feb31", "sql", {"statement": "SELECT 1"}, cron="0 0 31 2 *")
    with pytest.raises(psycopg.errors.CheckViolation, match="never fires"):
        add_job(db, "apr31", "sql", {"statement": "SELECT 1"}, cron="0 0 31 4,6 *")
    add_job(db, "feb29", "sql", {"statement": "SELECT 1"}, cron="0 0 29 2 *")  # leap years: fires
    add_job(db, "feb31-or-monday", "sql", {"statement": "SELECT 1"}, cron="0 0 31 2 1")  # either day
    with pytest.raises(psycopg.errors.CheckViolation, match="200 characters"):
        add_job(db, "x" * 9000, "sql", {"statement": "SELECT 1"}, interval_seconds=5)
    add_job(db, "ok", "sql", {"statement": "SELECT 1"}, interval_seconds=5)
    for value in ("infinity", "-infinity", "20000-01-01", "0100-01-01 BC"):
        with pytest.raises(psycopg.errors.CheckViolation, match="next_sync_at must be a finite time"):
            execute(db, "UPDATE syncworker.integrations SET next_sync_at = %s WHERE name = 'ok'", (value,))
        with pytest.raises(psycopg.errors.CheckViolation, match="next_sync_at must be a finite time"):
            add_job(db, f"inf{value}", "sql", {"statement": "SELECT 1"}, next_sync_at=value)
    execute(db, "UPDATE syncworker.integrations SET next_sync_at = '9999-01-01' WHERE name = 'ok'")


def test_a_row_written_before_the_checks_existed_is_disabled_not_looped(jobdb: str, tmp_path: Path) -> None:
    # Rows older than the database's checks: the worker must cope with them too.
    execute(
        jobdb,
        """ALTER TABLE syncworker.integrations DISABLE TRIGGER integrations_before_write,
                                               DISABLE TRIGGER integrations_before_update;
           INSERT INTO syncworker.integrations (name, kind, config, cron, next_sync_at)
           VALUES ('feb31', 'sql', '{"statement": "SELECT 1"}', '0 0 31 2 *', now()),
                  ('bad-cron', 'sql', '{"statement": "SELECT 1"}', 'not a cron', now()),
                  ('bad-zone', 'sql', '{"statement": "SELECT 1"}', '0 * * * *', now());
           UPDATE syncworker.integrations SET timezone = 'Mars/Olympus' WHERE name = 'bad-zone';
           INSERT INTO syncworker.integrations (name, kind, config, interval_seconds, next_sync_at)
           VALUES (repeat('x', 9000), 'garbage', '{}', 5, now());
           ALTER TABLE syncworker.integrations ENABLE TRIGGER integrations_before_write,
                                               ENABLE TRIGGER integrations_before_update;""",
    )
    with workers(jobdb, tmp_path, 1) as procs:
        wait_for(
            lambda: one(jobdb, "SELECT count(*) FROM syncworker.integrations WHERE enabled") == 0,
            timeout=15,
            what="every row disabled",
        )
        # A job added now runs twice once the worker has gone round its loop twice more: a
        # disabled row that loops would have run again in between.
        add_job(jobdb, "probe", "sql", {"statement": "SELECT 1"}, interval_seconds=1)
        wait_for(lambda: len(runs_of(jobdb, "probe")) >= 2, timeout=15, what="two runs of a new job")
        assert_alive(procs)
        output = procs[0].output()
    assert "never fires" in job(jobdb, "feb31")["disabled_reason"]
    others = "FROM syncworker.sync_runs r JOIN syncworker.integrations i ON i.id = r.integration_id "
    others += "WHERE i.name <> 'probe'"
    assert one(jobdb, f"SELECT count(*) {others} AND r.status <> 'failed'") == 0
    assert one(jobdb, f"SELECT count(*) {others}") == 4
    assert "run task crashed" not in output and "Traceback" not in output


# -- 3. a run busy inside Postgres is rescued at once ---------------------------------------------


def sleeping_in_a_run(url: str) -> bool:
    """Is a run's session (not the leader's) inside a pg_sleep, at the statement's core?"""
    return bool(
        one(
            url,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event = 'PgSleep' AND application_name LIKE 'syncworker run%%'",
        )
    )


def _kill_the_runner_and_time_the_rerun(url: str, tmp_path: Path, name: str) -> float:
    with workers(url, tmp_path, 2) as procs:
        first = wait_for(
            lambda: [r for r in runs_of(url, name) if r["status"] == "running" and r["pid"]],
            timeout=20,
            what="the run to start",
        )[0]
        wait_for(lambda: sleeping_in_a_run(url), what="the run to be inside its statement")
        victim = next(p for p in procs if p.pid == first["pid"])
        victim.kill()
        killed = time.monotonic()
        wait_for(
            lambda: [r for r in runs_of(url, name)[1:] if r["trigger"] == "rescue"],
            timeout=30,
            what="the rerun",
        )
        elapsed = time.monotonic() - killed
        assert_alive([p for p in procs if p is not victim])
    assert runs_of(url, name)[0]["status"] == "abandoned"
    return elapsed


def test_a_sql_job_blocked_in_a_statement_is_rerun_within_5s_of_its_worker_being_killed(
    jobdb: str, tmp_path: Path
) -> None:
    add_job(jobdb, "sleepy", "sql", {"statement": "SELECT pg_sleep(60)"})
    assert _kill_the_runner_and_time_the_rerun(jobdb, tmp_path, "sleepy") < 5


def test_a_postgres_job_blocked_writing_its_destination_is_rerun_within_5s(
    jobdb: str, tmp_path: Path
) -> None:
    execute(
        jobdb,
        """CREATE TABLE public.src (id int PRIMARY KEY, v text, updated_at timestamptz DEFAULT now());
           INSERT INTO public.src (id, v) SELECT g, 'v' || g FROM generate_series(1, 10) g;
           CREATE TABLE public.dst (id int PRIMARY KEY, v text, updated_at timestamptz);
           CREATE FUNCTION public.slow() RETURNS trigger LANGUAGE plpgsql AS
             $$ BEGIN PERFORM pg_sleep(60); RETURN NEW; END $$;
           CREATE TRIGGER slow BEFORE INSERT ON public.dst
             FOR EACH STATEMENT EXECUTE FUNCTION public.slow();""",
    )
    add_job(
        jobdb,
        "mirror",
        "postgres",
        {
            "source": {
                "dsn": {"env": "SRC_DSN"},
                "table": "public.src",
                "key": ["id"],
                "updated_at": "updated_at",
            },
            "destination": {"table": "public.dst", "key": ["id"]},
        },
    )
    os.environ["SRC_DSN"] = jobdb
    try:
        assert _kill_the_runner_and_time_the_rerun(jobdb, tmp_path, "mirror") < 5
    finally:
        del os.environ["SRC_DSN"]


# -- 4. a frozen leader stalls nothing --------------------------------------------------------------


def test_with_the_leader_frozen_a_killed_replicas_runs_are_rescued_and_a_standby_leads(
    jobdb: str, tmp_path: Path
) -> None:
    for i in range(6):
        add_job(jobdb, f"slow{i}", "sql", {"statement": "SELECT pg_sleep(2)"}, interval_seconds=1)
    with workers(jobdb, tmp_path, 3, "--concurrency", "2") as procs:
        leader_pid = wait_for(
            lambda: one(jobdb, "SELECT pid FROM syncworker.workers WHERE leader AND stopped_at IS NULL"),
            timeout=15,
            what="a leader",
        )
        leader = next(p for p in procs if p.pid == leader_pid)
        others = [p for p in procs if p is not leader]

        def running_on(p: WorkerProcess) -> list[int]:
            return [
                r["id"]
                for r in rows(
                    jobdb,
                    "SELECT r.id FROM syncworker.sync_runs r JOIN syncworker.workers w ON w.id = r.worker_id "
                    "WHERE r.status = 'running' AND w.pid = %s",
                    (p.pid,),
                )
            ]

        victim = wait_for(
            lambda: next((p for p in others if running_on(p)), None), timeout=15, what="a run on a follower"
        )
        survivor = next(p for p in others if p is not victim)
        os.kill(leader.pid, signal.SIGSTOP)
        try:
            stranded = running_on(victim)
            victim.kill()
            killed = time.monotonic()
            wait_for(
                lambda: (
                    one(
                        jobdb,
                        "SELECT count(*) FROM syncworker.sync_runs "
                        "WHERE id = ANY(%s) AND status = 'abandoned'",
                        (stranded,),
                    )
                    == len(stranded)
                ),
                timeout=15,
                what="the killed replica's runs to be abandoned",
            )
            assert time.monotonic() - killed < 5
            wait_for(
                lambda: one(
                    jobdb, "SELECT leader FROM syncworker.workers WHERE pid = %s AND leader", (survivor.pid,)
                ),
                timeout=15,
                what="the survivor to lead",
            )
            assert time.monotonic() - killed < 12
            assert (
                one(jobdb, "SELECT count(*) FROM syncworker.workers WHERE leader AND stopped_at IS NULL") == 1
            )
        finally:
            os.kill(leader.pid, signal.SIGCONT)
        # The frozen leader comes back as a standby and keeps working.
        wait_for(lambda: "now a standby" in leader.output(), timeout=15, what="the old leader to step down")
        assert_alive([leader, survivor])


def test_a_run_past_its_timeout_on_a_frozen_worker_is_stopped_from_the_database(
    jobdb: str, tmp_path: Path
) -> None:
    add_job(jobdb, "stuck", "sql", {"statement": "SELECT pg_sleep(120)"}, timeout_seconds=2)
    with workers(jobdb, tmp_path, 2) as procs:
        first = wait_for(
            lambda: [r for r in runs_of(jobdb, "stuck") if r["status"] == "running" and r["pid"]],
            timeout=20,
            what="the run to start",
        )[0]
        frozen = next(p for p in procs if p.pid == first["pid"])
        os.kill(frozen.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            wait_for(
                lambda: runs_of(jobdb, "stuck")[0]["status"] != "running",
                timeout=30,
                what="the overdue run to end",
            )
            # timeout 2 s + the margin (5 s) + a rescue round
            assert time.monotonic() - stopped < 10
        finally:
            os.kill(frozen.pid, signal.SIGCONT)
        ended = runs_of(jobdb, "stuck")[0]
        assert ended["status"] == "abandoned"
        assert "timeout" in ended["error"]


# -- 5. a job cannot break the worker's session handling ------------------------------------------

HOSTILE = {
    "sets-local-timeout": "SET LOCAL statement_timeout = 1",
    "sets-timeout": "SET statement_timeout = 1",
    "sets-lock-timeout": "SET lock_timeout = 1",
    "commits": "COMMIT",
    "rolls-back": "ROLLBACK",
    "sets-role": "SET ROLE pg_read_all_data",
    "resets-all": "RESET ALL",
    "discards-all": "DISCARD ALL",
    "unlocks-all": "SELECT pg_advisory_unlock_all()",
    "read-only": "SET LOCAL transaction_read_only = on",
    "search-path": "SET search_path = pg_temp",
}


def test_hostile_statements_in_sql_jobs_leak_no_lock_and_stall_no_other_job(
    jobdb: str, tmp_path: Path
) -> None:
    for name, statement in HOSTILE.items():
        add_job(jobdb, name, "sql", {"statement": statement}, interval_seconds=1, max_retries=1000)
    for i in range(5):
        add_job(
            jobdb,
            f"control{i}",
            "sql",
            {"statement": "INSERT INTO public.job_rows (run_id) VALUES (1)"},
            interval_seconds=1,
        )
    seconds = 20

    def exposed() -> bool:
        """Has every control job run `seconds - 4` times beside the hostile ones?"""
        fewest = one(
            jobdb,
            """SELECT min(n) FROM (
                 SELECT count(r.id) FILTER (WHERE r.status = 'success') AS n
                   FROM syncworker.integrations i LEFT JOIN syncworker.sync_runs r ON r.integration_id = i.id
                  WHERE i.name LIKE 'control%' GROUP BY i.name) c""",
        )
        return fewest >= seconds - 4

    with workers(jobdb, tmp_path, 1) as procs:
        wait_for(exposed, timeout=3 * seconds, interval=0.5, what="every job to have run a while")
        assert_alive(procs)
        output = procs[0].output()
        # Nothing sits running for seconds waiting on a lock some idle session kept.
        stuck = one(
            jobdb,
            "SELECT count(*) FROM syncworker.sync_runs WHERE status = 'running' "
            "AND started_at < now() - interval '3 seconds'",
        )
    counts = {
        r["name"]: r
        for r in rows(
            jobdb,
            """SELECT i.name, count(*) FILTER (WHERE r.status = 'success') AS ok,
                      count(*) FILTER (WHERE r.status = 'abandoned') AS abandoned,
                      count(*) FILTER (WHERE r.status = 'running') AS running,
                      max(r.started_at) AS last
                 FROM syncworker.integrations i LEFT JOIN syncworker.sync_runs r ON r.integration_id = i.id
                GROUP BY i.name""",
        )
    }
    for i in range(5):
        assert counts[f"control{i}"]["ok"] >= seconds - 4, counts[f"control{i}"]
    for name in HOSTILE:
        assert counts[name]["abandoned"] <= 1, (name, counts[name])
    assert "run task crashed" not in output and "Traceback" not in output, output[-3000:]
    assert stuck == 0


def test_what_a_job_leaves_on_its_session_is_gone_before_the_next_job_runs(
    jobdb: str, tmp_path: Path
) -> None:
    """One run session (concurrency 1), so every run is on the session the previous one left.
    A temporary table must not outlive its run: the job that makes one could not run twice
    (`relation "staging" already exists`), and one named like a real table would take
    another job's rows (pg_temp comes first in the search path).  Nor may a prepared
    statement (`prepared statement "leftover" already exists`, even after a run that
    failed), a LISTEN or a cursor WITH HOLD, in a chain of runs as after one: a listening
    session idle in the pool keeps the server's notification queue from being cleaned."""
    execute(jobdb, "CREATE TABLE public.target (x int, listening bigint, cursors bigint, prepared bigint)")
    leaves = (
        "CREATE TEMP TABLE staging AS SELECT 1 AS x; "
        "CREATE TEMP TABLE target (x int, listening bigint, cursors bigint, prepared bigint); "
        "LISTEN job_channel; DECLARE held CURSOR WITH HOLD FOR SELECT 1; "
        "PREPARE leftover AS SELECT 1; EXECUTE leftover; "
        "INSERT INTO public.job_rows (run_id) SELECT x FROM staging"
    )
    looks = (
        "INSERT INTO target SELECT 1, (SELECT count(*) FROM pg_listening_channels()), "
        "(SELECT count(*) FROM pg_cursors), (SELECT count(*) FROM pg_prepared_statements "
        "WHERE name = 'leftover')"
    )
    fails = "PREPARE failing AS SELECT 1; SELECT 1 / 0"
    add_job(jobdb, "leaves", "sql", {"statement": leaves}, next_sync_at=None)
    add_job(jobdb, "looks", "sql", {"statement": looks}, next_sync_at=None)
    add_job(
        jobdb,
        "fails",
        "sql",
        {"statement": fails},
        next_sync_at=None,
        max_retries=10,
        retry_backoff_seconds=3600,
    )

    def succeeded(name: str, count: int) -> bool:
        return sum(r["status"] == "success" for r in runs_of(jobdb, name)) >= count

    def failed(name: str, count: int) -> bool:
        return sum(r["status"] == "failed" for r in runs_of(jobdb, name)) >= count

    def one_after_the_other(*names: str, turn: int) -> None:
        for name in names:  # the session goes back to the pool between them
            execute(jobdb, "SELECT syncworker.trigger_sync(%s)", (name,))
            wait_for(lambda n=name: succeeded(n, turn), timeout=20, what=f"run {turn} of {name}")
            time.sleep(0.3)

    env = {**worker_env(jobdb), "SYNCWORKER_CONCURRENCY": "1"}
    with workers(jobdb, tmp_path, 1, env=env) as procs:
        for turn in range(1, 4):
            one_after_the_other("leaves", "looks", turn=turn)
        # All at once: the session may run them one after the other in a chain.
        for turn in (4, 5):
            execute(
                jobdb,
                "SELECT syncworker.trigger_sync('leaves'), syncworker.trigger_sync('looks'),"
                " syncworker.trigger_sync('fails')",
            )
            wait_for(
                lambda t=turn: succeeded("leaves", t) and succeeded("looks", t) and failed("fails", t - 3),
                timeout=20,
                what=f"round {turn} of all three",
            )
        assert_alive(procs)
    for name in ("leaves", "looks"):
        assert [r["status"] for r in runs_of(jobdb, name)] == ["success"] * 5, runs_of(jobdb, name)
    for run in runs_of(jobdb, "fails"):  # not `prepared statement "failing" already exists`
        assert run["status"] == "failed" and "division by zero" in run["error"], run
    seen = rows(jobdb, "SELECT listening, cursors, prepared FROM public.target ORDER BY ctid")
    assert seen == [{"listening": 0, "cursors": 0, "prepared": 0}] * 5  # each in the real table


def test_a_job_that_drops_the_sessions_prepared_statements_fails_no_other_run(
    jobdb: str, tmp_path: Path
) -> None:
    """A run session ends each run with statements it prepared (the finish, the start of the
    next run, the claim).  `DEALLOCATE ALL` in a job drops them: the worker must prepare them
    again, not fail the next finish.  Dropped from dynamic SQL, out of the worker's sight, the
    run that did it fails (its finish cannot run), and no other."""
    dynamic = "DO $$ BEGIN EXECUTE 'DEALLOCATE ALL'; END $$"
    add_job(jobdb, "dealloc", "sql", {"statement": "DEALLOCATE ALL"}, interval_seconds=1)
    add_job(
        jobdb,
        "dynamic",
        "sql",
        {"statement": dynamic},
        interval_seconds=1,
        max_retries=1000,
        retry_backoff_seconds=1,
    )
    add_job(jobdb, "other", "sql", {"statement": "SELECT 1"}, interval_seconds=1)

    def enough() -> bool:  # (the failing job's retries back off: 1 s, 2 s, 4 s, ...)
        done = {name: len(runs_of(jobdb, name)) for name in ("dealloc", "dynamic", "other")}
        return done["dealloc"] >= 8 and done["other"] >= 8 and done["dynamic"] >= 4

    env = {**worker_env(jobdb), "SYNCWORKER_CONCURRENCY": "1"}
    with workers(jobdb, tmp_path, 1, env=env) as procs:
        wait_for(enough, timeout=40, interval=0.2, what="8 runs of two jobs, 4 of the third")
        assert_alive(procs)
        output = procs[0].output()
    for name in ("dealloc", "other"):
        statuses = {r["status"] for r in runs_of(jobdb, name) if r["status"] != "running"}
        assert statuses == {"success"}, runs_of(jobdb, name)
    for run in runs_of(jobdb, "dynamic"):
        lost = 'prepared statement "syncworker_'  # its finish, dropped by its own statement
        assert run["status"] in ("success", "running") or lost in run["error"], run
    assert "Traceback" not in output, output[-3000:]


def test_quotes_backslashes_and_dollar_tags_in_an_error_are_recorded_as_they_are(
    jobdb: str, tmp_path: Path
) -> None:
    """A run's end travels as SQL text with its values written in: an error message must come
    back into sync_runs as it was, whatever quotes it holds."""
    message = "it's a \\ back\\slash, '' $_$ a tag $_1$, $$ and an end$_"
    statement = f"DO $m$ BEGIN RAISE EXCEPTION '%', $q${message}$q$; END $m$"
    add_job(jobdb, "quotes", "sql", {"statement": statement}, next_sync_at=None)
    with workers(jobdb, tmp_path, 1) as procs:
        execute(jobdb, "SELECT syncworker.trigger_sync('quotes')")
        wait_for(lambda: any(r["status"] == "failed" for r in runs_of(jobdb, "quotes")), 20, what="the run")
        assert_alive(procs)
    (run,) = runs_of(jobdb, "quotes")
    assert message in run["error"], run
    assert message in job(jobdb, "quotes")["last_error"]
    recorded = one(jobdb, "SELECT message FROM syncworker.sync_errors WHERE run_id = %s", (run["id"],))
    assert message in recorded


# -- odd values the database accepts but Python cannot read ---------------------------------------


def test_a_config_nested_too_deep_for_python_fails_alone(jobdb: str, tmp_path: Path) -> None:
    deep = "[" * 3000 + "]" * 3000
    execute(
        jobdb,
        "INSERT INTO syncworker.integrations (name, kind, config, interval_seconds) "
        "VALUES ('deep', 'sql', jsonb_build_object('statement', 'SELECT 1', 'x', %s::jsonb), 1), "
        "('deep-rt', 'postgres', jsonb_build_object('realtime', true, 'x', %s::jsonb), 60)",
        (deep, deep),
    )
    add_job(
        jobdb, "control", "sql", {"statement": "INSERT INTO public.ticks DEFAULT VALUES"}, interval_seconds=1
    )
    with workers(jobdb, tmp_path, 1) as procs:
        for name in ("deep", "deep-rt"):
            wait_for(lambda n=name: not job(jobdb, n)["enabled"], timeout=15, what=f"{name} disabled")
        before = one(jobdb, "SELECT count(*) FROM public.ticks")
        wait_for(
            lambda: one(jobdb, "SELECT count(*) FROM public.ticks") >= before + 2,
            timeout=10,
            what="control runs",
        )
        assert_alive(procs)
        output = procs[0].output()
    assert "config could not be read (RecursionError" in job(jobdb, "deep")["disabled_reason"]
    assert [r["status"] for r in runs_of(jobdb, "deep")] == ["failed"]
    assert "Traceback" not in output


def test_sighup_stops_the_worker_gracefully(jobdb: str, tmp_path: Path) -> None:
    add_job(
        jobdb, "control", "sql", {"statement": "INSERT INTO public.ticks DEFAULT VALUES"}, interval_seconds=1
    )
    with workers(jobdb, tmp_path, 1) as (proc,):
        wait_for(lambda: one(jobdb, "SELECT count(*) FROM public.ticks") >= 1, timeout=15, what="a run")
        proc.proc.send_signal(signal.SIGHUP)
        assert proc.proc.wait(30) == 0
    assert one(jobdb, "SELECT count(*) FROM syncworker.workers WHERE stopped_at IS NULL") == 0


def test_database_default_timeouts_do_not_cut_the_workers_own_sessions(jobdb: str, tmp_path: Path) -> None:
    dbname = one(jobdb, "SELECT current_database()")
    execute(
        jobdb,
        f'ALTER DATABASE "{dbname}" SET statement_timeout = 500; '
        f'ALTER DATABASE "{dbname}" SET idle_session_timeout = 1000',
    )
    add_job(
        jobdb, "control", "sql", {"statement": "INSERT INTO public.ticks DEFAULT VALUES"}, interval_seconds=1
    )
    with workers(jobdb, tmp_path, 2) as procs:
        # Six runs a second apart: the sessions have sat idle past idle_session_timeout.
        wait_for(lambda: one(jobdb, "SELECT count(*) FROM public.ticks") >= 6, timeout=30, what="ticks")
        assert_alive(procs)
        output = "".join(p.output() for p in procs)
    assert "session lost" not in output, output[-3000:]


def test_a_replica_that_lost_its_liveness_lock_has_its_sessions_cut_and_its_runs_rerun(
    jobdb: str, tmp_path: Path
) -> None:
    # A replica alive but unreachable (frozen here) whose liveness session is gone: its run
    # sessions would otherwise hold their locks for as long as the process is stuck.
    add_job(jobdb, "sleepy", "sql", {"statement": "SELECT pg_sleep(120)"})
    with workers(jobdb, tmp_path, 2) as procs:
        first = wait_for(
            lambda: [r for r in runs_of(jobdb, "sleepy") if r["status"] == "running" and r["pid"]],
            timeout=20,
            what="the run to start",
        )[0]
        lost = next(p for p in procs if p.pid == first["pid"])
        worker_id = one(jobdb, "SELECT id FROM syncworker.workers WHERE pid = %s", (lost.pid,))
        os.kill(lost.pid, signal.SIGSTOP)
        try:
            cut = one(
                jobdb,
                """SELECT count(pg_terminate_backend(pid)) FROM pg_locks
                    WHERE locktype = 'advisory' AND granted AND objsubid = 2
                      AND classid = syncworker.lock_key('worker')::oid AND objid = %s::oid
                      AND database = (SELECT oid FROM pg_database WHERE datname = current_database())""",
                (worker_id,),
            )
            assert cut == 1
            cut_at = time.monotonic()
            wait_for(
                lambda: [r for r in runs_of(jobdb, "sleepy")[1:] if r["trigger"] == "rescue"],
                timeout=30,
                what="the rerun on the other replica",
            )
            # 10 s of grace for a worker reconnecting its listener, then a rescue round.
            assert time.monotonic() - cut_at < 16
            marked = rows(
                jobdb, "SELECT stopped_at, lost_at FROM syncworker.workers WHERE id = %s", (worker_id,)
            )
            assert marked[0]["stopped_at"] is not None and marked[0]["lost_at"] is not None
            assert (
                one(
                    jobdb,
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND application_name LIKE %s",
                    (f"syncworker% w{worker_id}",),
                )
                == 0
            )
        finally:
            os.kill(lost.pid, signal.SIGCONT)
        assert runs_of(jobdb, "sleepy")[0]["status"] == "abandoned"
        # The replica comes back, reconnects and goes on working.
        wait_for(
            lambda: one(
                jobdb, "SELECT stopped_at IS NULL FROM syncworker.workers WHERE id = %s", (worker_id,)
            ),
            timeout=60,
            what="the replica to come back",
        )
        assert_alive(procs)


def test_a_job_blocking_in_a_thread_does_not_keep_a_stopped_worker_alive(jobdb: str, tmp_path: Path) -> None:
    add_job(jobdb, "blocker", "python", {"callable": "jobs:sleep_blocking", "options": {"seconds": 120}})
    with workers(jobdb, tmp_path, 1, "--grace-period", "1") as (proc,):
        wait_for(
            lambda: one(jobdb, "SELECT count(*) FROM public.job_events WHERE event = 'start'"),
            timeout=20,
            what="the job to start",
        )
        proc.proc.send_signal(signal.SIGTERM)
        # the grace period, then the run is handed back and the process ends, thread or not
        assert proc.proc.wait(15) == 0
    run = runs_of(jobdb, "blocker")[0]
    assert run["status"] == "abandoned" and "shut down" in run["error"]


def test_sigterm_while_starting_is_a_graceful_stop(jobdb: str, tmp_path: Path) -> None:
    # --http answers before the worker has connected, registered and started its services:
    # a SIGTERM from then on must be the usual graceful stop, not a kill.
    for attempt in range(3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with workers(jobdb, tmp_path, 1, "--http", f"127.0.0.1:{port}") as (proc,):

            def answering(port: int = port) -> bool:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                        return True
                except OSError:
                    return False

            wait_for(answering, timeout=30, what="/healthz")
            proc.proc.send_signal(signal.SIGTERM)
            assert proc.proc.wait(60) == 0, (attempt, proc.output()[-2000:])
