"""Leadership: one replica at a time holds the leader lock and runs the leader's services."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import psycopg

from worker import db
from worker.db.queries import Q
from worker.services.base import SessionService

log = logging.getLogger("syncworker.leadership")

# The leader's session sleeps LEADER_SLEEP seconds per statement; idle longer than
# LEADER_IDLE_TIMEOUT between two of them, the server ends it: a frozen leader is replaced
# within about LEADER_SLEEP + LEADER_IDLE_TIMEOUT seconds.
LEADER_SLEEP = 6.0
LEADER_IDLE_TIMEOUT = 3.0


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
        self.by_set = False  # the session's settings go by SET (a pooler keeps startup options away)

    def _set(self, leader: bool) -> None:
        if leader != self.is_leader:
            self.is_leader = leader
            log.info("this worker is now %s", "the leader" if leader else "a standby")
            self.on_change(leader)

    async def connect(self) -> psycopg.AsyncConnection[Any]:
        idle = f"{LEADER_IDLE_TIMEOUT:g}s"
        conn = await psycopg.AsyncConnection.connect(
            self.url,
            autocommit=True,
            **db.session_kwargs(
                self.url, self.application_name, by_set=self.by_set, idle_session_timeout=idle
            ),
        )
        if self.by_set:
            await conn.execute(db.settings_statement(idle_session_timeout=idle))
        return conn

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
