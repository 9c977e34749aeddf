"""Heartbeat: every replica writes what it is doing to syncworker.workers, periodically."""

from __future__ import annotations

from collections.abc import Callable

from worker.db import Pool
from worker.db.queries import Q
from worker.services.base import Service


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
