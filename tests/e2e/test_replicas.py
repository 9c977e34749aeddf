"""Real `syncworker run` processes: sharing work, crashes (SIGKILL), failover, shutdown, reconnects."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import psycopg
import pytest

from helpers import (
    WorkerProcess,
    add_job,
    create_database,
    drop_database,
    execute,
    one,
    rows,
    wait_for,
    worker_env,
    workers,
)

pytestmark = pytest.mark.e2e


def py(callable_: str, **options: object) -> dict[str, object]:
    return {"callable": callable_, "options": options}


def starts(url: str, name: str) -> list[dict[str, object]]:
    return rows(
        url,
        "SELECT run_id, pid, at FROM public.job_events WHERE integration = %s AND event = 'start' "
        "ORDER BY id",
        (name,),
    )


def terminate_integration_lock_holders(url: str) -> int:
    """Terminate the sessions of this database (only) that hold an integration lock; return how many."""
    return int(
        one(
            url,
            """SELECT count(pg_terminate_backend(l.pid)) FROM pg_locks l
                WHERE l.locktype = 'advisory' AND l.classid = syncworker.lock_key('integration')
                  AND l.granted
                  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())""",
        )
    )


def test_terminating_lock_holders_spares_other_databases(jobdb: str) -> None:
    other_name, other_url = create_database()
    try:
        key = one(jobdb, "SELECT syncworker.lock_key('integration')")
        with (
            psycopg.connect(jobdb, autocommit=True) as ours,
            psycopg.connect(other_url, autocommit=True) as theirs,
        ):
            ours.execute("SELECT pg_advisory_lock(%s, 1)", (key,))
            theirs.execute("SELECT pg_advisory_lock(%s, 1)", (key,))
            assert terminate_integration_lock_holders(jobdb) == 1
            with pytest.raises(psycopg.OperationalError):
                ours.execute("SELECT 1")
            # The unrelated database's session is alive and still holds its lock.
            held = theirs.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND classid = %s AND objid = 1 AND pid = pg_backend_pid()",
                (key,),
            ).fetchone()
            assert held == (1,)
    finally:
        drop_database(other_name)


def test_replicas_share_work_and_never_overlap_runs_of_one_job(jobdb: str, tmp_path: Path) -> None:
    for i in range(12):
        add_job(jobdb, f"job{i}", "sql", {"statement": "SELECT pg_sleep(0.05)"}, interval_seconds=1)
    with workers(jobdb, tmp_path, 3, "--concurrency", "2"):
        wait_for(
            lambda: one(jobdb, "SELECT count(*) FROM syncworker.sync_runs WHERE status = 'success'") >= 60,
            timeout=30,
            what="60 successful runs",
        )
    overlaps = one(
        jobdb,
        """
        SELECT count(*) FROM syncworker.sync_runs a JOIN syncworker.sync_runs b
          ON a.integration_id = b.integration_id AND a.id < b.id
         WHERE tstzrange(a.started_at, coalesce(a.finished_at, 'infinity'))
            && tstzrange(b.started_at, coalesce(b.finished_at, 'infinity'))""",
    )
    assert overlaps == 0
    assert one(jobdb, "SELECT count(DISTINCT worker_id) FROM syncworker.sync_runs") >= 2
    assert (
        one(jobdb, "SELECT count(*) FROM syncworker.sync_runs WHERE status NOT IN ('success', 'running')")
        == 0
    )


def test_sigkill_mid_run_abandons_the_run_and_reruns_it_elsewhere_within_5s(
    jobdb: str, tmp_path: Path
) -> None:
    add_job(jobdb, "long", "python", py("jobs:sleep", seconds=60))
    with workers(jobdb, tmp_path, 2) as procs:
        first = wait_for(lambda: starts(jobdb, "long"), timeout=15, what="the first run to start")[0]
        victim = next(p for p in procs if p.pid == first["pid"])
        victim.kill()
        killed_at = time.monotonic()
        second = wait_for(lambda: starts(jobdb, "long")[1:], timeout=10, what="the rerun")[0]
        assert time.monotonic() - killed_at < 5
        assert second["pid"] != first["pid"]
    run1, run2 = rows(jobdb, "SELECT status, trigger FROM syncworker.sync_runs ORDER BY id")[:2]
    assert run1["status"] == "abandoned" and run2["trigger"] == "rescue"
    assert one(jobdb, "SELECT count(*) FROM syncworker.sync_errors WHERE error_type = 'abandoned'") == 1


def test_lost_session_is_fenced_nothing_of_the_run_commits(jobdb: str, tmp_path: Path) -> None:
    add_job(jobdb, "fenced", "python", py("jobs:write_then_sleep", seconds=3), state={"last_run": 0})
    with workers(jobdb, tmp_path, 1):
        first = wait_for(lambda: starts(jobdb, "fenced"), timeout=15, what="the run to start")[0]
        # Cut the run's own session (the one holding the integration lock), as a network cut would.
        assert terminate_integration_lock_holders(jobdb) == 1
        wait_for(
            lambda: one(jobdb, "SELECT count(*) FROM syncworker.sync_runs WHERE status = 'success'"),
            timeout=20,
            what="a successful rerun",
        )
    statuses = [r["status"] for r in rows(jobdb, "SELECT status FROM syncworker.sync_runs ORDER BY id")]
    assert statuses[0] == "abandoned"
    # The cut run wrote nothing and its state never landed; the rerun's did.
    assert one(jobdb, "SELECT count(*) FROM public.job_rows WHERE run_id = %s", (first["run_id"],)) == 0
    good = one(jobdb, "SELECT id FROM syncworker.sync_runs WHERE status = 'success'")
    assert one(jobdb, "SELECT count(*) FROM public.job_rows WHERE run_id = %s", (good,)) == 2
    assert one(jobdb, "SELECT state FROM syncworker.integrations") == {"last_run": good}


def test_single_mode_only_the_leader_runs_and_a_standby_takes_over_within_5s(
    jobdb: str, tmp_path: Path
) -> None:
    add_job(
        jobdb, "beat", "sql", {"statement": "INSERT INTO public.ticks DEFAULT VALUES"}, interval_seconds=1
    )
    with workers(jobdb, tmp_path, 2, "--mode", "single") as procs:
        wait_for(
            lambda: one(jobdb, "SELECT count(*) FROM syncworker.sync_runs") >= 3,
            timeout=15,
            what="runs on the leader",
        )
        leader_pid = one(jobdb, "SELECT pid FROM syncworker.workers WHERE leader AND stopped_at IS NULL")
        runners = rows(
            jobdb,
            "SELECT DISTINCT w.pid FROM syncworker.sync_runs r "
            "JOIN syncworker.workers w ON w.id = r.worker_id",
        )
        assert [r["pid"] for r in runners] == [leader_pid]
        next(p for p in procs if p.pid == leader_pid).kill()
        killed_at = time.monotonic()
        wait_for(
            lambda: one(
                jobdb,
                "SELECT count(*) FROM syncworker.sync_runs r JOIN syncworker.workers w "
                "ON w.id = r.worker_id WHERE w.pid <> %s AND r.status = 'success'",
                (leader_pid,),
            ),
            timeout=10,
            what="a run on the standby",
        )
        assert time.monotonic() - killed_at < 5


def test_sigterm_lets_a_short_run_finish_and_exits_0(jobdb: str, tmp_path: Path) -> None:
    add_job(jobdb, "short", "python", py("jobs:sleep", seconds=1.5))
    proc = WorkerProcess(jobdb, tmp_path / "w.log", "--grace-period", "20")
    try:
        wait_for(lambda: starts(jobdb, "short"), timeout=15, what="the run to start")
        assert proc.terminate() == 0
        assert one(jobdb, "SELECT status FROM syncworker.sync_runs") == "success"
        assert one(jobdb, "SELECT stopped_at IS NOT NULL FROM syncworker.workers")
    finally:
        proc.stop()


def test_sigterm_cancels_after_the_grace_period_and_hands_the_job_back(jobdb: str, tmp_path: Path) -> None:
    add_job(jobdb, "stuck", "python", py("jobs:sleep", seconds=120), interval_seconds=3600)
    proc = WorkerProcess(jobdb, tmp_path / "w.log", "--grace-period", "1")
    try:
        wait_for(lambda: starts(jobdb, "stuck"), timeout=15, what="the run to start")
        began = time.monotonic()
        assert proc.terminate(timeout=20) == 0
        assert time.monotonic() - began < 10
    finally:
        proc.stop()
    run = rows(jobdb, "SELECT status, error FROM syncworker.sync_runs")[0]
    assert run["status"] == "abandoned" and "shut down" in run["error"]
    job = rows(jobdb, "SELECT next_sync_at <= now() AS due, running_run_id FROM syncworker.integrations")[0]
    assert job["due"] and job["running_run_id"] is None


def test_a_second_signal_exits_at_once(jobdb: str, tmp_path: Path) -> None:
    add_job(jobdb, "stuck", "python", py("jobs:sleep", seconds=120))
    proc = WorkerProcess(jobdb, tmp_path / "w.log", "--grace-period", "60")
    try:
        wait_for(lambda: starts(jobdb, "stuck"), timeout=15, what="the run to start")
        proc.proc.send_signal(15)
        wait_for(lambda: "SIGTERM received" in proc.output(), what="the first signal to be taken")
        proc.proc.send_signal(15)
        assert proc.proc.wait(5) != 0
    finally:
        proc.stop()


def test_trigger_during_a_run_gives_exactly_one_follow_up(jobdb: str, tmp_path: Path) -> None:
    add_job(jobdb, "once", "python", py("jobs:sleep", seconds=1.5), next_sync_at=None)
    with workers(jobdb, tmp_path, 2):
        wait_for(lambda: one(jobdb, "SELECT count(*) FROM syncworker.workers") == 2, what="workers")
        assert one(jobdb, "SELECT syncworker.trigger_sync('once')") == "queued"
        wait_for(lambda: starts(jobdb, "once"), timeout=10, what="the run to start")
        for _ in range(3):
            assert "one more run will follow" in one(jobdb, "SELECT syncworker.trigger_sync('once')")
        wait_for(
            lambda: one(jobdb, "SELECT count(*) FROM syncworker.sync_runs WHERE status = 'success'") == 2,
            timeout=15,
            what="two runs",
        )
        # Nothing is left to start a third run: no trigger kept, no due time, no run going.
        settled = rows(
            jobdb, "SELECT pending_trigger, next_sync_at, running_run_id FROM syncworker.integrations"
        )
        assert settled == [{"pending_trigger": None, "next_sync_at": None, "running_run_id": None}]
    assert one(jobdb, "SELECT count(*) FROM syncworker.sync_runs") == 2
    assert [r["trigger"] for r in rows(jobdb, "SELECT trigger FROM syncworker.sync_runs ORDER BY id")] == [
        "manual",
        "manual",
    ]


def test_insert_wakes_workers_at_once_and_due_times_are_kept(jobdb: str, tmp_path: Path) -> None:
    with workers(jobdb, tmp_path, 1, "--poll-interval", "600"):
        wait_for(lambda: listening(jobdb), what="the worker to listen for wake-ups")
        add_job(jobdb, "now", "sql", {"statement": "select 1"})
        wait_for(
            lambda: one(jobdb, "SELECT count(*) FROM syncworker.sync_runs"),
            timeout=3,
            what="the new job to run without waiting for a poll",
        )
        execute(
            jobdb,
            """INSERT INTO syncworker.integrations (name, kind, config, next_sync_at)
               VALUES ('later', 'sql', '{"statement": "select 1"}', now() + interval '2 seconds')""",
        )
        wait_for(
            lambda: one(
                jobdb,
                "SELECT count(*) FROM syncworker.sync_runs r JOIN syncworker.integrations i "
                "ON i.id = r.integration_id WHERE i.name = 'later'",
            ),
            timeout=6,
            what="the later job",
        )
        lag = one(
            jobdb,
            """SELECT extract(epoch FROM r.started_at - i.created_at)
                 FROM syncworker.sync_runs r JOIN syncworker.integrations i ON i.id = r.integration_id
                WHERE i.name = 'later'""",
        )
        assert 2.0 <= float(lag) < 3.0


def listening(url: str) -> bool:
    """Has a worker's listener session issued its LISTEN (a wake-up now reaches it)?"""
    return bool(
        one(
            url,
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND query LIKE 'LISTEN %%'",
        )
    )


