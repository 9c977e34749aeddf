"""The pruner (leader): finished runs, resolved errors and stopped replicas older than the
retention are deleted, in batches."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from worker.db import Pool
from worker.db.queries import Q
from worker.services.base import Service

log = logging.getLogger("syncworker.pruner")

PRUNE_INTERVAL = 3600.0
PRUNE_BATCH = 5000


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
