"""Poison jobs: a job that kills its worker (or its own session) must not take the fleet down.
Workers run under a supervisor that restarts them, as systemd's Restart=always does."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import add_job, execute, one, rows, supervised, wait_for, worker_env, workers

pytestmark = pytest.mark.e2e

TICKS = (
    "CREATE TABLE public.ticks (id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp())"
)


def poison_state(url: str) -> dict[str, object]:
    return rows(
        url,
        "SELECT enabled, disabled_reason, abandon_count FROM syncworker.integrations WHERE name = 'poison'",
    )[0]


def test_a_job_that_kills_its_worker_is_disabled_after_at_most_three_deaths(
    jobdb: str, tmp_path: Path
) -> None:
    add_job(
        jobdb, "healthy", "sql", {"statement": "INSERT INTO public.ticks DEFAULT VALUES"}, interval_seconds=1
    )
    add_job(jobdb, "poison", "python", {"callable": "jobs:die"}, interval_seconds=60)
    env = worker_env(jobdb, SYNCWORKER_PYTHON_MODULES="jobs")
    with supervised(jobdb, tmp_path, 2, env=env) as fleet:
        wait_for(lambda: not poison_state(jobdb)["enabled"], timeout=30, what="the poison job disabled")
        assert 1 <= len(fleet.deaths) <= 3, fleet.deaths
        assert set(fleet.deaths) == {3}  # each death is the job's os._exit(3)
        state = poison_state(jobdb)
        assert state["abandon_count"] == 3
        assert str(state["disabled_reason"]).startswith("crash loop: its last 3 runs were abandoned")
        deaths = len(fleet.deaths)
        # The healthy job runs on time on the surviving fleet: a tick in every second of 10.
        wait_for(
            lambda: (
                one(jobdb, "SELECT count(*) FROM public.ticks WHERE at > now() - interval '10 seconds'") >= 9
            ),
            timeout=20,
            what="the healthy job running every second",
        )
        assert len(fleet.deaths) == deaths, "a worker died after the poison job was disabled"
    errors = rows(
        jobdb,
        "SELECT e.error_type FROM syncworker.sync_errors e JOIN syncworker.integrations i "
        "ON i.id = e.integration_id WHERE i.name = 'poison' ORDER BY e.id",
    )
    assert [e["error_type"] for e in errors] == ["abandoned"] * 3 + ["crash_loop"]
    runs = rows(
        jobdb,
        "SELECT r.trigger, r.started_at FROM syncworker.sync_runs r JOIN syncworker.integrations i "
        "ON i.id = r.integration_id WHERE i.name = 'poison' ORDER BY r.id",
    )
    assert [r["trigger"] for r in runs] == ["schedule", "rescue", "rescue"]
    # The second rescue waited (10 s), the first did not.
    assert (runs[2]["started_at"] - runs[1]["started_at"]).total_seconds() >= 9.5


def test_a_sql_job_that_kills_its_own_session_is_disabled_and_the_worker_lives(
    jobdb: str, tmp_path: Path
) -> None:
    add_job(
        jobdb,
        "poison",
        "sql",
        {"statement": "SELECT pg_terminate_backend(pg_backend_pid())"},
        interval_seconds=60,
        max_abandons=2,
    )
    add_job(jobdb, "fine", "sql", {"statement": "select 1"}, interval_seconds=1)
    with workers(jobdb, tmp_path, 1) as (worker,):
        wait_for(lambda: not poison_state(jobdb)["enabled"], timeout=30, what="the poison job disabled")
        assert worker.proc.poll() is None, worker.output()[-3000:]
        assert str(poison_state(jobdb)["disabled_reason"]).startswith("crash loop: its last 2 runs")
        before = one(
            jobdb,
            "SELECT count(*) FROM syncworker.sync_runs r JOIN syncworker.integrations i "
            "ON i.id = r.integration_id WHERE i.name = 'fine' AND r.status = 'success'",
        )
        wait_for(
            lambda: (
                one(
                    jobdb,
                    "SELECT count(*) FROM syncworker.sync_runs r JOIN syncworker.integrations i "
                    "ON i.id = r.integration_id WHERE i.name = 'fine' AND r.status = 'success'",
                )
                >= before + 2
            ),
            timeout=10,
            what="the other job still running",
        )


def test_a_run_that_ends_resets_the_count(jobdb: str, tmp_path: Path) -> None:
    job = add_job(jobdb, "flaky", "sql", {"statement": "select 1"}, interval_seconds=3600, next_sync_at=None)
    execute(jobdb, "UPDATE syncworker.integrations SET abandon_count = 2 WHERE id = %s", [job])
    with workers(jobdb, tmp_path, 1):
        execute(jobdb, "SELECT syncworker.trigger_sync('flaky')")
        wait_for(
            lambda: (
                one(jobdb, "SELECT last_status FROM syncworker.integrations WHERE id = %s", [job])
                == "success"
            ),
            timeout=15,
            what="the run finished",
        )
    assert one(jobdb, "SELECT abandon_count FROM syncworker.integrations WHERE id = %s", [job]) == 0
