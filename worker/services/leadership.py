"""Leadership: one replica at a time holds the leader lock and runs the leader's services."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import psycopg

from worker import db
from worker.db.queries import Q
from worker.services.base import SessionService

log = logging.getLogger("syncworker.leadership")

# The leader's session keeps one transaction open (no snapshot, no transaction id: it holds
# nothing back) and sends a short statement in it every LEADER_BEAT seconds; idle in it for
# longer than LEADER_IDLE_TIMEOUT, the server ends the session: a frozen leader is replaced
# within about LEADER_IDLE_TIMEOUT + STANDBY_POLL seconds, and an event loop may stall for
# LEADER_IDLE_TIMEOUT - LEADER_BEAT seconds without losing leadership.  Standbys try for the
# lock every STANDBY_POLL seconds.
LEADER_BEAT = 4.0
LEADER_IDLE_TIMEOUT = 7.0
STANDBY_POLL = 1.5


class Leadership(SessionService):
    """Holds the leader lock on a session of its own.

    The leader holds an advisory lock on a session of its own; standbys try for it every
    `STANDBY_POLL` seconds, so a dead leader is replaced within that time of Postgres closing
    its session.  A leader that is alive but frozen (a paused VM, a stuck extension) is
    replaced too: it sends a short statement every `LEADER_BEAT` seconds inside a
    transaction it keeps open, and the server ends its session once it sits idle in that
    transaction for longer than `LEADER_IDLE_TIMEOUT`.  No statement of either waits or
    sleeps in the server, and the open transaction has neither a snapshot nor a transaction
    id, so neither session keeps dead rows from being cleaned up; the beats commit nothing.
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
                self.url,
                self.application_name,
                by_set=self.by_set,
                idle_in_transaction_session_timeout=idle,
            ),
        )
        if self.by_set:
            await conn.execute(db.settings_statement(idle_in_transaction_session_timeout=idle))
        return conn

    async def serve(self, conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.execute(b"BEGIN")
        # A standby's looks, more often than LEADER_IDLE_TIMEOUT, keep its session too.
        while True:
            row = await (await conn.execute(Q["try_leadership"])).fetchone()
            if row is not None and row[0]:
                break
            await asyncio.sleep(STANDBY_POLL)
        self._set(True)
        while True:  # fails as soon as the session does
            await asyncio.sleep(LEADER_BEAT)
            await conn.execute(Q["stay_leader"])

    def lost(self) -> None:
        self._set(False)

    async def run(self) -> None:
        try:
            await super().run()
        finally:
            self._set(False)