def transactions(url: str) -> int:
    return int(
        one(
            url,
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()",
        )
    )


def test_a_due_job_someone_holds_locked_is_not_polled_hard_and_runs_once_released(
    jobdb: str, tmp_path: Path
) -> None:
    add_job(
        jobdb, "held", "sql", {"statement": "INSERT INTO public.ticks DEFAULT VALUES"}, next_sync_at="now"
    )
    with psycopg.connect(jobdb) as holder:
        holder.execute("SELECT 1 FROM syncworker.integrations WHERE name = 'held' FOR UPDATE")
        proc = WorkerProcess(jobdb, tmp_path / "w.log")
        try:
            wait_for(lambda: listening(jobdb), what="the worker to be up")
            # Start-up's own transactions are reported to pg_stat_database up to a second late:
            # the baseline is taken after that.
            time.sleep(1)
            before = transactions(jobdb)
            # The window in which a worker that looks again every 10 ms would show: it must
            # be long enough for the backed-off looks to count for less than the hard ones.
            time.sleep(4)
            holder.rollback()
            wait_for(
                lambda: one(jobdb, "SELECT count(*) FROM public.ticks"),
                timeout=4,
                what="the job to run soon after its row was released",
            )
            assert proc.terminate() == 0  # its sessions report their statistics as they close
        finally:
            proc.stop()
    # Looking again every 10 ms is ~180 transactions a second (over 700 in those 4 s); what
    # is counted here besides the backed-off looks is the run, start-up statistics that
    # arrive late, and the shutdown.
    assert transactions(jobdb) - before < 300


