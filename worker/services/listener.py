"""The worker's own session: it holds the worker lock, LISTENs for wake-ups, and reconnects."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg

from worker import __version__, db
from worker.daemon.alarm import Alarm
from worker.db.queries import Q
from worker.services.base import SessionService

log = logging.getLogger("syncworker.listener")

CHANNEL = "syncworker"


class Listener(SessionService):
    """Registers the worker once, then keeps a LISTEN session alive for as long as it runs.

    Every (re)connect takes the worker lock again (the proof, for the leader's
    rescuer, that this worker is alive) and rings the alarm, because NOTIFYs
    sent while disconnected are lost.
    """

    name = "listener"

    def __init__(
        self,
        url: str,
        alarm: Alarm,
        *,
        mode: str,
        concurrency: int,
        on_runs_started: Callable[[], None],
        on_realtime_jobs: Callable[[], None] = lambda: None,
    ) -> None:
        self.url = url
        self.alarm = alarm
        self.mode = mode
        self.concurrency = concurrency
        self.on_runs_started = on_runs_started
        self.on_realtime_jobs = on_realtime_jobs
        self.worker_id: int | None = None
        self.connected = asyncio.Event()
        self.by_set = False  # the session's settings go by SET (a pooler keeps startup options away)
        self.on_reconnect: Callable[[], Awaitable[None]] | None = None
        self._first: psycopg.AsyncConnection[Any] | None = None

    async def connect_once(self) -> psycopg.AsyncConnection[tuple[object, ...]]:
        conn = await psycopg.AsyncConnection.connect(
            self.url,
            autocommit=True,
            **db.session_kwargs(self.url, "syncworker listener", by_set=self.by_set),
        )
        try:
            if self.by_set:
                await conn.execute(db.settings_statement())
            if self.worker_id is None:
                cur = await conn.execute(
                    Q["register_worker"],
                    {
                        "hostname": socket.gethostname(),
                        "pid": os.getpid(),
                        "version": __version__,
                        "mode": self.mode,
                        "concurrency": self.concurrency,
                    },
                )
                row = await cur.fetchone()
                assert row is not None
                self.worker_id = int(str(row[0]))
            await conn.execute(Q["lock_worker"], {"worker_id": self.worker_id})
            await conn.execute(f"LISTEN {CHANNEL}")
        except BaseException:
            await conn.close()
            raise
        return conn

    def adopt(self, first: psycopg.AsyncConnection[Any]) -> None:
        """Serve this session (from `connect_once`, at start-up) before making new ones."""
        self._first = first

    async def connect(self) -> psycopg.AsyncConnection[Any]:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        conn = await self.connect_once()
        log.info("listener reconnected")
        if self.on_reconnect is not None:
            try:
                await self.on_reconnect()
            except BaseException:
                await conn.close()
                raise
        return conn

    async def serve(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self.connected.set()
        # NOTIFYs sent while this worker was not listening are lost: look at the table now.
        self.alarm.ring_now()
        async for notify in conn.notifies():
            self.handle(notify.payload)

    def lost(self) -> None:
        self.connected.clear()

    def handle(self, payload: str) -> None:
        try:
            message = json.loads(payload)
        except ValueError:
            log.debug("ignoring malformed notification %r", payload)
            return
        if not isinstance(message, dict):
            return
        due_in = message.get("due_in")
        if isinstance(due_in, int | float):
            self.alarm.ring_in(float(due_in))
        if message.get("runs_started"):
            self.on_runs_started()
        if message.get("realtime_jobs"):
            self.on_realtime_jobs()
