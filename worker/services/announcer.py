"""Telling the other replicas when this one's finished runs are next due.

A finish reschedules a job next due in more than 5 minutes without a NOTIFY (one inside the
run's transaction would serialise every notifying commit of the server).  The worker that
finished it wakes for the slot on its own; the others learn it from this service: after runs
finished with a next slot, one statement NOTIFYs the earliest due time of the whole table, at
most every `gap` seconds.  So a replica that dies with jobs scheduled leaves no slot unknown
to the others."""

from __future__ import annotations

import asyncio

from worker.db import Pool
from worker.db.queries import Q
from worker.services.base import Service

GAP = 0.25  # seconds between two announcements


class DueAnnouncer(Service):
    name = "due announcer"

    def __init__(self, pool: Pool, gap: float = GAP) -> None:
        super().__init__()
        self.pool = pool
        self.gap = gap
        self._asked = False

    def ask(self) -> None:
        """A run finished with a next slot: announce the table's earliest due time soon."""
        self._asked = True
        self.wake()

    async def round(self) -> float | None:
        if not self._asked:
            return None
        async with self.pool.connection() as conn:
            await conn.execute(Q["announce_due"])
        self._asked = False
        await asyncio.sleep(self.gap)
        return None
