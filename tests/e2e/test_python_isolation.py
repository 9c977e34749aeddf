"""`"isolation": "process"`: a python job runs in a child of the worker, and a crash there is
the run's failure (`crashed`), never the worker's death.  Real worker processes throughout."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from helpers import add_job, execute, one, rows, supervised, wait_for, workers
from worker.connectors.base import SyncError
from worker.connectors.python_child import MAX_MESSAGE_BYTES
from worker.connectors.python_pool import Child
from worker.run.once import run_once

pytestmark = pytest.mark.e2e

TICK = {"statement": "INSERT INTO public.ticks DEFAULT VALUES"}


def isolated(target: str, **options: object) -> dict[str, object]:
    return {"callable": target, "options": options, "isolation": "process"}


def finished_runs(url: str, name: str) -> list[dict[str, Any]]:
    return rows(
        url,
        """SELECT r.id, r.status, r.error_type, r.error, r.duration_ms, r.records_processed,
                  r.records_inserted, r.records_updated, r.records_failed
             FROM syncworker.sync_runs r JOIN syncworker.integrations i ON i.id = r.integration_id
            WHERE i.name = %s AND r.status <> 'running' ORDER BY r.id""",
        (name,),
    )


def started_pid(url: str, name: str) -> int:
    """The pid that noted the job's start in public.job_events (tests/jobs.py)."""
    return int(
        wait_for(
            lambda: one(
                url, "SELECT pid FROM public.job_events WHERE integration = %s AND event = 'start'", (name,)
            ),
            timeout=20,
            what=f"{name} to start",
        )
    )


