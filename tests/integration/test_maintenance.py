"""Leader services, one round at a time: the rescuer and the pruner."""

from __future__ import annotations

import asyncio

import psycopg
from psycopg_pool import AsyncConnectionPool

from helpers import add_job, execute, one, rows
from worker.services.pruner import Pruner, PruneReport
from worker.services.rescuer import Rescuer


def _round(url: str, service: type, *args: object) -> object:
    async def main() -> object:
        async with AsyncConnectionPool(url, kwargs={"autocommit": True}, min_size=1) as pool:
            return await service(pool, *args).run_once()

    return asyncio.run(main())


def _open_run(url: str, job_id: int, worker_id: int | None, locked: bool) -> int:
    run_id = one(
        url,
        """INSERT INTO syncworker.sync_runs (integration_id, worker_id, locked_at)
                         VALUES (%s, %s, CASE WHEN %s THEN now() END) RETURNING id""",
        (job_id, worker_id, locked),
    )
    execute(url, "UPDATE syncworker.integrations SET running_run_id = %s WHERE id = %s", (run_id, job_id))
    return int(run_id)


def test_rescuer_abandons_only_runs_whose_session_is_gone(db: str) -> None:
    worker = one(
        db, "INSERT INTO syncworker.workers (hostname, pid, version) VALUES ('h', 1, 'v') RETURNING id"
    )
    dead = add_job(db, "dead", "sql", {"statement": "select 1"}, interval_seconds=60)
    alive = add_job(db, "alive", "sql", {"statement": "select 1"}, interval_seconds=60)
    starting = add_job(db, "starting", "sql", {"statement": "select 1"}, interval_seconds=60)
    dead_run = _open_run(db, dead, worker, locked=True)
    _open_run(db, alive, worker, locked=True)
    _open_run(db, starting, worker, locked=False)
    with psycopg.connect(db, autocommit=True) as session:
        # "alive" holds its lock; the worker itself is alive, so "starting" may still take its lock.
        session.execute("SELECT pg_advisory_lock(syncworker.lock_key('integration'), %s)", (alive,))
        session.execute("SELECT pg_advisory_lock(syncworker.lock_key('worker'), %s)", (worker,))
        report = _round(db, Rescuer)
        assert (report.rescued, report.running) == (1, 3)
    by_name = {
        r["name"]: r
        for r in rows(
            db,
            """
        SELECT i.name, r.status, i.running_run_id, i.pending_trigger, i.next_sync_at <= now() AS due
          FROM syncworker.integrations i JOIN syncworker.sync_runs r ON r.integration_id = i.id""",
        )
    }
    assert by_name["dead"]["status"] == "abandoned" and by_name["dead"]["running_run_id"] is None
    assert by_name["dead"]["pending_trigger"] == "rescue" and by_name["dead"]["due"]
    assert by_name["alive"]["status"] == "running" and by_name["starting"]["status"] == "running"
    assert one(db, "SELECT run_id FROM syncworker.sync_errors WHERE error_type = 'abandoned'") == dead_run
    # Once the worker's session is gone too, its not-yet-locked run is handed back as well.
    report = _round(db, Rescuer)
    assert report.rescued == 2


def test_rescuer_hands_back_a_run_its_live_worker_never_locked(db: str) -> None:
    # A claim whose reply was lost: the worker lives on but will never run it.
    worker = one(
        db, "INSERT INTO syncworker.workers (hostname, pid, version) VALUES ('h', 1, 'v') RETURNING id"
    )
    lost = add_job(db, "lost", "sql", {"statement": "select 1"}, interval_seconds=60)
    fresh = add_job(db, "fresh", "sql", {"statement": "select 1"}, interval_seconds=60)
    lost_run = _open_run(db, lost, worker, locked=False)
    _open_run(db, fresh, worker, locked=False)
    execute(
        db,
        "UPDATE syncworker.sync_runs SET started_at = now() - interval '2 minutes' WHERE id = %s",
        (lost_run,),
    )
    with psycopg.connect(db, autocommit=True) as session:
        session.execute("SELECT pg_advisory_lock(syncworker.lock_key('worker'), %s)", (worker,))
        report = _round(db, Rescuer)
    assert report.rescued == 1
    assert one(db, "SELECT status FROM syncworker.sync_runs WHERE id = %s", (lost_run,)) == "abandoned"
    assert one(db, "SELECT pending_trigger FROM syncworker.integrations WHERE id = %s", (lost,)) == "rescue"


def test_pruner_keeps_recent_runs_and_unresolved_errors(db: str) -> None:
    job = add_job(db, "old", "sql", {"statement": "select 1"})
    old = "now() - interval '40 days'"
    execute(
        db,
        f"INSERT INTO syncworker.sync_runs (integration_id, status, started_at, finished_at) "
        f"SELECT %s, 'success', {old}, {old} FROM generate_series(1, 7000)",
        (job,),
    )
    execute(
        db,
        "INSERT INTO syncworker.sync_runs (integration_id, status, started_at, finished_at) "
        "VALUES (%s, 'success', now() - interval '1 day', now() - interval '1 day')",
        (job,),
    )
    for message, resolved, created in [
        ("old resolved", True, old),
        ("old unresolved", False, old),
        ("new resolved", True, "now()"),
    ]:
        execute(
            db,
            f"INSERT INTO syncworker.sync_errors (integration_id, error_type, message, resolved, created_at) "
            f"VALUES (%s, 'x', %s, %s, {created})",
            (job, message, resolved),
        )
    report = _round(db, Pruner, 30)
    assert report == PruneReport(runs=7000, errors=1, workers=0)
    assert one(db, "SELECT count(*) FROM syncworker.sync_runs") == 1
    assert {r["message"] for r in rows(db, "SELECT message FROM syncworker.sync_errors")} == {
        "old unresolved",
        "new resolved",
    }


def test_pruner_forgets_long_stopped_replicas_and_their_runs_keep_no_dangling_id(db: str) -> None:
    job = add_job(db, "j", "sql", {"statement": "select 1"})
    gone, recent = (
        one(
            db,
            "INSERT INTO syncworker.workers (hostname, pid, version, stopped_at) "
            "VALUES ('h', 1, 'v', now() - make_interval(days => %s)) RETURNING id",
            (days,),
        )
        for days in (40, 2)
    )
    for worker in (gone, recent):
        execute(
            db,
            "INSERT INTO syncworker.sync_runs (integration_id, worker_id, status, finished_at) "
            "VALUES (%s, %s, 'success', now())",
            (job, worker),
        )
    report = _round(db, Pruner, 30)
    assert report == PruneReport(runs=0, errors=0, workers=1)
    assert [r["id"] for r in rows(db, "SELECT id FROM syncworker.workers")] == [recent]
    assert sorted(
        (r["worker_id"] for r in rows(db, "SELECT worker_id FROM syncworker.sync_runs")),
        key=lambda w: w or 0,
    ) == [None, recent]
