"""The rescuer (every replica): runs whose session is gone are abandoned and their jobs run
again at once; runs far past their timeout and replicas lost for long have their sessions
terminated (see `rescue_abandoned` in worker/db/queries.sql)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from worker.db import Pool
from worker.db.queries import Q
from worker.services.base import Service

log = logging.getLogger("syncworker.rescuer")

# With nothing running anywhere the rescuer still looks this often, in case a
# "runs started" NOTIFY was missed while this replica was reconnecting.
IDLE_RESCUE_INTERVAL = 300.0


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
