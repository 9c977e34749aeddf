"""Runs on change: NOTIFY on a source database becomes one coalesced `realtime` run request."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from psycopg_pool import AsyncConnectionPool

from helpers import add_job, execute, rows
from worker.services import realtime
from worker.services.realtime import Realtime, Sources


def flagged(db: str) -> set[str]:
    """The jobs with a realtime run requested."""
    return {
        r["name"]
        for r in rows(db, "SELECT name FROM syncworker.integrations WHERE pending_trigger = 'realtime'")
    }


def idle(service: Realtime) -> bool:
    """Nothing waits to be requested and no request is on its way."""
    return not service.pending and service._flush is None and not service._flushing


async def until(condition: Callable[[], bool]) -> None:
    """Wait for `condition` (the database and the service change on their own), 10 s at most."""
    async with asyncio.timeout(10):
        while not condition():  # noqa: ASYNC110 - the state lives in the database too
            await asyncio.sleep(realtime.COALESCE_SECONDS / 10)


def test_notifications_become_one_realtime_request_per_burst(db: str, empty_db: str) -> None:
    orders = add_job(db, "orders-mirror", "sql", {"statement": "select 1"}, next_sync_at="2099-01-01")
    other = add_job(db, "other", "sql", {"statement": "select 1"}, next_sync_at="2099-01-01")
    running = add_job(db, "busy", "sql", {"statement": "select 1"}, next_sync_at="2099-01-01")
    run_id = rows(
        db, "INSERT INTO syncworker.sync_runs (integration_id) VALUES (%s) RETURNING id", (running,)
    )[0]["id"]
    execute(db, "UPDATE syncworker.integrations SET running_run_id = %s WHERE id = %s", (run_id, running))

    async def loader(pool: AsyncConnectionPool) -> Sources:  # type: ignore[type-arg]
        return {
            (empty_db, "syncworker_source"): {"public.orders": [orders, running], "public.other": [other]}
        }

    async def main() -> list[int]:
        async with AsyncConnectionPool(db, kwargs={"autocommit": True}, min_size=1) as pool:
            service = Realtime(pool, loader)
            await service.reload()
            try:
                flushed = []
                # The listener's first act after connecting is one catch-up request for all jobs.
                await until(lambda: flagged(db) == {"orders-mirror", "busy", "other"} and idle(service))
                execute(
                    db,
                    "UPDATE syncworker.integrations SET pending_trigger = NULL, next_sync_at = '2099-01-01' "
                    "WHERE running_run_id IS NULL",
                )
                for _ in range(5):
                    execute(empty_db, "NOTIFY syncworker_source, 'public.orders'")
                execute(empty_db, "NOTIFY syncworker_source, 'public.unrelated'")
                await until(lambda: flagged(db) == {"orders-mirror", "busy"} and idle(service))
                flushed.append(len(service.pending))
                return flushed
            finally:
                for task in service.listeners.values():
                    task.cancel()
                await asyncio.gather(*service.listeners.values(), return_exceptions=True)

    assert asyncio.run(main()) == [0]
    state = {
        r["name"]: r
        for r in rows(
            db,
            "SELECT name, pending_trigger, next_sync_at <= now() AS due, "
            "scheduled_sync_at FROM syncworker.integrations",
        )
    }
    assert state["orders-mirror"]["pending_trigger"] == "realtime" and state["orders-mirror"]["due"]
    assert state["orders-mirror"]["scheduled_sync_at"].year == 2099  # the schedule's slot is kept
    assert state["other"]["pending_trigger"] is None and not state["other"]["due"]
    # A running job is not made due again; its run's end starts one follow-up.
    assert state["busy"]["pending_trigger"] == "realtime" and not state["busy"]["due"]


def test_a_source_that_ends_idle_sessions_keeps_its_listener(db: str, empty_db: str) -> None:
    """idle_session_timeout on the source's database must not end the LISTEN session: each
    reconnection would be a gap in listening and a catch-up run of every job of the source."""
    name = rows(empty_db, "SELECT current_database() AS name")[0]["name"]
    execute(empty_db, f'ALTER DATABASE "{name}" SET idle_session_timeout = 300')
    job = add_job(db, "orders-mirror", "sql", {"statement": "select 1"}, next_sync_at="2099-01-01")

    async def loader(pool: AsyncConnectionPool) -> Sources:  # type: ignore[type-arg]
        return {(empty_db, "syncworker_source"): {"public.orders": [job]}}

    async def main() -> None:
        async with AsyncConnectionPool(db, kwargs={"autocommit": True}, min_size=1) as pool:
            service = Realtime(pool, loader)
            await service.reload()
            try:
                await until(lambda: flagged(db) == {"orders-mirror"} and idle(service))
                execute(db, "UPDATE syncworker.integrations SET pending_trigger = NULL")
                await asyncio.sleep(1.5)  # five times the source's idle timeout
                assert flagged(db) == set()  # no reconnection, so no catch-up request
                execute(empty_db, "NOTIFY syncworker_source, 'public.orders'")
                await until(lambda: flagged(db) == {"orders-mirror"} and idle(service))
            finally:
                for task in service.listeners.values():
                    task.cancel()
                await asyncio.gather(*service.listeners.values(), return_exceptions=True)

    asyncio.run(main())
