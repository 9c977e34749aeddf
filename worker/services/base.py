"""The one pattern of every background service: a loop, its backoff, its logging, its supervision.

* `Service`: a round at a time.  A subclass writes `round()`, which does one round and says
  how long to wait before the next (None: until woken); `run()` loops it, waits between
  rounds (cut short by `wake()`), and backs off while the database is away.
* `SessionService`: a service that lives on one database session (LISTEN, a lock held for
  as long as the session lasts).  A subclass writes `connect()` and `serve(conn)`, which
  returns or raises only when the session is gone; `run()` reconnects with backoff.
* `supervise()`: keeps a service running: a service that fails for any other reason (a bug,
  a row nobody expected) is logged and started again with backoff, and the worker goes on.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg

from worker import db
from worker.services.backoff import Backoff

log = logging.getLogger("syncworker.service")


class Service(ABC):
    """A background service run one round at a time."""

    name = "service"
    # Waits between attempts while the database is away.
    retry_initial, retry_maximum = 0.5, 10.0

    def __init__(self) -> None:
        self._woken = asyncio.Event()

    def wake(self) -> None:
        """Start the next round now rather than after the wait."""
        self._woken.set()

    @abstractmethod
    async def round(self) -> float | None:
        """Do one round; return the seconds to wait before the next (None: until woken)."""

    async def run(self) -> None:
        backoff = Backoff(initial=self.retry_initial, maximum=self.retry_maximum)
        while True:
            self._woken.clear()
            try:
                wait = await self.round()
                backoff.reset()
            except psycopg.OperationalError as exc:
                wait = backoff.next()
                log.warning("%s: %s; trying again in %.1fs", self.name, db.connection_problem(exc), wait)
            await self._wait(wait)

    async def _wait(self, seconds: float | None) -> None:
        if seconds is None:
            await self._woken.wait()
            return
        try:
            async with asyncio.timeout(seconds):
                await self._woken.wait()
        except TimeoutError:
            pass


class SessionService(ABC):
    """A background service that lives on one database session, reconnecting with backoff."""

    name = "session"
    retry_initial, retry_maximum = 0.2, 5.0

    @abstractmethod
    async def connect(self) -> psycopg.AsyncConnection[Any]:
        """A new session for `serve`."""

    @abstractmethod
    async def serve(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Use the session until it fails (return or raise OperationalError)."""

    def lost(self) -> None:  # noqa: B027 - optional hook
        """Called each time the session is gone (before the wait to reconnect)."""

    async def run(self) -> None:
        backoff = Backoff(initial=self.retry_initial, maximum=self.retry_maximum)
        while True:
            conn = None
            try:
                conn = await self.connect()
                backoff.reset()
                await self.serve(conn)
            except psycopg.OperationalError as exc:
                self.lost()
                wait = backoff.next()
                log.warning(
                    "%s: session lost (%s); reconnecting in %.1fs",
                    self.name,
                    db.connection_problem(exc),
                    wait,
                )
                await asyncio.sleep(wait)
            finally:
                if conn is not None:
                    await conn.close()


async def supervise(run: Callable[[], Awaitable[None]], name: str) -> None:
    """Run `run()` until it returns; if it fails, log why and start it again with backoff."""
    backoff = Backoff(initial=0.5, maximum=30.0)
    while True:
        try:
            await run()
            return
        except Exception:
            wait = backoff.next()
            log.exception("service %s failed; starting it again in %.1fs", name, wait)
            await asyncio.sleep(wait)
