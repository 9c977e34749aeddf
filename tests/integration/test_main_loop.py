"""The worker's main loop in-process: it wakes on NOTIFY and on due times, claims up to its
concurrency, chains runs on one session, and stops cleanly."""

from __future__ import annotations

import asyncio
import time

from helpers import add_job, execute, one
from worker.daemon.settings import Settings
from worker.daemon.worker import Worker


async def eventually(condition: object) -> None:
    async with asyncio.timeout(15):
        while not condition():  # type: ignore[operator]  # noqa: ASYNC110 - the state is in the database
            await asyncio.sleep(0.05)


def test_the_loop_runs_what_is_due_wakes_on_insert_and_stops_cleanly(jobdb: str) -> None:
    for i in range(6):
        add_job(jobdb, f"tick{i}", "sql", {"statement": "INSERT INTO public.ticks DEFAULT VALUES"})
    ticks = lambda: one(jobdb, "SELECT count(*) FROM public.ticks")  # noqa: E731

    async def main() -> tuple[int, float]:
        # A poll cap of an hour: whatever runs below ran because the loop was woken.
        settings = Settings(database_url=jobdb, concurrency=2, poll_interval=3600, allow_superuser_jobs=True)
        worker = Worker(settings)
        task = asyncio.create_task(worker.run())
        await eventually(lambda: ticks() == 6)  # six due jobs through two slots
        inserted = time.monotonic()
        add_job(jobdb, "late-comer", "sql", {"statement": "INSERT INTO public.ticks DEFAULT VALUES"})
        await eventually(lambda: ticks() == 7)  # the insert trigger's NOTIFY woke it
        woke_after = time.monotonic() - inserted
        execute(
            jobdb,
            "UPDATE syncworker.integrations SET next_sync_at = now() + interval '1 second' "
            "WHERE name = 'tick0'",
        )
        await eventually(lambda: ticks() == 8)  # the due time it was told about
        worker.request_stop()
        return await task, woke_after

    code, woke_after = asyncio.run(main())
    assert code == 0 and woke_after < 2
    assert one(jobdb, "SELECT count(*) FROM syncworker.sync_runs WHERE status <> 'success'") == 0
    assert one(jobdb, "SELECT count(DISTINCT worker_id) FROM syncworker.sync_runs") == 1
    assert one(jobdb, "SELECT stopped_at IS NOT NULL FROM syncworker.workers") is True