def test_worker_survives_losing_every_connection(jobdb: str, tmp_path: Path) -> None:
    add_job(
        jobdb, "beat", "sql", {"statement": "INSERT INTO public.ticks DEFAULT VALUES"}, interval_seconds=1
    )
    with workers(jobdb, tmp_path, 1) as (proc,):
        wait_for(lambda: one(jobdb, "SELECT count(*) FROM public.ticks") >= 2, timeout=15, what="ticks")
        execute(
            jobdb,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        cut = one(jobdb, "SELECT count(*) FROM public.ticks")
        wait_for(
            lambda: one(jobdb, "SELECT count(*) FROM public.ticks") >= cut + 3,
            timeout=10,
            what="ticks after the cut",
        )
        assert proc.proc.poll() is None


@pytest.mark.skipif(
    not os.environ.get("SYNCWORKER_TEST_RESTART_POSTGRES"),
    reason="restarts the Postgres server: set SYNCWORKER_TEST_RESTART_POSTGRES=1 (CI does)",
)
def test_worker_resumes_within_10s_after_a_postgres_restart(jobdb: str, tmp_path: Path) -> None:
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    add_job(
        jobdb, "beat", "sql", {"statement": "INSERT INTO public.ticks DEFAULT VALUES"}, interval_seconds=1
    )
    with workers(jobdb, tmp_path, 1) as (proc,):
        wait_for(lambda: one(jobdb, "SELECT count(*) FROM public.ticks") >= 2, timeout=15, what="ticks")
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart", "-m", "fast"],
            check=True,
            timeout=60,
        )
        back = time.monotonic()
        cut = wait_for(lambda: _try_count(jobdb), timeout=30, what="postgres to accept connections")
        wait_for(lambda: (_try_count(jobdb) or 0) >= cut + 1, timeout=10, what="a run after the restart")
        assert time.monotonic() - back < 10
        assert proc.proc.poll() is None


