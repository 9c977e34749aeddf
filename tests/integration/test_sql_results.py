"""What a `sql` job's statement brings back: its rows are counted as they stream in and never
kept (a statement returning millions of rows costs the run time, not the worker's memory);
every statement of the job counts; COPY cannot wedge the session; on another database a
statement is its own transaction, so a procedure there may COMMIT."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from helpers import ROOT, add_job, execute, one, rows, worker_env
from worker.run.once import run_once

# Peak RSS of a child process, read by a small wrapper (the test process's own rusage would
# count every child it ever had).
_PEAK_RSS = (
    "import resource, subprocess, sys\n"
    "done = subprocess.run(sys.argv[1:])\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    "sys.exit(done.returncode)\n"
)


def run(url: str, name: str, *, dry_run: bool = False):
    return asyncio.run(run_once(url, name, dry_run=dry_run))


def last_run(url: str) -> dict[str, object]:
    return rows(url, "SELECT * FROM syncworker.sync_runs ORDER BY id DESC LIMIT 1")[0]


def test_a_statement_returning_millions_of_rows_is_counted_in_little_memory(jobdb: str) -> None:
    # 2,000,000 rows of ~110 bytes: held as one result, that is over 300 MB in the worker.
    statement = "SELECT g, repeat('x', 100) FROM generate_series(1, 2000000) g"
    add_job(jobdb, "everything", "sql", {"statement": statement})
    done = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS, sys.executable, "-m", "worker", "run-once", "everything"],
        env=worker_env(jobdb),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    peak_mb = int(done.stdout.strip().splitlines()[-1]) / 1024
    run_row = last_run(jobdb)
    assert run_row["status"] == "success" and run_row["records_processed"] == 2_000_000
    assert peak_mb < 120, f"run-once peaked at {peak_mb:.0f} MB"


def test_every_statement_of_a_job_counts(jobdb: str) -> None:
    statement = (
        "INSERT INTO public.ticks SELECT g FROM generate_series(1, 3) g; "
        "INSERT INTO public.ticks SELECT g FROM generate_series(4, 5) g; "
        "SELECT * FROM public.ticks WHERE id <= 4"
    )
    add_job(jobdb, "three", "sql", {"statement": statement})
    assert run(jobdb, "three").status == "success"
    assert last_run(jobdb)["records_processed"] == 3 + 2 + 4
    assert one(jobdb, "SELECT count(*) FROM public.ticks") == 5


def test_a_failing_statement_in_the_middle_fails_the_run_and_commits_nothing(jobdb: str) -> None:
    statement = (
        "INSERT INTO public.ticks DEFAULT VALUES; SELECT 1 / 0; INSERT INTO public.ticks DEFAULT VALUES"
    )
    add_job(jobdb, "middle", "sql", {"statement": statement})
    assert run(jobdb, "middle").status == "failed"
    err = rows(jobdb, "SELECT error_type, message FROM syncworker.sync_errors")[0]
    assert err["error_type"] == "sql_error" and "division by zero" in err["message"]
    assert one(jobdb, "SELECT count(*) FROM public.ticks") == 0


def test_copy_to_stdout_is_read_and_dropped_and_the_session_goes_on(jobdb: str) -> None:
    statement = "COPY (SELECT generate_series(1, 7)) TO STDOUT; INSERT INTO public.ticks DEFAULT VALUES"
    add_job(jobdb, "copy-out", "sql", {"statement": statement})
    assert run(jobdb, "copy-out").status == "success"
    assert last_run(jobdb)["records_processed"] == 7 + 1
    assert one(jobdb, "SELECT count(*) FROM public.ticks") == 1


def test_copy_from_stdin_fails_clearly_and_commits_nothing(jobdb: str) -> None:
    statement = "INSERT INTO public.ticks DEFAULT VALUES; COPY public.ticks (id) FROM STDIN"
    add_job(jobdb, "copy-in", "sql", {"statement": statement})
    assert run(jobdb, "copy-in").status == "failed"
    message = one(jobdb, "SELECT message FROM syncworker.sync_errors")
    assert "no data to COPY FROM STDIN" in message
    assert one(jobdb, "SELECT count(*) FROM public.ticks") == 0
    # The job can be run again: the session it ran on was left usable.
    execute(
        jobdb,
        "UPDATE syncworker.integrations SET config = %s WHERE name = 'copy-in'",
        ('{"statement": "INSERT INTO public.ticks DEFAULT VALUES"}',),
    )
    assert run(jobdb, "copy-in").status == "success"


def test_parameters_keep_quotes_backslashes_and_percent_signs(jobdb: str) -> None:
    execute(jobdb, "CREATE TABLE public.notes (s text, n int)")
    text = "it's 100% \\ sure; DROP TABLE public.notes; --"
    config = {
        "statement": "INSERT INTO public.notes SELECT %(s)s, %(n)s WHERE %(s)s LIKE 'it%%'",
        "params": {"s": text, "n": 3},
    }
    add_job(jobdb, "quoted", "sql", config)
    assert run(jobdb, "quoted").status == "success"
    assert rows(jobdb, "SELECT s, n FROM public.notes") == [{"s": text, "n": 3}]
    add_job(
        jobdb,
        "positional",
        "sql",
        {"statement": "INSERT INTO public.notes VALUES (%s, %s)", "params": ["a", 1]},
    )
    assert run(jobdb, "positional").status == "success"
    assert one(jobdb, "SELECT count(*) FROM public.notes") == 2


def test_a_procedure_that_commits_runs_on_another_database(
    jobdb: str, empty_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    execute(
        empty_db,
        """CREATE TABLE batches (n int);
           CREATE PROCEDURE load_in_batches() LANGUAGE plpgsql AS $$
           BEGIN
             FOR i IN 1..3 LOOP
               INSERT INTO batches VALUES (i);
               COMMIT;
             END LOOP;
           END $$""",
    )
    monkeypatch.setenv("OTHER_DSN", empty_db)
    add_job(jobdb, "batches", "sql", {"statement": "CALL load_in_batches()", "dsn": {"env": "OTHER_DSN"}})
    outcome = run(jobdb, "batches")
    assert outcome.status == "success", rows(jobdb, "SELECT message FROM syncworker.sync_errors")
    assert one(empty_db, "SELECT count(*) FROM batches") == 3
    # A dry run still rolls back (and so cannot run a procedure that commits).
    add_job(
        jobdb,
        "remote-insert",
        "sql",
        {"statement": "INSERT INTO batches VALUES (9)", "dsn": {"env": "OTHER_DSN"}},
    )
    assert run(jobdb, "remote-insert", dry_run=True).result.records_processed == 1
    assert one(empty_db, "SELECT count(*) FROM batches") == 3


@pytest.mark.parametrize(
    "ending",
    [
        "COMMIT",
        "ROLLBACK",
        "END",
        "COMMIT; BEGIN",
        "ROLLBACK; BEGIN",
        "ABORT; START TRANSACTION",
        "SAVEPOINT s; ROLLBACK; BEGIN",
    ],
)
def test_a_statement_that_ends_the_runs_transaction_disables_its_job(
    jobdb: str, ending: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the control database the statement runs in the run's transaction, so that its work
    commits with the run's record (and not at all if the run is fenced).  One that ends that
    transaction itself breaks the promise: the job is disabled with the reason, once."""
    add_job(
        jobdb,
        "ends",
        "sql",
        {"statement": f"INSERT INTO public.ticks DEFAULT VALUES; {ending}"},
        interval_seconds=60,
    )
    assert run(jobdb, "ends").status == "failed"
    row = rows(jobdb, "SELECT enabled, disabled_reason, last_error FROM syncworker.integrations")[0]
    assert row["enabled"] is False and "ended the run's transaction" in row["disabled_reason"]
    assert one(jobdb, "SELECT error_type FROM syncworker.sync_errors") == "config_invalid"
    # With a dsn (here the same database) it is the statement's own business.
    execute(
        jobdb,
        "UPDATE syncworker.integrations SET enabled = true, disabled_reason = NULL, config = %s",
        (
            '{"statement": "INSERT INTO public.ticks DEFAULT VALUES; COMMIT; '
            'INSERT INTO public.ticks DEFAULT VALUES", "dsn": {"env": "SELF_DSN"}}',
        ),
    )
    monkeypatch.setenv("SELF_DSN", jobdb)
    assert run(jobdb, "ends").status == "success"
    committed = ending.startswith(("COMMIT", "END"))  # the first run's INSERT, apart from its run
    assert one(jobdb, "SELECT count(*) FROM public.ticks") == 2 + committed


def test_a_rollback_to_a_savepoint_is_the_statements_own_business(jobdb: str) -> None:
    statement = (
        "INSERT INTO public.ticks DEFAULT VALUES; SAVEPOINT s; INSERT INTO public.ticks DEFAULT VALUES; "
        "ROLLBACK TO SAVEPOINT s; INSERT INTO public.ticks DEFAULT VALUES; RELEASE s"
    )
    add_job(jobdb, "partial", "sql", {"statement": statement}, interval_seconds=60)
    assert run(jobdb, "partial").status == "success"
    assert one(jobdb, "SELECT count(*) FROM public.ticks") == 2
