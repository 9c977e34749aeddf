"""Runs on change: the leader LISTENs on each real-time source and requests `realtime` runs."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable

import psycopg
from psycopg import AsyncConnection, sql
from psycopg.rows import TupleRow, dict_row
from psycopg_pool import AsyncConnectionPool

from worker import connectors, db, secrets
from worker.queries import Q
from worker.retry import Backoff

log = logging.getLogger("syncworker.realtime")

# Notifications arriving this close together become one run request.
COALESCE_SECONDS = 0.2
# How often the set of real-time jobs is read again (new, changed or disabled jobs).
RELOAD_SECONDS = 30.0

Pool = AsyncConnectionPool[AsyncConnection[TupleRow]]
# (dsn, channel) -> payload -> integration ids
Sources = dict[tuple[str, str], dict[str, list[int]]]


async def load_sources(pool: Pool) -> Sources:
    """The real-time jobs' sources; a job with a broken config or secret is skipped (its run says why)."""
    async with pool.connection() as conn:
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(Q["realtime_jobs"])
        rows = await cur.fetchall()
    found: Sources = defaultdict(lambda: defaultdict(list))
    for row in rows:
        try:
            connector = connectors.get(row["kind"])
            source = connector.realtime_source(connector.validate(row["config"]))
            if source is None:
                continue
            dsn = secrets.resolve(source.dsn, "source.dsn")
        except (connectors.ConfigError, secrets.SecretError) as exc:
            log.warning("%s: not listening for changes: %s", row["name"], secrets.redact(str(exc)))
            continue
        found[(dsn, source.channel)][source.payload].append(row["id"])
    return {key: dict(value) for key, value in found.items()}


class SourceListener:
    """One LISTEN session on one source database, reconnecting with backoff."""

    def __init__(self, dsn: str, channel: str, on_change: Callable[[str], None]) -> None:
        self.dsn = dsn
        self.channel = channel
        self.on_change = on_change

    async def run(self) -> None:
        backoff = Backoff(initial=0.5, maximum=30.0)
        target = db.describe_target(self.dsn)
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self.dsn, autocommit=True, **db.connect_kwargs("syncworker realtime")
                ) as conn:
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
                    log.info("listening for changes on %s (channel %s)", target, self.channel)
                    backoff.reset()
                    # Changes made while we were away are caught by the job's scheduled run
                    # and its lookback; one run now covers the gap sooner.
                    self.on_change("*")
                    async for notify in conn.notifies():
                        self.on_change(notify.payload)
            except psycopg.OperationalError as exc:
                delay = backoff.next()
                log.warning(
                    "lost %s (%s); listening again in %.1fs", target, db.connection_problem(exc), delay
                )
                await asyncio.sleep(delay)


class Realtime:
    """Leader service: keeps one SourceListener per source and turns bursts into run requests."""

    def __init__(self, pool: Pool, loader: Callable[[Pool], Awaitable[Sources]] = load_sources) -> None:
        self.pool = pool
        self.loader = loader
        self.sources: Sources = {}
        self.listeners: dict[tuple[str, str], asyncio.Task[None]] = {}
        self.pending: set[int] = set()
        self._flush: asyncio.TimerHandle | None = None

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
        asyncio.create_task(self.flush()).add_done_callback(_log_failure)

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
                self.listeners[key] = asyncio.create_task(listener.run(), name=f"realtime {key[1]}")

    async def run(self) -> None:
        try:
            while True:
                try:
                    await self.reload()
                except psycopg.OperationalError as exc:
                    log.warning("could not read the real-time jobs: %s", db.connection_problem(exc))
                await asyncio.sleep(RELOAD_SECONDS)
        finally:
            for task in self.listeners.values():
                task.cancel()
            await asyncio.gather(*self.listeners.values(), return_exceptions=True)
            self.listeners.clear()


def _log_failure(task: asyncio.Task[int]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("could not request realtime runs: %s", task.exception())