def _try_count(url: str) -> int | None:
    try:
        return int(one(url, "SELECT count(*) FROM public.ticks")) or -1
    except Exception:
        return None


def test_json_logs_carry_integration_and_run_and_no_secrets(jobdb: str, tmp_path: Path) -> None:
    password_url = jobdb.replace("postgres@", "postgres:s3cr3t-pa55@")
    add_job(jobdb, "remote", "sql", {"statement": "select 1", "dsn": {"env": "REMOTE_DSN"}})
    env = worker_env(jobdb, REMOTE_DSN=password_url, SYNCWORKER_LOG_FORMAT="json")
    with workers(jobdb, tmp_path, 1, env=env) as (proc,):
        wait_for(
            lambda: one(jobdb, "SELECT count(*) FROM syncworker.sync_runs WHERE status <> 'running'"),
            timeout=15,
            what="the run",
        )
        proc.terminate()
        output = proc.output()
    lines = [json.loads(line) for line in output.splitlines() if line.strip()]
    run_id = one(jobdb, "SELECT id FROM syncworker.sync_runs")
    run_lines = [line for line in lines if line.get("run_id") == run_id]
    assert run_lines and all(line["integration"] == "remote" for line in run_lines)
    assert {"time", "level", "logger", "message"} <= set(run_lines[0])
    assert "s3cr3t-pa55" not in output


