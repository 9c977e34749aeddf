"""Background services: heartbeat, leader election, the rescuer (every replica) and the
leader's pruner.

Each is a `worker.service` Service (a round at a time) or SessionService (one session,
reconnected); the rescuer and the pruner also have a `run_once()` that returns what it did,
so tests can drive them directly.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

from worker import db
from worker.queries import Q
from worker.service import Service, SessionService

log = logging.getLogger("syncworker.maintenance")

Pool = AsyncConnectionPool[AsyncConnection[TupleRow]]

# With nothing running anywhere the rescuer still looks this often, in case a
# "runs started" NOTIFY was missed while the leader was reconnecting.
IDLE_RESCUE_INTERVAL = 300.0
PRUNE_INTERVAL = 3600.0
# The leader's session sleeps LEADER_SLEEP seconds per statement; idle longer than
# LEADER_IDLE_TIMEOUT between two of them, the server ends it: a frozen leader is replaced
# within about LEADER_SLEEP + LEADER_IDLE_TIMEOUT seconds.
LEADER_SLEEP = 6.0
LEADER_IDLE_TIMEOUT = 3.0
PRUNE_BATCH = 5000


class Heartbeat(Service):
    """Writes heartbeat_at, the number of running jobs and the leader flag to syncworker.workers."""

    name = "heartbeat"

    def __init__(
        self,
        pool: Pool,
        worker_id: int,
        interval: float,
        running: Callable[[], int],
        leader: Callable[[], bool],
    ) -> None:
        super().__init__()
        self.pool, self.worker_id, self.interval = pool, worker_id, interval
        self.running, self.leader = running, leader

    def beat_soon(self) -> None:
        """Write now rather than at the next interval (e.g. leadership changed)."""
        self.wake()

    async def round(self) -> float:
        async with self.pool.connection() as conn:
            await conn.execute(
                Q["heartbeat"],
                {"worker_id": self.worker_id, "running": self.running(), "leader": self.leader()},
            )
        return self.interval


class Leadership(SessionService):
    """Holds the leader lock on a session of its own.

    Standbys block in pg_advisory_lock, so a dead leader is replaced the moment
    Postgres closes its session: no polling, no lease to expire.  A leader that is
    alive but frozen (a paused VM, a stuck extension) is replaced too: its session
    sleeps in short statements, and the server ends it once it sits idle between
    them for longer than `LEADER_IDLE_TIMEOUT` (idle_session_timeout).
    """

    name = "leader"

    def __init__(self, url: str, on_change: Callable[[bool], None]) -> None:
        self.url = url
        self.on_change = on_change
        self.is_leader = False
        self.application_name = "syncworker leader"

    def _set(self, leader: bool) -> None:
        if leader != self.is_leader:
            self.is_leader = leader
            log.info("this worker is now %s", "the leader" if leader else "a standby")
            self.on_change(leader)

    async def connect(self) -> psycopg.AsyncConnection[Any]:
        idle = f"{LEADER_IDLE_TIMEOUT:g}s"
        return await psycopg.AsyncConnection.connect(
            self.url,
            autocommit=True,
            **db.session_kwargs(self.url, self.application_name, idle_session_timeout=idle),
        )

    async def serve(self, conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.execute(Q["wait_for_leadership"])
        self._set(True)
        while True:  # fails as soon as the session does
            await conn.execute(Q["stay_leader"], {"seconds": LEADER_SLEEP})

    def lost(self) -> None:
        self._set(False)

    async def run(self) -> None:
        try:
            await super().run()
        finally:
            self._set(False)


@dataclass(frozen=True)
class RescueReport:
    rescued: int
    workers_gone: int
    running: int


class Rescuer:
    """Abandons runs whose session is gone so that their jobs run again at once."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    async def run_once(self) -> RescueReport:
        async with self.pool.connection() as conn:
            cur = await conn.execute(Q["rescue_abandoned"])
            row = await cur.fetchone()
        assert row is not None
        report = RescueReport(*(int(str(v)) for v in row))
        if report.rescued:
            log.warning("rescued %s abandoned run(s); their jobs run again now", report.rescued)
        return report