def gone(pid: int) -> bool:
    """The process has ended (a zombie left for a parent that does not reap counts as ended)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def ticks(url: str) -> int:
    return int(one(url, "SELECT count(*) FROM public.ticks"))


@pytest.mark.parametrize(
    ("target", "how"),
    [("jobs:die", "exited with code 3"), ("jobs:segfault", "killed by SIGSEGV")],
)
def test_a_job_that_kills_its_process_fails_as_crashed_and_the_worker_runs_on(
    jobdb: str, tmp_path: Path, target: str, how: str
) -> None:
    add_job(jobdb, "ticker", "sql", TICK, interval_seconds=1)
    add_job(jobdb, "poison", "python", isolated(target), interval_seconds=3600, retry_backoff_seconds=1)
    with workers(jobdb, tmp_path) as (worker,):
        # The first run and its retry a second later: each in a child of its own, each crashed.
        crashed = wait_for(
            lambda: len(runs := finished_runs(jobdb, "poison")) >= 2 and runs, timeout=30, what="two runs"
        )
        for run in crashed[:2]:
            assert (run["status"], run["error_type"]) == ("failed", "crashed"), run
            assert how in run["error"] and "the process running the job died" in run["error"]
        before = ticks(jobdb)
        wait_for(lambda: ticks(jobdb) >= before + 2, timeout=10, what="the other job to go on running")
        assert worker.proc.poll() is None
        assert one(jobdb, "SELECT count(*) FROM syncworker.workers") == 1
    assert "Traceback" not in worker.output().split("Fatal Python error")[0]


def test_a_child_killed_from_outside_fails_its_run_as_crashed(jobdb: str, tmp_path: Path) -> None:
    # What the kernel's OOM killer does to the biggest process: SIGKILL.
    add_job(jobdb, "victim", "python", isolated("jobs:sleep_blocking", seconds=60), max_retries=0)
    with workers(jobdb, tmp_path) as (worker,):
        pid = started_pid(jobdb, "victim")
        assert pid != worker.pid
        os.kill(pid, signal.SIGKILL)
        (run,) = wait_for(lambda: finished_runs(jobdb, "victim"), timeout=10, what="the run to end")
        assert (run["status"], run["error_type"]) == ("failed", "crashed")
        assert "killed by SIGKILL: out of memory, or killed from outside" in run["error"]
        assert worker.proc.poll() is None


def test_a_sync_job_past_its_timeout_is_killed_with_its_process(jobdb: str, tmp_path: Path) -> None:
    add_job(
        jobdb,
        "sleepy",
        "python",
        isolated("jobs:sleep_blocking", seconds=60),
        timeout_seconds=2,
        max_retries=0,
    )
    with workers(jobdb, tmp_path) as (worker,):
        pid = started_pid(jobdb, "sleepy")
        (run,) = wait_for(lambda: finished_runs(jobdb, "sleepy"), timeout=10, what="the run to end")
        assert (run["status"], run["error_type"]) == ("failed", "timeout")
        assert run["duration_ms"] < 3500, run  # 2 s, plus starting the child and the bookkeeping
        wait_for(lambda: gone(pid), timeout=5, what="the job's process to be gone")
        assert one(jobdb, "SELECT count(*) FROM public.job_events WHERE event = 'end'") == 0
        assert worker.proc.poll() is None


def test_state_counts_errors_and_log_lines_come_back_from_the_child(jobdb: str, tmp_path: Path) -> None:
    add_job(
        jobdb,
        "roundtrip",
        "python",
        isolated("jobs:where_am_i", colour="blue"),
        state={"n": 41},
        interval_seconds=3600,
    )
    with workers(jobdb, tmp_path) as (worker,):
        (run,) = wait_for(lambda: finished_runs(jobdb, "roundtrip"), timeout=20, what="the run")
        state = one(jobdb, "SELECT state FROM syncworker.integrations WHERE name = 'roundtrip'")
        output = worker.output()
    assert run["status"] == "partial", run  # one record reported with record_error
    counts = (
        run["records_processed"],
        run["records_inserted"],
        run["records_updated"],
        run["records_failed"],
    )
    assert counts == (5, 2, 1, 1)
    child = state.pop("pid")
    assert child != worker.pid
    assert state == {"n": 42, "seen": {"colour": "blue"}}
    error = rows(jobdb, "SELECT error_type, record_key, message, run_id FROM syncworker.sync_errors")
    assert error == [
        {
            "error_type": "record_invalid",
            "record_key": "rec-1",
            "message": "not a number",
            "run_id": run["id"],
        }
    ]
    assert f"[roundtrip run={run['id']}]: where_am_i says hello from pid {child}" in output


def test_children_are_reused_replaced_when_dead_and_stopped_with_the_worker(
    jobdb: str, tmp_path: Path
) -> None:
    add_job(jobdb, "again", "python", isolated("jobs:where_am_i_async"), interval_seconds=3600)

    def pid_of_run(count: int) -> int:
        wait_for(lambda: len(finished_runs(jobdb, "again")) >= count, timeout=20, what=f"run {count}")
        assert finished_runs(jobdb, "again")[-1]["status"] == "success"
        return int(one(jobdb, "SELECT state->>'pid' FROM syncworker.integrations WHERE name = 'again'"))

    with workers(jobdb, tmp_path) as (worker,):
        first = pid_of_run(1)
        execute(jobdb, "SELECT syncworker.trigger_sync('again')")
        assert pid_of_run(2) == first  # the same child ran both
        assert psutil.Process(first).ppid() != worker.pid  # forked by the fork server, not the worker
        os.kill(first, signal.SIGKILL)  # dies while idle
        wait_for(lambda: gone(first), timeout=5, what="the child to die")
        execute(jobdb, "SELECT syncworker.trigger_sync('again')")
        replacement = pid_of_run(3)  # a new child, and the run does not pay for the dead one
        assert replacement != first
        assert worker.terminate() == 0
        wait_for(lambda: gone(replacement), timeout=5, what="the child to stop with the worker")


def test_a_child_does_not_outlive_a_worker_killed_with_sigkill(jobdb: str, tmp_path: Path) -> None:
    add_job(jobdb, "orphan", "python", isolated("jobs:sleep_blocking", seconds=60))
    with workers(jobdb, tmp_path) as (worker,):
        pid = started_pid(jobdb, "orphan")
        worker.kill()
        # Its rescued rerun must not run beside it.
        wait_for(lambda: gone(pid), timeout=5, what="the child to die with its worker")


def test_async_jobs_run_in_the_childs_loop_and_ctx_conn_is_refused(jobdb: str, tmp_path: Path) -> None:
    add_job(jobdb, "async", "python", isolated("jobs:where_am_i_async"), interval_seconds=3600)
    add_job(jobdb, "conn", "python", isolated("jobs:uses_conn"), interval_seconds=3600)
    with workers(jobdb, tmp_path) as (worker,):
        wait_for(lambda: finished_runs(jobdb, "async") and finished_runs(jobdb, "conn"), timeout=20)
        assert finished_runs(jobdb, "async")[0]["status"] == "success"
        pid = one(jobdb, "SELECT state->>'pid' FROM syncworker.integrations WHERE name = 'async'")
        assert int(pid) != worker.pid
        (run,) = finished_runs(jobdb, "conn")
        assert (
            run["error_type"] == "config_invalid"
            and "ctx.conn (the run's transaction) is not available" in (run["error"])
        )
        reason = one(jobdb, "SELECT disabled_reason FROM syncworker.integrations WHERE name = 'conn'")
        assert "isolation" in reason


def test_job_errors_in_the_child_keep_their_error_types(jobdb: str, tmp_path: Path) -> None:
    add_job(jobdb, "raises", "python", isolated("jobs:fail", message="upstream said no"), max_retries=0)
    add_job(jobdb, "odd", "python", isolated("jobs:not_a_result"), max_retries=0)
    add_job(jobdb, "quitter", "python", isolated("jobs:exits"), max_retries=0)
    add_job(jobdb, "typo", "python", isolated("jobs:no_such_function"), max_retries=0)
    with workers(jobdb, tmp_path) as (worker,):
        names = ("raises", "odd", "quitter", "typo")
        wait_for(lambda: all(finished_runs(jobdb, n) for n in names), timeout=20, what="four runs")
        found = {n: finished_runs(jobdb, n)[0] for n in names}
        assert worker.proc.poll() is None
    assert (found["raises"]["error_type"], found["raises"]["error"]) == (
        "exception",
        "RuntimeError: upstream said no",
    )
    assert found["odd"]["error_type"] == "bad_result" and "returned int" in found["odd"]["error"]
    assert found["quitter"]["error_type"] == "exception" and "SystemExit(3)" in found["quitter"]["error"]
    assert found["typo"]["error_type"] == "config_invalid" and "no_such_function" in found["typo"]["error"]
    detail = one(
        jobdb,
        "SELECT e.detail FROM syncworker.sync_errors e JOIN syncworker.integrations i "
        "ON i.id = e.integration_id WHERE i.name = 'raises' AND e.error_type = 'exception'",
    )
    assert "tests/jobs.py" in detail  # the traceback from the child


def test_a_poison_job_under_isolation_kills_no_replica(jobdb: str, tmp_path: Path) -> None:
    # Two replicas under a supervisor that restarts them as systemd would, a job that ends its
    # process at once, and a healthy job every second.  Under isolation each poison run is an
    # ordinary failure (`crashed`): retried after its backoff (1 s here, so that the retries
    # are used up within the test) and then disabled, while no replica dies.
    add_job(jobdb, "healthy", "sql", TICK, interval_seconds=1)
    add_job(
        jobdb,
        "poison",
        "python",
        isolated("jobs:die"),
        interval_seconds=60,
        retry_backoff_seconds=1,
        max_retries=2,
    )
    start = time.monotonic()
    with supervised(jobdb, tmp_path, 2) as supervisor:
        wait_for(
            lambda: one(jobdb, "SELECT NOT enabled FROM syncworker.integrations WHERE name = 'poison'"),
            timeout=30,
            what="the poison job to be disabled",
        )
        assert time.monotonic() - start < 30
        runs = finished_runs(jobdb, "poison")
        assert [r["error_type"] for r in runs] == ["crashed"] * 3
        # The healthy job runs on time: in the last 10 s, no gap between runs much over its second.
        wait_for(
            lambda: one(jobdb, "SELECT min(at) < clock_timestamp() - interval '10 s' FROM public.ticks"),
            timeout=20,
            what="10 s of the healthy job's runs",
        )
        gaps = one(
            jobdb,
            """SELECT max(gap) FROM (SELECT extract(epoch FROM at - lag(at) OVER (ORDER BY at)) AS gap
                 FROM public.ticks WHERE at > clock_timestamp() - interval '10 seconds') g""",
        )
        assert gaps is not None and float(gaps) < 2.0, gaps
        assert supervisor.deaths == []
    assert one(jobdb, "SELECT count(*) FROM syncworker.workers") == 2


@pytest.mark.parametrize(
    ("isolation", "expected"), [("fork", "got 'fork'"), (1, "got int"), (None, "got null")]
)
def test_isolation_is_thread_or_process(db: str, isolation: object, expected: str) -> None:
    add_job(db, "odd", "python", {"callable": "jobs:count_up", "isolation": isolation})
    assert asyncio.run(run_once(db, "odd")).status == "failed"
    reason = one(db, "SELECT disabled_reason FROM syncworker.integrations")
    assert reason.startswith("invalid configuration: isolation: expected") and expected in reason, reason
    assert one(db, "SELECT error_type FROM syncworker.sync_runs") == "config_invalid"


@pytest.mark.parametrize(
    ("target", "what"), [("jobs:huge_result", "result"), ("jobs:huge_checkpoint", "state")]
)
def test_a_result_or_checkpoint_too_large_for_the_pipe_fails_the_run_and_keeps_the_state(
    jobdb: str, target: str, what: str
) -> None:
    add_job(jobdb, "big", "python", isolated(target), state={"n": 1}, interval_seconds=3600)
    add_job(jobdb, "after", "python", isolated("jobs:count_up"), interval_seconds=3600)
    assert asyncio.run(run_once(jobdb, "big")).status == "failed"
    (run,) = finished_runs(jobdb, "big")
    assert run["error_type"] == "bad_result"
    assert what in run["error"] and "more than the 64 MiB a job's process may send" in run["error"], run
    assert one(jobdb, "SELECT state FROM syncworker.integrations WHERE name = 'big'") == {"n": 1}
    assert asyncio.run(run_once(jobdb, "after")).status == "success"


def test_the_worker_reads_no_message_larger_than_a_child_may_send() -> None:
    """Even from a child that does not keep to the limit (a job writing to the pipe itself)."""
    here, there = multiprocessing.Pipe()
    child = Child(multiprocessing.current_process(), here)  # alive, as a running child is

    def send() -> None:
        with contextlib.suppress(OSError):  # the worker stops reading: a broken pipe
            there.send_bytes(b"x" * (MAX_MESSAGE_BYTES + 1))

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    assert here.poll(10)  # the message is on its way (the current process has no sentinel to wait on)
    with pytest.raises(SyncError, match="more than 64 MiB") as raised:
        asyncio.run(child._receive())
    assert raised.value.error_type == "bad_result"
    here.close()
    sender.join(timeout=10)
    there.close()


def test_a_long_log_line_from_a_job_is_cut_short(jobdb: str, caplog: pytest.LogCaptureFixture) -> None:
    add_job(jobdb, "chatty", "python", isolated("jobs:huge_log_line"), interval_seconds=3600)
    with caplog.at_level(logging.WARNING):
        assert asyncio.run(run_once(jobdb, "chatty")).status == "success"
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("yyy")]
    assert len(line) < 70_000 and line.endswith("(134464 more characters cut)"), line[-60:]
