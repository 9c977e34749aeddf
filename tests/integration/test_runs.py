"""What one run does to the job's row, its history and its errors (runs through `run-once`)."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

import psycopg
import pytest

from helpers import add_job, execute, one, rows, wait_for
from worker.run.once import OneShotError, run_once


def py(callable_: str, **options: object) -> dict[str, object]:
    return {"callable": callable_, "options": options}


def run(url: str, name: str, dry_run: bool = False, local_check: bool = True):
    return asyncio.run(run_once(url, name, dry_run=dry_run, local_check=local_check))


def job(url: str, name: str) -> dict[str, object]:
    return rows(url, "SELECT * FROM syncworker.integrations WHERE name = %s", (name,))[0]


# The claim and finish_run parameters of a session playing the runner by hand (run_id and
# unlock, durable are the caller's).
CLAIM_ONE = {"limit": 1, "locks": 1, "worker_id": None, "announce": False}
SUCCEEDED = {
    "status": "success",
    "error_type": None,
    "error": None,
    "state": None,
    "retry_count": 0,
    "disabled_reason": None,
    "next_sync_at": None,
    "slot": None,
    "scheduled_sync_at": None,
    **dict.fromkeys(("records_processed", "records_failed", "records_inserted"), 0),
    **dict.fromkeys(("records_updated", "records_deleted"), 0),
}


def test_sql_job_success_records_the_run_and_reschedules_on_its_grid(jobdb: str) -> None:
    add_job(
        jobdb,
        "tick",
        "sql",
        {"statement": "INSERT INTO public.ticks DEFAULT VALUES"},
        interval_seconds=3600,
        next_sync_at="2026-01-01T00:00:00Z",
    )
    outcome = run(jobdb, "tick")
    assert outcome.status == "success"
    row = job(jobdb, "tick")
    assert row["last_status"] == "success" and row["retry_count"] == 0 and row["running_run_id"] is None
    assert row["last_success_at"] is not None
    # Slots stay on the grid the schedule started on: whole hours after 2026-01-01 00:00.
    nxt = row["next_sync_at"]
    assert nxt.minute == 0 and nxt.second == 0 and nxt.microsecond == 0
    assert timedelta(0) < nxt - row["last_sync_at"] <= timedelta(hours=1)
    run_row = rows(jobdb, "SELECT * FROM syncworker.sync_runs")[0]
    assert run_row["status"] == "success" and run_row["trigger"] == "manual"
    assert run_row["records_processed"] == 1 and run_row["duration_ms"] is not None
    assert one(jobdb, "SELECT count(*) FROM public.ticks") == 1


def test_sql_statement_and_run_record_commit_together(jobdb: str) -> None:
    add_job(jobdb, "half", "sql", {"statement": "INSERT INTO public.ticks (id) VALUES (1), (1)"})
    outcome = run(jobdb, "half")
    assert outcome.status == "failed"
    assert one(jobdb, "SELECT count(*) FROM public.ticks") == 0
    err = rows(jobdb, "SELECT error_type, message FROM syncworker.sync_errors")[0]
    assert err["error_type"] == "sql_error" and "duplicate key" in err["message"]


def test_python_job_sync_function_updates_state(jobdb: str) -> None:
    add_job(jobdb, "counter", "python", py("jobs:count_up"))
    run(jobdb, "counter")
    run(jobdb, "counter")
    assert job(jobdb, "counter")["state"] == {"n": 2}
    assert one(jobdb, "SELECT sum(records_processed) FROM syncworker.sync_runs") == 6


def test_record_errors_make_a_partial_run_and_are_kept_with_their_keys(jobdb: str) -> None:
    add_job(jobdb, "orders", "python", py("jobs:some_records_fail"))
    assert run(jobdb, "orders").status == "partial"
    errs = rows(
        jobdb, "SELECT record_key, error_type, message, run_id FROM syncworker.sync_errors ORDER BY id"
    )
    assert [e["record_key"] for e in errs] == ["order-17", "order-23"]
    assert all(e["error_type"] == "record_invalid" and e["run_id"] for e in errs)
    assert job(jobdb, "orders")["state"] == {"cursor": "c10"}
    assert one(jobdb, "SELECT records_failed FROM syncworker.sync_runs") == 2


def test_failures_back_off_exponentially_then_disable_with_an_alert(jobdb: str) -> None:
    add_job(
        jobdb,
        "flaky",
        "python",
        py("jobs:fail", message="upstream said no"),
        interval_seconds=60,
        max_retries=2,
        retry_backoff_seconds=100,
    )
    with psycopg.connect(jobdb, autocommit=True) as listener:
        listener.execute("LISTEN syncworker_alerts")
        delays = []
        for _ in range(2):
            run(jobdb, "flaky")
            row = job(jobdb, "flaky")
            delays.append((row["next_sync_at"] - row["last_sync_at"]).total_seconds())
        assert 80 <= delays[0] <= 120  # 100 s ± 20 % jitter
        assert 160 <= delays[1] <= 240  # doubled
        assert job(jobdb, "flaky")["retry_count"] == 2 and job(jobdb, "flaky")["enabled"]
        run(jobdb, "flaky")
        row = job(jobdb, "flaky")
        assert not row["enabled"] and row["retry_count"] == 3
        assert (
            "3 failures in a row" in row["disabled_reason"] and "upstream said no" in row["disabled_reason"]
        )
        alerts = list(listener.notifies(timeout=2, stop_after=1))
    payload = json.loads(alerts[0].payload)
    assert payload["integration"] == "flaky" and "upstream said no" in payload["reason"]
    assert [r["trigger"] for r in rows(jobdb, "SELECT trigger FROM syncworker.sync_runs ORDER BY id")] == [
        "manual",
        "manual",
        "manual",
    ]


def test_a_success_resets_the_retry_count(jobdb: str) -> None:
    add_job(jobdb, "recovering", "python", py("jobs:fail"), max_retries=5)
    run(jobdb, "recovering")
    assert job(jobdb, "recovering")["retry_count"] == 1
    execute(
        jobdb,
        """UPDATE syncworker.integrations SET config = '{"callable": "jobs:count_up"}'
                      WHERE name = 'recovering'""",
    )
    run(jobdb, "recovering")
    assert job(jobdb, "recovering")["retry_count"] == 0


def test_timeout_cancels_the_run(jobdb: str) -> None:
    add_job(jobdb, "slow", "sql", {"statement": "SELECT pg_sleep(30)"}, timeout_seconds=1)
    outcome = run(jobdb, "slow")
    assert outcome.status == "failed"
    run_row = rows(jobdb, "SELECT error_type, duration_ms FROM syncworker.sync_runs")[0]
    assert run_row["error_type"] == "timeout" and run_row["duration_ms"] < 5000
    # The statement was cancelled on the server too.
    assert (
        one(
            jobdb,
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND query LIKE 'SELECT pg_sleep(30)%%'",
        )
        == 0
    )


@pytest.mark.parametrize(
    ("kind", "config", "expected"),
    [
        ("nope", {}, 'unknown kind "nope"'),
        ("sql", {}, "statement: is required"),
        ("sql", {"statement": 5}, "statement: expected"),
        (
            "sql",
            {"statement": "select 1", "dsn": "postgresql://u:hunter22@h/db"},
            "dsn: expected a secret reference",
        ),
        ("sql", {"statement": "select 1", "colour": "red"}, "colour: unknown setting"),
        ("python", {"callable": "jobs.no_such_module:f"}, "cannot load jobs.no_such_module:f"),
        ("python", {"callable": "jobs:NOT_CALLABLE"}, "is not callable"),
        ("python", {"callable": "just a string"}, 'expected "module:function"'),
    ],
)
def test_invalid_config_fails_the_run_and_disables_the_job(
    jobdb: str, kind: str, config: dict[str, object], expected: str
) -> None:
    add_job(jobdb, "broken", kind, config, interval_seconds=60)
    # As a worker judges it: a module it cannot import is a problem of the job.
    assert run(jobdb, "broken", local_check=False).status == "failed"
    row = job(jobdb, "broken")
    assert not row["enabled"] and expected in row["disabled_reason"]
    err = rows(jobdb, "SELECT error_type, message FROM syncworker.sync_errors")[0]
    assert err["error_type"] == "config_invalid" and expected in err["message"]
    assert "hunter22" not in json.dumps(rows(jobdb, "SELECT * FROM syncworker.sync_errors"), default=str)


def test_bad_return_value_fails_clearly(jobdb: str) -> None:
    add_job(jobdb, "odd", "python", py("jobs:not_a_result"))
    assert run(jobdb, "odd").status == "failed"
    assert "returned int" in job(jobdb, "odd")["last_error"]


def test_sql_job_on_another_database_through_a_secret(
    jobdb: str, empty_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    execute(empty_db, "CREATE TABLE t (x int)")
    monkeypatch.setenv("OTHER_DSN", empty_db)
    add_job(
        jobdb,
        "remote",
        "sql",
        {
            "statement": "INSERT INTO t SELECT generate_series(1, %(n)s)",
            "params": {"n": 5},
            "dsn": {"env": "OTHER_DSN"},
        },
    )
    assert run(jobdb, "remote").status == "success"
    assert one(empty_db, "SELECT count(*) FROM t") == 5
    assert one(jobdb, "SELECT records_processed FROM syncworker.sync_runs") == 5


def test_missing_secret_fails_with_its_name_not_its_value(jobdb: str) -> None:
    add_job(jobdb, "nosecret", "sql", {"statement": "select 1", "dsn": {"env": "SW_TEST_UNSET_DSN"}})
    assert run(jobdb, "nosecret", local_check=False).status == "failed"
    assert "SW_TEST_UNSET_DSN is not set" in job(jobdb, "nosecret")["last_error"]


def test_dry_run_writes_nothing(jobdb: str) -> None:
    add_job(jobdb, "tick", "sql", {"statement": "INSERT INTO public.ticks DEFAULT VALUES"})
    outcome = run(jobdb, "tick", dry_run=True)
    assert outcome.status is None and outcome.result.records_processed == 1
    assert one(jobdb, "SELECT count(*) FROM public.ticks") == 0
    assert one(jobdb, "SELECT count(*) FROM syncworker.sync_runs") == 0


def test_run_once_refuses_unknown_names_and_running_jobs(jobdb: str) -> None:
    with pytest.raises(OneShotError, match='no integration named "ghost"'):
        run(jobdb, "ghost")
    job_id = add_job(jobdb, "busy", "sql", {"statement": "select 1"})
    with psycopg.connect(jobdb, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(syncworker.lock_key('integration'), %s)", (job_id,))
        with pytest.raises(OneShotError, match="running on a worker"):
            run(jobdb, "busy")


def test_a_run_that_is_no_longer_live_commits_nothing(jobdb: str) -> None:
    add_job(jobdb, "usurped", "python", py("jobs:abandoned_midway", url=jobdb), state={"kept": True})
    assert run(jobdb, "usurped").status == "abandoned"
    assert one(jobdb, "SELECT count(*) FROM public.job_rows") == 0
    row = job(jobdb, "usurped")
    assert row["state"] == {"kept": True} and row["pending_trigger"] == "rescue"
    assert one(jobdb, "SELECT status FROM syncworker.sync_runs") == "abandoned"


def test_run_once_wakes_the_leader_as_its_run_starts(jobdb: str) -> None:
    add_job(jobdb, "manual", "sql", {"statement": "SELECT 1"})
    with psycopg.connect(jobdb, autocommit=True) as listener:
        listener.execute("LISTEN syncworker")
        assert run(jobdb, "manual").status == "success"
        started = [n for n in listener.notifies(timeout=0.5) if "runs_started" in n.payload]
    assert len(started) == 1


def test_a_fence_has_its_own_sqlstate_and_a_serialization_failure_is_not_one(jobdb: str) -> None:
    from worker.connectors.base import FENCED_SQLSTATE, is_fence

    with psycopg.connect(jobdb, autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as fenced:
            conn.execute("SELECT syncworker.fenced(1)")
        with pytest.raises(psycopg.errors.SerializationFailure) as conflict:
            conn.execute(
                "DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = 'serialization_failure'; END $$"
            )
    assert fenced.value.sqlstate == FENCED_SQLSTATE and is_fence(fenced.value)
    assert not is_fence(conflict.value)


def test_a_run_finished_but_not_yet_committed_is_not_rescued(db: str) -> None:
    """The finish releases the run's lock before its transaction commits: a rescuer that looks
    in between finds the run without its lock, waits on the rows the finish holds, and then
    finds the run over.  Nothing is abandoned, the run is a success."""
    import threading

    from psycopg.rows import dict_row

    from worker.db.queries import Q

    add_job(db, "quick", "sql", {"statement": "SELECT 1"}, interval_seconds=3600)
    claim, done = CLAIM_ONE, SUCCEEDED
    found: dict[str, int] = {}
    with psycopg.connect(db, autocommit=True) as runner, psycopg.connect(db, autocommit=True) as rescuer:
        run_id = runner.cursor(row_factory=dict_row).execute(Q["claim"], claim).fetchall()[0]["run_id"]
        runner.execute("BEGIN")
        runner.execute(Q["finish_run"], {**done, "run_id": run_id, "unlock": True, "durable": True})
        held = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = %s"
        assert one(db, held, [runner.info.backend_pid]) == 0

        def rescue() -> None:
            found["rescued"] = rescuer.execute(Q["rescue_abandoned"], {}).fetchone()[0]

        looking = threading.Thread(target=rescue)
        looking.start()
        pid = rescuer.info.backend_pid
        wait_for(
            lambda: one(db, "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", [pid]) == "Lock",
            what="the rescuer to wait on the finishing run's rows",
        )
        runner.execute("COMMIT")
        looking.join(10)
    assert found == {"rescued": 0}
    assert rows(db, "SELECT status FROM syncworker.sync_runs") == [{"status": "success"}]


def test_a_finish_waits_for_the_wal_flush_only_when_its_run_reached_outside(db: str) -> None:
    """The worker's sessions commit their bookkeeping without waiting for the WAL flush; a
    finish makes its own commit durable when asked (a run whose effects are not all in its
    transaction), and leaves it alone otherwise (a crash would lose the run's effects with its
    record, and the job would run again)."""
    from psycopg.rows import dict_row

    from worker.connectors import get
    from worker.db.queries import Q

    claim, done = CLAIM_ONE, SUCCEEDED
    settings: dict[bool, str] = {}
    for durable in (False, True):
        add_job(db, f"job-{durable}", "sql", {"statement": "SELECT 1"}, interval_seconds=3600)
        with psycopg.connect(db, autocommit=True, options="-c synchronous_commit=off") as conn:
            run_id = conn.cursor(row_factory=dict_row).execute(Q["claim"], claim).fetchall()[0]["run_id"]
            conn.execute("BEGIN")
            conn.execute(Q["finish_run"], {**done, "run_id": run_id, "unlock": True, "durable": durable})
            settings[durable] = conn.execute("SELECT current_setting('synchronous_commit')").fetchone()[0]
            conn.execute("COMMIT")
    assert settings == {False: "off", True: "on"}
    assert one(db, "SELECT count(*) FROM syncworker.sync_runs WHERE status = 'success'") == 2

    # Which runs do without: a sql job on the control database, nothing else.
    sql = get("sql")
    assert sql.contained(sql.validate({"statement": "SELECT 1"}))
    assert not sql.contained(sql.validate({"statement": "SELECT 1", "dsn": {"env": "OTHER_DSN"}}))
    python = get("python")
    assert not python.contained(python.validate({"callable": "jobs:count_up"}))
