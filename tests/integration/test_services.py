"""The service pattern and the services in-process, against a real database: rounds, waits,
wake-ups, backoff, supervision, leadership handing over, the heartbeat."""

from __future__ import annotations

import asyncio
import logging

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from helpers import one, rows
from worker.services import leadership
from worker.services.base import Service, supervise
from worker.services.heartbeat import Heartbeat
from worker.services.leadership import Leadership


class Rounds(Service):
    """Fails with a lost connection `failures` times, then counts its rounds."""

    name = "rounds"
    retry_initial, retry_maximum = 0.01, 0.02

    def __init__(self, failures: int, wait: float | None) -> None:
        super().__init__()
        self.failures, self.wait, self.done = failures, wait, 0

    async def round(self) -> float | None:
        if self.failures:
            self.failures -= 1
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        self.done += 1
        return self.wait


def waiting_for_a_lock(url: str) -> bool:
    """Has a second session of this database tried for the leader lock (a standby)?"""
    return bool(
        one(
            url,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'syncworker leader' AND query LIKE '%pg_try_advisory_lock%'",
        )
    )


async def eventually(condition: object, what: str) -> None:
    async with asyncio.timeout(5):
        while not condition():  # type: ignore[operator]  # noqa: ASYNC110 - polled state
            await asyncio.sleep(0.01)


def test_a_service_backs_off_while_the_database_is_away_and_is_woken_early(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        service = Rounds(failures=3, wait=None)  # after its round it waits until woken
        task = asyncio.create_task(service.run())
        await eventually(lambda: service.done == 1, "the first round after the failures")
        # A spinning service would go round again at once: 50 ms is hundreds of rounds.
        await asyncio.sleep(0.05)
        assert service.done == 1  # waiting, not spinning
        service.wake()
        await eventually(lambda: service.done == 2, "the round the wake-up asked for")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    with caplog.at_level(logging.WARNING):
        asyncio.run(main())
    lost = [r.getMessage() for r in caplog.records if "rounds:" in r.getMessage()]
    assert len(lost) == 3 and all("trying again in" in m for m in lost)


def test_supervise_restarts_a_service_that_fails_and_stops_when_it_returns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = []

    async def flaky() -> None:
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("a row nobody expected")

    async def main() -> None:
        async with asyncio.timeout(10):
            await supervise(flaky, "flaky")

    with caplog.at_level(logging.ERROR):
        asyncio.run(main())
    assert len(calls) == 3
    failures = [r for r in caplog.records if "service flaky failed" in r.getMessage()]
    assert len(failures) == 2 and failures[0].exc_info is not None


def test_leadership_passes_to_the_standby_when_the_leader_stops(db: str) -> None:
    async def main() -> list[str]:
        seen: list[str] = []
        first = Leadership(db, lambda leading: seen.append(f"first {'leads' if leading else 'stands by'}"))
        second = Leadership(db, lambda leading: seen.append(f"second {'leads' if leading else 'stands by'}"))
        one_task = asyncio.create_task(first.run())
        await eventually(lambda: first.is_leader, "the first to lead")
        two_task = asyncio.create_task(second.run())
        await eventually(lambda: waiting_for_a_lock(db), "the standby to try for the lock")
        assert not second.is_leader  # it tried, and the first holds the lock
        one_task.cancel()
        await asyncio.gather(one_task, return_exceptions=True)
        await eventually(lambda: second.is_leader, "the standby to lead")
        two_task.cancel()
        await asyncio.gather(two_task, return_exceptions=True)
        return seen

    assert asyncio.run(main()) == ["first leads", "first stands by", "second leads", "second stands by"]


def test_neither_the_leader_nor_a_standby_holds_a_snapshot(db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A snapshot held by a long statement keeps every row version deleted after it: in a
    burst of claims each would walk past all the jobs claimed before.  The leader beats and
    keeps leading, the standby keeps trying; neither session pins the cleanup horizon."""
    monkeypatch.setattr(leadership, "LEADER_BEAT", 0.05)

    async def main() -> None:
        first = Leadership(db, lambda leading: None)
        second = Leadership(db, lambda leading: None)
        tasks = [asyncio.create_task(first.run())]
        await eventually(lambda: first.is_leader, "the first to lead")
        tasks.append(asyncio.create_task(second.run()))
        await eventually(lambda: waiting_for_a_lock(db), "the standby to try for the lock")
        await asyncio.sleep(0.5)  # ten beats: each one a statement in the leader's transaction
        assert first.is_leader and not second.is_leader
        sessions = rows(
            db,
            "SELECT state, backend_xmin, backend_xid FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = 'syncworker leader'",
        )
        assert len(sessions) == 2
        assert all(s["backend_xmin"] is None and s["backend_xid"] is None for s in sessions), sessions
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())


def test_the_heartbeat_writes_what_the_replica_does_and_a_leader_clears_stale_leader_flags(db: str) -> None:
    ids = [
        one(
            db,
            "INSERT INTO syncworker.workers (hostname, pid, version, leader) "
            "VALUES ('h', 1, 'v', true) RETURNING id",
        ),
        one(db, "INSERT INTO syncworker.workers (hostname, pid, version) VALUES ('h', 2, 'v') RETURNING id"),
    ]

    async def main() -> None:
        async with AsyncConnectionPool(db, kwargs={"autocommit": True}, min_size=1) as pool:
            beat = Heartbeat(pool, ids[1], 60, running=lambda: 3, leader=lambda: True)
            assert await beat.round() == 60

    asyncio.run(main())
    found = {r["id"]: r for r in rows(db, "SELECT id, leader, running FROM syncworker.workers")}
    assert found[ids[1]]["leader"] and found[ids[1]]["running"] == 3
    assert not found[ids[0]]["leader"]  # the frozen one's claim to lead is cleared
