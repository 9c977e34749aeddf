"""Many jobs due at once: each run session claims its next job as it finishes the last one.

These tests drive real worker processes through bursts and check what a user sees
afterwards: every job ran exactly once, failures stayed failures, and neither a crash
(SIGKILL) nor a shutdown (SIGTERM) in the middle of a burst leaves a run behind.
"""

from __future__ import annotations

import time
from pathlib import Path

import psycopg
import pytest

from helpers import WorkerProcess, add_job, execute, one, rows, wait_for, workers
from worker.run.runner import MAX_BATCH

pytestmark = pytest.mark.e2e


def add_burst(url: str, count: int, statement: str = "INSERT INTO public.ticks DEFAULT VALUES") -> None:
    """`count` manual-only jobs, all due now."""
    execute(
        url,
        """INSERT INTO syncworker.integrations (name, kind, config, next_sync_at)
           SELECT 'burst' || g, 'sql', jsonb_build_object('statement', %s::text), now()
             FROM generate_series(1, %s) g""",
        (statement, count),
    )


def successes(url: str) -> int:
    return int(one(url, "SELECT count(*) FROM syncworker.sync_runs WHERE status = 'success'"))


def runs_per_job(url: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for row in rows(
        url,
        """SELECT i.name, r.status FROM syncworker.integrations i
             LEFT JOIN syncworker.sync_runs r ON r.integration_id = i.id ORDER BY r.id""",
    ):
        found.setdefault(row["name"], []).append(row["status"])
    return found


def test_a_burst_on_two_replicas_runs_every_job_exactly_once(jobdb: str, tmp_path: Path) -> None:
    add_burst(jobdb, 600)
    for i in range(5):
        add_job(jobdb, f"broken{i}", "sql", {"statement": "SELECT 1/0"}, next_sync_at="now")
    with workers(jobdb, tmp_path, 2):
        wait_for(lambda: successes(jobdb) >= 600, timeout=60, what="600 successful runs")
        wait_for(
            lambda: one(jobdb, "SELECT count(*) FROM syncworker.sync_runs WHERE status = 'failed'") >= 5,
            timeout=10,
            what="the 5 failures",
        )
        # A second run of a job would be claimed at once (they are due now); half a second
        # is many claims' time, and short enough to keep.
        time.sleep(0.5)
    per_job = runs_per_job(jobdb)
    assert all(per_job[f"burst{i}"] == ["success"] for i in range(1, 601))
    assert all(per_job[f"broken{i}"] == ["failed"] for i in range(5))
    assert one(jobdb, "SELECT count(*) FROM public.ticks") == 600
    # Both replicas took part, every run took its lock, and nothing is left running.
    assert one(jobdb, "SELECT count(DISTINCT worker_id) FROM syncworker.sync_runs") == 2
    assert one(jobdb, "SELECT count(*) FROM syncworker.sync_runs WHERE locked_at IS NULL") == 0
    assert one(jobdb, "SELECT count(*) FROM syncworker.integrations WHERE running_run_id IS NOT NULL") == 0
    failed = rows(
        jobdb, "SELECT retry_count, last_status FROM syncworker.integrations WHERE name LIKE 'broken%'"
    )
    assert all(r["retry_count"] == 1 and r["last_status"] == "failed" for r in failed)


def test_sigkill_mid_burst_loses_no_job_and_runs_none_twice(jobdb: str, tmp_path: Path) -> None:
    add_burst(jobdb, 300, "INSERT INTO public.ticks DEFAULT VALUES RETURNING pg_sleep(0.01)")
    victim = WorkerProcess(jobdb, tmp_path / "victim.log", "--concurrency", "4")
    try:
        wait_for(lambda: successes(jobdb) >= 40, timeout=30, what="the burst to be under way")
        victim.kill()
    finally:
        victim.stop()
    in_flight = one(jobdb, "SELECT count(*) FROM syncworker.sync_runs WHERE status = 'running'")
    # At most one started run per run session; the others each session claimed ahead wait
    # without their lock (and never ran).
    started = "SELECT count(*) FROM syncworker.sync_runs WHERE status = 'running' AND locked_at IS NOT NULL"
    assert one(jobdb, started) <= 4
    with workers(jobdb, tmp_path, 1):
        wait_for(
            lambda: (
                one(
                    jobdb,
                    """SELECT count(*) FROM syncworker.integrations
                    WHERE last_status = 'success' AND running_run_id IS NULL""",
                )
                == 300
            ),
            timeout=60,
            what="every job to have succeeded",
        )
    per_job = runs_per_job(jobdb)
    assert all(statuses.count("success") == 1 for statuses in per_job.values())
    assert one(jobdb, "SELECT count(*) FROM syncworker.sync_runs WHERE status = 'abandoned'") == in_flight
    assert one(jobdb, "SELECT count(*) FROM syncworker.sync_runs WHERE status = 'running'") == 0
    # The killed runs rolled back with their sessions: one row per success.
    assert one(jobdb, "SELECT count(*) FROM public.ticks") == 300


def test_sigterm_mid_burst_finishes_what_runs_and_claims_nothing_more(jobdb: str, tmp_path: Path) -> None:
    add_burst(jobdb, 2000, "INSERT INTO public.ticks DEFAULT VALUES RETURNING pg_sleep(0.005)")
    proc = WorkerProcess(jobdb, tmp_path / "w.log", "--concurrency", "4", "--grace-period", "20")
    try:
        wait_for(lambda: successes(jobdb) >= 40, timeout=30, what="the burst to be under way")
        assert proc.terminate() == 0
    finally:
        proc.stop()
    done = successes(jobdb)
    assert done < 2000, "the burst should still have been under way"
    assert one(jobdb, "SELECT count(*) FROM syncworker.sync_runs WHERE status <> 'success'") == 0
    assert one(jobdb, "SELECT count(*) FROM syncworker.integrations WHERE running_run_id IS NOT NULL") == 0
    # What did not run is still due, untouched, for the next worker.
    assert one(jobdb, "SELECT count(*) FROM syncworker.integrations WHERE last_status IS NULL") == 2000 - done
    assert one(jobdb, "SELECT count(*) FROM public.ticks") == done


def test_a_burst_wakes_the_leader_once_not_once_per_run(jobdb: str, tmp_path: Path) -> None:
    with psycopg.connect(jobdb, autocommit=True) as listener:
        listener.execute("LISTEN syncworker")
        with workers(jobdb, tmp_path, 1):
            wait_for(lambda: one(jobdb, "SELECT count(*) FROM syncworker.workers"), what="the worker")
            add_burst(jobdb, 300)
            wait_for(lambda: successes(jobdb) >= 300, timeout=60, what="300 successful runs")
        started = [n for n in listener.notifies(timeout=1) if "runs_started" in n.payload]
    # The worker announces when it starts running while none of its runs ran: for one
    # burst that is once (a few times if its sessions all ran dry for a moment).
    assert 1 <= len(started) <= 10


def test_a_burst_of_20000_over_three_replicas_with_one_killed_runs_every_job_exactly_once(
    jobdb: str, tmp_path: Path
) -> None:
    """ "Every integration on the hour": 20,000 rows due in the same second, three replicas,
    one SIGKILLed mid-burst.  Every job's work commits exactly once, with one successful run."""
    total = 20_000
    add_burst(jobdb, total, "INSERT INTO public.job_rows (run_id) VALUES (1)")
    with workers(jobdb, tmp_path, 3) as (victim, *survivors):
        wait_for(lambda: successes(jobdb) >= total // 4, timeout=120, what="a quarter of the burst done")
        victim.kill()
        killed_at = successes(jobdb)
        assert killed_at < total, "the burst was over before the kill: make it bigger"
        wait_for(
            lambda: (
                one(
                    jobdb,
                    "SELECT count(*) FROM syncworker.integrations "
                    "WHERE last_status = 'success' AND running_run_id IS NULL",
                )
                == total
            ),
            timeout=240,
            interval=0.5,
            what="every job to have succeeded",
        )
        for p in survivors:
            assert p.proc.poll() is None, p.output()[-3000:]
    counts = rows(
        jobdb,
        """SELECT count(*) FILTER (WHERE status = 'success') AS ok,
                  count(DISTINCT integration_id) FILTER (WHERE status = 'success') AS jobs,
                  count(*) FILTER (WHERE status = 'abandoned') AS abandoned,
                  count(*) FILTER (WHERE status = 'running') AS running,
                  count(*) FILTER (WHERE status NOT IN ('success', 'abandoned', 'running')) AS other
             FROM syncworker.sync_runs""",
    )[0]
    assert counts == {"ok": total, "jobs": total, "abandoned": counts["abandoned"], "running": 0, "other": 0}
    # The killed replica's runs in flight: at most one started per session; the ones its
    # sessions had claimed ahead never started, and count toward no job's max_abandons.
    never_started = one(
        jobdb,
        "SELECT count(*) FROM syncworker.sync_runs "
        "WHERE status = 'abandoned' AND error LIKE '%before the run started'",
    )
    assert counts["abandoned"] - never_started <= 4
    assert never_started <= 4 * MAX_BATCH
    assert one(jobdb, "SELECT max(abandon_count) FROM syncworker.integrations") <= 1
    # The work of the killed runs rolled back with their sessions: one row per job.
    assert one(jobdb, "SELECT count(*) FROM public.job_rows") == total


def test_a_runs_bookkeeping_calls_no_trigger_function(jobdb: str, tmp_path: Path) -> None:
    """Claims and finishes are the worker's own writes: no trigger's plpgsql runs for them
    (the checks of what people write, the wake-ups of what people change)."""
    database = one(jobdb, "SELECT current_database()")
    execute(jobdb, f"ALTER DATABASE \"{database}\" SET track_functions = 'all'")
    add_burst(jobdb, 300)
    add_job(jobdb, "hourly", "sql", {"statement": "SELECT 1"}, interval_seconds=3600)
    add_job(jobdb, "failing", "sql", {"statement": "SELECT 1/0"}, interval_seconds=3600)
    execute(jobdb, "SELECT pg_stat_reset()")
    with workers(jobdb, tmp_path, 1):
        wait_for(lambda: successes(jobdb) >= 301, timeout=60, what="every job to have run")
        wait_for(
            lambda: one(jobdb, "SELECT count(*) FROM syncworker.sync_runs WHERE status = 'failed'") >= 1,
            what="the failing job to have failed",
        )
    # The worker's sessions have ended: their statistics are in.
    called = rows(
        jobdb,
        """SELECT s.funcname, s.calls FROM pg_stat_user_functions s JOIN pg_proc p ON p.oid = s.funcid
            WHERE s.schemaname = 'syncworker' AND s.calls > 0 AND p.prorettype = 'trigger'::regtype
            ORDER BY 1""",
    )
    assert called == []


def test_a_run_session_keeps_its_prepared_statements_from_run_to_run(jobdb: str, tmp_path: Path) -> None:
    """Triggered one at a time, each run ends its session's chain (its claim of a next job finds
    nothing).  The session must keep the statements it prepared: a session that forgot them
    would parse and plan the claim and the finish again for every run."""
    execute(jobdb, "CREATE TABLE public.seen (id bigserial PRIMARY KEY, prepared int)")
    probe = (
        "INSERT INTO public.seen (prepared) SELECT count(*) FROM pg_prepared_statements"
        " WHERE statement LIKE '%syncworker.sync_runs%'"
    )
    add_job(jobdb, "probe", "sql", {"statement": probe})
    worker = WorkerProcess(jobdb, tmp_path / "worker.log", "--concurrency", "1")
    try:
        for i in range(1, 13):
            execute(jobdb, "SELECT syncworker.trigger_sync('probe')")
            wait_for(lambda i=i: successes(jobdb) >= i, timeout=20, what=f"run {i}")
    finally:
        worker.terminate()
    seen = [r["prepared"] for r in rows(jobdb, "SELECT prepared FROM public.seen ORDER BY id")]
    assert len(seen) == 12
    # The session prepares the start of a run, the finish and the claim with its first run.
    assert min(seen) >= 3, seen