@dataclass(frozen=True)
class PruneReport:
    runs: int
    errors: int
    workers: int


class Pruner:
    """Deletes finished runs and resolved errors older than the retention, in batches."""

    def __init__(self, pool: Pool, retention_days: int) -> None:
        self.pool = pool
        self.retention_days = retention_days

    async def _delete(self, query: str) -> int:
        total = 0
        while True:
            async with self.pool.connection() as conn:
                cur = await conn.execute(
                    query.encode(), {"retention_days": self.retention_days, "batch": PRUNE_BATCH}
                )
                total += max(cur.rowcount, 0)
            if cur.rowcount < PRUNE_BATCH:
                return total

    async def run_once(self) -> PruneReport:
        report = PruneReport(
            runs=await self._delete(Q["prune_runs"]),
            errors=await self._delete(Q["prune_errors"]),
            workers=await self._delete(Q["prune_workers"]),
        )
        if report.runs or report.errors or report.workers:
            log.info(
                "pruned %s runs, %s resolved errors, %s stopped workers older than %s days",
                report.runs,
                report.errors,
                report.workers,
                self.retention_days,
            )
        return report


class Census:
    """This worker's runs that are certainly running, so that it can wake the leader without
    a NOTIFY per run.

    The leader's rescuer sleeps while no run exists anywhere and wakes on a "runs_started"
    NOTIFY.  A worker announces a claim only when none of its other runs is certainly
    running.  That is enough: if the leader last saw no run at all, the first run claimed
    after that is claimed by a worker that has no run counted here, so it announces it.  A
    run stops counting before anything that may end it is sent (`finishing`), and a job
    claimed in the same commit as the previous run's end (`replacing=True`) needs no
    announcement: the leader sees either the old run or the new one.
    """

    def __init__(self, announce: Callable[[], None] = lambda: None) -> None:
        self.announce = announce
        self._runs: set[int] = set()

    def quiet(self) -> bool:
        """No run of this worker is certainly running: its next claim must wake the rescuers
        (the claim statement sends that NOTIFY itself, so that it commits with the claim)."""
        return not self._runs

    def claimed(self, run_ids: list[int], *, replacing: bool = False, announced: bool = False) -> None:
        """Runs whose claim has just been committed (`announced`: by a claim that woke the rescuers)."""
        if run_ids and not self._runs and not replacing and not announced:
            self.announce()
        self._runs.update(run_ids)

    def finishing(self, run_id: int) -> None:
        """The run may end from now on (idempotent)."""
        self._runs.discard(run_id)

    def __len__(self) -> int:
        return len(self._runs)


class RescueLoop(Service):
    """Every replica rescues, so that rescue never waits on one process being healthy: often
    while runs exist anywhere, and otherwise only when woken (a claim's `runs_started`)."""

    name = "rescuer"

    def __init__(self, rescuer: Rescuer, rescue_interval: float) -> None:
        super().__init__()
        self.rescuer = rescuer
        self.rescue_interval = rescue_interval
        self._idle = False

    async def round(self) -> float:
        if self._idle:  # woken by a run that just started: give it a moment to take its lock
            await asyncio.sleep(self.rescue_interval)
        report = await self.rescuer.run_once()
        self._idle = not report.running
        return IDLE_RESCUE_INTERVAL if self._idle else self.rescue_interval


class PruneLoop(Service):
    """The leader prunes old history hourly."""

    name = "pruner"
    retry_maximum = 60.0

    def __init__(self, pruner: Pruner) -> None:
        super().__init__()
        self.pruner = pruner

    async def round(self) -> float:
        await self.pruner.run_once()
        return PRUNE_INTERVAL
