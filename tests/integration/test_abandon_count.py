"""Abandoned runs are counted per job: rescued at once the first time, later with a growing
delay, and the job is disabled as a crash loop at max_abandons (schema level)."""

from __future__ import annotations

from typing import Any

import psycopg

from helpers import add_job, execute, one, rows


def start_run(db: str, job: int) -> int:
    run = int(one(db, "INSERT INTO syncworker.sync_runs (integration_id) VALUES (%s) RETURNING id", [job]))
    execute(db, "UPDATE syncworker.integrations SET running_run_id = %s WHERE id = %s", [run, job])
    return run


def abandon(db: str, job: int, counted: bool = True) -> dict[str, Any]:
    run = start_run(db, job)
    execute(db, "SELECT syncworker.abandon_run(%s, 'the worker died', %s)", [run, counted])
    return rows(
        db,
        "SELECT enabled, disabled_reason, abandon_count, last_status, pending_trigger, "
        "extract(epoch FROM next_sync_at - now())::float AS due_in "
        "FROM syncworker.integrations WHERE id = %s",
        [job],
    )[0]


def test_rescues_wait_longer_each_time_and_the_third_disables_the_job(db: str) -> None:
    job = add_job(db, "poison", "sql", {"statement": "select 1"}, interval_seconds=3600)
    with psycopg.connect(db, autocommit=True) as listener:
        listener.execute("LISTEN syncworker_alerts")
        first = abandon(db, job)
        assert first["enabled"] and first["abandon_count"] == 1 and abs(first["due_in"]) < 1
        assert first["pending_trigger"] == "rescue"
        second = abandon(db, job)
        assert second["enabled"] and second["abandon_count"] == 2 and 9 < second["due_in"] <= 10
        third = abandon(db, job)
        assert not third["enabled"] and third["abandon_count"] == 3
        assert third["disabled_reason"].startswith("crash loop: its last 3 runs were abandoned")
        alerts = [n.payload for n in listener.notifies(timeout=1, stop_after=1)]
    assert len(alerts) == 1 and '"error_type" : "crash_loop"' in alerts[0] and '"poison"' in alerts[0]
    errors = [r["error_type"] for r in rows(db, "SELECT error_type FROM syncworker.sync_errors ORDER BY id")]
    assert errors == ["abandoned", "abandoned", "abandoned", "crash_loop"]
    # Every run keeps its own status: abandoned, not something new.
    assert {r["status"] for r in rows(db, "SELECT status FROM syncworker.sync_runs")} == {"abandoned"}

    execute(db, "SELECT syncworker.enable_job('poison')")
    assert one(db, "SELECT abandon_count FROM syncworker.integrations WHERE id = %s", [job]) == 0


def test_the_delay_grows_to_five_minutes_and_stays_there(db: str) -> None:
    delays = [
        one(db, "SELECT extract(epoch FROM syncworker.rescue_delay(%s))::int", [n]) for n in range(0, 16)
    ]
    assert delays[:7] == [0, 0, 10, 20, 40, 80, 160]
    assert set(delays[7:]) == {300}


def test_a_graceful_hand_back_is_not_counted(db: str) -> None:
    job = add_job(db, "long", "sql", {"statement": "select 1"}, interval_seconds=3600, max_abandons=1)
    for _ in range(3):
        after = abandon(db, job, counted=False)
        assert after["enabled"] and after["abandon_count"] == 0 and abs(after["due_in"]) < 1


def test_a_per_job_limit_and_its_check(db: str) -> None:
    job = add_job(db, "once", "sql", {"statement": "select 1"}, interval_seconds=3600, max_abandons=1)
    assert not abandon(db, job)["enabled"]
    try:
        execute(db, "UPDATE syncworker.integrations SET max_abandons = 0 WHERE id = %s", [job])
    except psycopg.errors.CheckViolation as exc:
        assert "integrations_max_abandons_positive" in str(exc)
    else:
        raise AssertionError("max_abandons = 0 was accepted")


def test_a_run_that_never_started_is_rescued_without_counting(db: str) -> None:
    """A run claimed ahead and never started (its worker died while it waited, without its
    lock) cannot be what killed the worker: rescued at once, every time, never a crash loop."""
    from worker.db.queries import Q

    job = add_job(db, "waited", "sql", {"statement": "select 1"}, interval_seconds=3600)
    for _ in range(4):
        start_run(db, job)  # no worker, no lock, no locked_at: its worker is gone
        execute(db, Q["rescue_abandoned"], {})
    got = rows(db, "SELECT enabled, abandon_count, last_status FROM syncworker.integrations")
    assert got == [{"enabled": True, "abandon_count": 0, "last_status": "abandoned"}]
    reasons = {r["error"] for r in rows(db, "SELECT error FROM syncworker.sync_runs")}
    assert reasons == {"the worker that claimed it died or lost its database session before the run started"}