def test_systemd_notify_ready_watchdog_and_stopping(jobdb: str, tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(15)
    env = worker_env(jobdb, NOTIFY_SOCKET=path, WATCHDOG_USEC="400000")
    proc = WorkerProcess(jobdb, tmp_path / "w.log", env=env)
    try:
        messages: list[str] = []
        while not any("READY=1" in m for m in messages):
            messages.append(sock.recv(4096).decode())
        while not any("WATCHDOG=1" in m for m in messages):
            messages.append(sock.recv(4096).decode())
        proc.proc.send_signal(15)
        while not any("STOPPING=1" in m for m in messages):
            messages.append(sock.recv(4096).decode())
        assert proc.proc.wait(20) == 0
    finally:
        proc.stop()
        sock.close()


def test_bad_jobs_fail_alone_and_the_worker_keeps_running_the_rest(jobdb: str, tmp_path: Path) -> None:
    add_job(
        jobdb, "good", "sql", {"statement": "INSERT INTO public.ticks DEFAULT VALUES"}, interval_seconds=1
    )
    add_job(jobdb, "unknown-kind", "ftp", {}, interval_seconds=1)
    add_job(jobdb, "bad-config", "sql", {"statment": "select 1"}, interval_seconds=1)
    add_job(jobdb, "quitter", "python", py("jobs:exits"), interval_seconds=1)
    add_job(jobdb, "raises", "python", py("jobs:fail"), interval_seconds=1, retry_backoff_seconds=1)
    with workers(jobdb, tmp_path, 1) as (proc,):
        wait_for(lambda: one(jobdb, "SELECT count(*) FROM public.ticks") >= 4, timeout=20, what="good runs")
        disabled = {
            r["name"] for r in rows(jobdb, "SELECT name FROM syncworker.integrations WHERE NOT enabled")
        }
        assert {"unknown-kind", "bad-config"} <= disabled
        assert proc.proc.poll() is None
    assert one(jobdb, "SELECT count(*) FROM syncworker.sync_errors WHERE error_type = 'config_invalid'") == 2


def test_heartbeats_show_what_each_replica_is_doing(jobdb: str, tmp_path: Path) -> None:
    add_job(jobdb, "long", "python", py("jobs:sleep", seconds=30))
    with workers(jobdb, tmp_path, 1, "--heartbeat-interval", "0.5"):
        wait_for(
            lambda: one(jobdb, "SELECT running FROM syncworker.workers") == 1,
            timeout=10,
            what="the heartbeat to report the running job",
        )
        first = one(jobdb, "SELECT heartbeat_at FROM syncworker.workers")
        wait_for(
            lambda: one(jobdb, "SELECT heartbeat_at FROM syncworker.workers") > first,
            timeout=5,
            what="a newer heartbeat",
        )
        row = rows(jobdb, "SELECT hostname, pid, version, leader, stopped_at FROM syncworker.workers")[0]
        assert row["leader"] and row["stopped_at"] is None and row["version"]
