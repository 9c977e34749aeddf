"""Runs on change: the leader LISTENs on each real-time source and requests `realtime` runs."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
from psycopg import AsyncConnection, sql
from psycopg.rows import TupleRow, dict_row
from psycopg_pool import AsyncConnectionPool

from worker import connectors, db, secrets
from worker.db.queries import Q
from worker.run import hooks
from worker.run.outcome import config_problem
from worker.services.base import Service, SessionService, supervise

log = logging.getLogger("syncworker.realtime")

# Notifications arriving this close together become one run request.
COALESCE_SECONDS = 0.2
# The set of real-time jobs is read again when a trigger says one was added, changed,
# enabled or disabled (NOTIFY `realtime_jobs`), and at least this often.
RELOAD_SECONDS = 300.0  # a change to a real-time job wakes it at once (NOTIFY)

Pool = AsyncConnectionPool[AsyncConnection[TupleRow]]
# (dsn, channel) -> payload -> integration ids
Sources = dict[tuple[str, str], dict[str, list[int]]]


async def load_sources(pool: Pool) -> Sources:
    """The real-time jobs' sources.

    No row can stop this service: a job whose config cannot be used is disabled with the
    reason (as its run would do), and one whose secret this host cannot resolve is skipped
    with a warning (its runs say why); every other job is still listened for.
    """
    async with pool.connection() as conn:
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(Q["realtime_jobs"])
        rows = await cur.fetchall()
    found: Sources = defaultdict(lambda: defaultdict(list))
    invalid: dict[int, str] = {}
    for row in rows:
        try:
            if unreadable := db.read_json(row, "config"):
                raise connectors.ConfigError("", unreadable)
            connector = connectors.get(row["kind"])
            body, _ = hooks.split(row["config"])
            source = connector.realtime_source(connector.validate(body))
            if source is None:
                continue
            dsn = secrets.resolve(source.dsn, "source.dsn")
        except secrets.SecretError as exc:
            log.warning("%s: not listening for changes: %s", row["name"], secrets.redact(str(exc)))
            continue
        except Exception as exc:
            invalid[row["id"]] = f"invalid configuration: {config_problem(exc)}"[:1000]
            log.error("%s: disabled: %s", row["name"][:200], invalid[row["id"]])
            continue
        found[(dsn, source.channel)][source.payload].append(row["id"])
    if invalid:
        async with pool.connection() as conn:
            for integration_id, reason in invalid.items():
                await conn.execute(Q["disable_invalid"], {"integration_id": integration_id, "reason": reason})
    return {key: dict(value) for key, value in found.items()}


class SourceListener(SessionService):
    """One LISTEN session on one source database, reconnecting with backoff."""

    name = "realtime source"
    retry_initial, retry_maximum = 0.5, 30.0

    def __init__(self, dsn: str, channel: str, on_change: Callable[[str], None]) -> None:
        self.dsn = dsn
        self.channel = channel
        self.on_change = on_change
        self.name = f"realtime source {db.describe_target(dsn)}"

    async def connect(self) -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(
            self.dsn, autocommit=True, **db.connect_kwargs("syncworker realtime")
        )

    async def serve(self, conn: psycopg.AsyncConnection[Any]) -> None:
        # A source whose database or role sets idle_session_timeout would end this session,
        # which only waits, every so often: each reconnection is a gap and a catch-up run.
        await conn.execute(db.SETTINGS_FOR_ANY_SERVER)
        await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
        log.info("listening for changes on %s (channel %s)", db.describe_target(self.dsn), self.channel)
        # Changes made while nobody listened are caught by the job's scheduled run and its
        # lookback; one run now covers the gap sooner.
        self.on_change("*")
        async for notify in conn.notifies():
            self.on_change(notify.payload)


class Realtime(Service):
    """Leader service: keeps one SourceListener per source and turns bursts into run requests.

    It reads the jobs again when woken (`reload_soon`: a real-time job was added, changed,
    enabled or disabled) and at least every RELOAD_SECONDS.
    """

    name = "realtime"

    def __init__(self, pool: Pool, loader: Callable[[Pool], Awaitable[Sources]] = load_sources) -> None:
        super().__init__()
        self.pool = pool
        self.loader = loader
        self.sources: Sources = {}
        self.listeners: dict[tuple[str, str], asyncio.Task[None]] = {}
        self.pending: set[int] = set()
        self._flush: asyncio.TimerHandle | None = None
        self._flushing: set[asyncio.Task[int]] = set()

    def reload_soon(self) -> None:
        """A real-time job was added or changed: read the jobs again now."""
        self.wake()

    def changed(self, key: tuple[str, str], payload: str) -> None:
        payloads = self.sources.get(key, {})
        ids = [i for ids in payloads.values() for i in ids] if payload == "*" else payloads.get(payload, [])
        if not ids:
            return
        self.pending.update(ids)
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(COALESCE_SECONDS, self._start_flush)

    def _start_flush(self) -> None:
        self._flush = None
        task = asyncio.create_task(self.flush(), name="realtime run requests")
        self._flushing.add(task)
        task.add_done_callback(self._flushed)

    def _flushed(self, task: asyncio.Task[int]) -> None:
        self._flushing.discard(task)
        _log_failure(task)

    async def flush(self) -> int:
        ids, self.pending = sorted(self.pending), set()
        if not ids:
            return 0
        async with self.pool.connection() as conn:
            await conn.execute(Q["request_realtime_run"], {"ids": ids})
        log.info("changes seen: requested realtime runs of %s job(s)", len(ids))
        return len(ids)

    async def reload(self) -> None:
        self.sources = await self.loader(self.pool)
        for key in list(self.listeners):
            if key not in self.sources:
                self.listeners.pop(key).cancel()
        for key in self.sources:
            if key not in self.listeners:
                listener = SourceListener(key[0], key[1], functools.partial(self.changed, key))
                self.listeners[key] = asyncio.create_task(
                    supervise(listener.run, listener.name), name=f"realtime {key[1]}"
                )

    async def round(self) -> float:
        await self.reload()
        return RELOAD_SECONDS

    async def run(self) -> None:
        try:
            await super().run()
        finally:
            for task in self.listeners.values():
                task.cancel()
            await asyncio.gather(*self.listeners.values(), return_exceptions=True)
            self.listeners.clear()


def _log_failure(task: asyncio.Task[int]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("could not request realtime runs: %s", task.exception())
