"""`postgres`: mirror a table (or query) of another database into a destination table.

The first run copies everything, streamed in key order as raw `COPY` data, one batch
per statement, all in one snapshot of the source; each batch is checkpointed with the
last key it holds, so a crash resumes where the copy stopped.  Later runs are
incremental.  How they find the changed rows depends on the source:

* a table on a primary (the usual case): the rows written by transactions the previous
  run's snapshot could not see, found by their `xmin` (see `postgres_tracking`).  No
  clock is trusted: a transaction that commits late, or stamps `updated_at` from a skewed
  clock, is read all the same, and rows written long ago are never read again;
* a query, a view, a foreign table or a standby: every row whose `updated_at` is after the
  saved watermark; the rows within the lookback window before it are compared with the
  destination's per key bucket, and the buckets that differ are read again (rows sharing
  the watermark value are never skipped; rows whose commit was late within the lookback
  are caught);
* neither: every row, every run.

Deletes: `none`; `soft` (the source marks a deleted row by setting a column; that row is
removed from the destination); `hard`: the keys recorded by the source's delete trigger
since the previous run (`syncworker install-trigger`), and periodically, a comparison of
key buckets (row count and a sum of key hashes per bucket) that re-reads only the keys of
the buckets that differ.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import re
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import AsyncConnection, sql
from psycopg.rows import TupleRow

from worker import db, secrets
from worker.connectors.base import Connector, RealtimeSource, RunContext, RunResult, SyncError
from worker.connectors.config import (
    ConfigError,
    check_secret,
    expect,
    identifier,
    key_columns,
    reject_unknown,
    require,
    table_name,
)
from worker.connectors.load import Destination, Loader, destination_session, parse_destination
from worker.connectors.postgres_tracking import (
    DELETE_TRIGGER,
    HORIZON,
    INTEGER_TYPES,
    TOMBSTONE_RETENTION_DAYS,
    TOMBSTONES,
    bucket_count,
    bucket_of,
    changed_since,
    cursor_problem,
    key_hash,
)

# NOTIFY channel of the real-time trigger; the payload is the source table's name.
CHANNEL = "syncworker_changes"
DEFAULT_HARD_DELETE_SECONDS = 3600
# Lookback when the job has no schedule to scale it from.
DEFAULT_LOOKBACK_SECONDS = 3600
DELETE_MODES = ("none", "soft", "hard")
# How a run finds what changed (see the module's docstring).
BY_XMIN, BY_UPDATED_AT, EVERYTHING = "xmin", "updated_at", "everything"
# The first copy commits its batches (with the position they reach) at most this often: a
# commit per batch costs more than the batch when batches are small.
COPY_CHECKPOINT_SECONDS = 0.5
# Bytes of COPY data gathered per read from the source (rows arrive one message each).
READ_BLOCK = 1 << 18
READ_ROWS = 2048
# work_mem of the per-bucket aggregates (this transaction only).
AGGREGATE_WORK_MEM = "32MB"
# Blocks read ahead of the destination's writes by the copy's stream.
PREFETCH_BLOCKS = 4
_TRUE = sql.SQL("TRUE")
_TIME_TYPES = re.compile(r"^(timestamp|date)")

Conn = AsyncConnection[TupleRow]


@dataclass(frozen=True)
class Source:
    dsn: Any  # secret reference
    table: tuple[str, ...] | None
    query: str | None
    key: tuple[str, ...]
    updated_at: str | None
    columns: tuple[str, ...] | None

    @property
    def name(self) -> str:
        return ".".join(self.table) if self.table else "(query)"

    def relation(self) -> sql.Composable:
        if self.table is not None:
            return sql.Identifier(*self.table)
        assert self.query is not None
        return sql.SQL("({}) AS q").format(sql.SQL(self.query))


@dataclass(frozen=True)
class PostgresConfig:
    source: Source
    destination: Destination
    deletes: str
    soft_delete_column: str | None
    hard_delete_every: float
    lookback: float | None  # seconds; None = three times the job's period
    realtime: bool


class PostgresConnector(Connector):
    kind = "postgres"

    def validate(self, config: Mapping[str, Any]) -> PostgresConfig:
        reject_unknown(
            config,
            {
                "source",
                "destination",
                "deletes",
                "soft_delete_column",
                "hard_delete_every_seconds",
                "lookback_seconds",
                "realtime",
            },
        )
        source = parse_source(config)
        destination = parse_destination(config)
        if not set(destination.key) <= set(source.columns or destination.key):
            raise ConfigError("source.columns", "must include the destination's key columns")
        deletes = expect(config, "deletes", str, "one of none, soft, hard", "none")
        if deletes not in DELETE_MODES:
            raise ConfigError("deletes", f'expected one of none, soft, hard, got "{deletes}"')
        soft = config.get("soft_delete_column")
        if deletes == "soft":
            if soft is None:
                raise ConfigError("soft_delete_column", 'is required with "deletes": "soft"')
            identifier(soft, "soft_delete_column")
        elif soft is not None:
            raise ConfigError("soft_delete_column", 'only applies with "deletes": "soft"')
        every = expect(config, "hard_delete_every_seconds", (int, float), "a number of seconds", None)
        if every is not None and (every < 0 or deletes != "hard"):
            raise ConfigError(
                "hard_delete_every_seconds", 'expected seconds >= 0, and only with "deletes": "hard"'
            )
        lookback = expect(config, "lookback_seconds", (int, float), "a number of seconds", None)
        if lookback is not None and lookback < 0:
            raise ConfigError("lookback_seconds", f"expected seconds >= 0, got {lookback}")
        realtime = expect(config, "realtime", bool, "true or false", False)
        if realtime and source.table is None:
            raise ConfigError("realtime", "needs source.table (a trigger cannot watch a query)")
        if source.updated_at is None and (lookback is not None or realtime):
            raise ConfigError("source.updated_at", "is required for incremental and real-time syncs")
        return PostgresConfig(
            source,
            destination,
            deletes,
            soft,
            float(DEFAULT_HARD_DELETE_SECONDS if every is None else every),
            None if lookback is None else float(lookback),
            realtime,
        )

    def realtime_source(self, config: Any) -> RealtimeSource | None:
        cfg: PostgresConfig = config
        if not cfg.realtime or cfg.source.table is None:
            return None
        return RealtimeSource(cfg.source.dsn, CHANNEL, qualified_name(cfg.source.table))

    async def run(self, ctx: RunContext) -> RunResult:
        cfg: PostgresConfig = ctx.config
        source_dsn = secrets.resolve(cfg.source.dsn, "source.dsn")
        async with await psycopg.AsyncConnection.connect(
            source_dsn, **db.connect_kwargs("syncworker source")
        ) as src:
            await src.execute("SET TimeZone = 'UTC'")
            await src.commit()
            # Reads see one snapshot each (the incremental's max(updated_at) and its rows).
            await src.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)
            await src.set_read_only(True)
            async with destination_session(ctx, cfg.destination) as dest:
                return await Mirror(ctx, cfg, src, dest, external=cfg.destination.dsn is not None).run()


def parse_source(config: Mapping[str, Any]) -> Source:
    src = require(config, "source", dict, 'an object like {"dsn": {"env": "SRC"}, "table": "public.t"}')
    reject_unknown(src, {"dsn", "table", "query", "key", "updated_at", "columns"}, "source")
    dsn = check_secret(src, "dsn", "source.dsn", required=True)
    table = query = None
    if ("table" in src) == ("query" in src):
        raise ConfigError("source.table", "set either source.table or source.query")
    if "table" in src:
        table = table_name(src["table"], "source.table")
    else:
        query = expect(src, "query", str, "a SELECT statement", prefix="source")
        if not query or not query.strip():
            raise ConfigError("source.query", "must not be empty")
        query = query.strip().rstrip(";")
    key = key_columns(src.get("key", config.get("destination", {}).get("key")), "source.key")
    updated_at = src.get("updated_at")
    if updated_at is not None:
        identifier(updated_at, "source.updated_at")
    columns = src.get("columns")
    if columns is not None:
        columns = key_columns(columns, "source.columns")
        if not set(key) <= set(columns):
            raise ConfigError("source.columns", "must include the key column(s)")
    return Source(dsn, table, query, key, updated_at, columns)


def qualified_name(table: tuple[str, ...]) -> str:
    return ".".join(table) if len(table) == 2 else f"public.{table[0]}"


class Mirror:
    """One run of a postgres job: full copy or incremental, then deletes."""

    def __init__(self, ctx: RunContext, cfg: PostgresConfig, src: Conn, dest: Conn, *, external: bool):
        self.ctx = ctx
        self.cfg = cfg
        self.src = src
        self.dest = dest
        self.external = external
        self.read = 0
        self.loader: Loader | None = None
        self.types: dict[str, str] = {}
        self.tracking = EVERYTHING
        # the destination was empty when the first copy started (no stale rows to find)
        self.fresh = False
        self.saved_at = 0.0  # when the copy last checkpointed (monotonic)
        # whether the tombstones held every delete since this run's starting cursor
        # (None: there are none to read)
        self.tombstones_cover: bool | None = None

    @property
    def source(self) -> Source:
        return self.cfg.source

    async def run(self) -> RunResult:
        columns, types = await self.source_columns()
        self.types = types
        self.tracking = await self.tracking_mode()
        key = list(self.source.key)
        ordered = key + [c for c in columns if c not in key]
        loader = self.loader = Loader(
            self.dest, self.cfg.destination, ordered, self.ctx, soft_delete=self.cfg.deletes == "soft"
        )
        await loader.prepare(create_columns={c: types[c] for c in ordered})
        try:
            state = dict(self.ctx.state)
            copied = state.get("phase") != "incremental"
            if copied:
                state = await self.full_copy(ordered, state)
                await self.checkpoint(state)
            # After a full copy too: what changed while it ran is caught before the run ends.
            # (Without any way to tell what changed every run reads everything; once is enough.)
            if not copied or self.tracking != EVERYTHING:
                state = await self.incremental(ordered, state)
            if self.cfg.deletes == "hard":
                if self.key_diff_due(copied):
                    state = {**state, "keys_checked_at": time.time()}
                    await self.bucket_deletes()
                    await self.src.rollback()
                    await self.prune_tombstones()
                elif copied:  # every delete since the copy's snapshot was in the tombstones
                    state = {**state, "keys_checked_at": time.time()}
            await self.src.rollback()
        finally:
            await loader.close()
        await self.commit_data()
        return loader.counts.result(self.ctx, self.read, state)

    # -- reading the source ---------------------------------------------------------------

    async def source_columns(self) -> tuple[list[str], dict[str, str]]:
        """The columns to copy (the source's, or the configured subset) and their SQL types."""
        cur = await self.src.execute(sql.SQL("SELECT * FROM {} LIMIT 0").format(self.source.relation()))
        names = [c.name for c in cur.description or []]
        oids = [c.type_code for c in cur.description or []]
        cur = await self.src.execute("SELECT format_type(o, NULL) FROM unnest(%s::oid[]) o", [oids])
        types = dict(zip(names, [r[0] for r in await cur.fetchall()], strict=True))
        if self.source.table is not None:
            exact = await self.src.execute(
                """
                SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute
                 WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped
                """,
                [self.regclass()],
            )
            types.update(dict(await exact.fetchall()))
        wanted = list(self.source.columns or names)
        needed = [*wanted, *self.source.key]
        if self.source.updated_at:
            needed.append(self.source.updated_at)
        if self.cfg.soft_delete_column:
            needed.append(self.cfg.soft_delete_column)
        missing = sorted({c for c in needed if c not in types})
        if missing:
            raise SyncError(
                f"source {self.source.name} has no column {', '.join(missing)}", error_type="source_invalid"
            )
        await self.src.rollback()
        return wanted, types

    def regclass(self) -> str:
        assert self.source.table is not None
        return sql.Identifier(*self.source.table).as_string(None)

    async def tracking_mode(self) -> str:
        """xmin for a table on a primary whose row versions can be read; else updated_at, else all."""
        mode = BY_UPDATED_AT if self.source.updated_at else EVERYTHING
        if self.source.table is not None:
            cur = await self.src.execute(
                "SELECT c.relkind::text, pg_is_in_recovery(), current_setting('server_version_num')::int"
                " FROM pg_class c WHERE c.oid = %s::regclass",
                [self.regclass()],
            )
            row = await cur.fetchone()
            # pg_current_snapshot() and xid8 came with PostgreSQL 13
            if row is not None and row[0] in ("r", "p") and not row[1] and row[2] >= 130000:
                try:
                    async with self.src.transaction():
                        await self.src.execute(
                            sql.SQL("SELECT xmin FROM {} LIMIT 0").format(self.source.relation())
                        )
                    mode = BY_XMIN
                except psycopg.errors.QueryCanceled:
                    raise
                except psycopg.Error as exc:
                    if self.src.broken or isinstance(exc, psycopg.OperationalError):
                        raise
            await self.src.rollback()
        self.ctx.log.debug("changes in %s are found by %s", self.source.name, mode)
        return mode

    async def snapshot_cursor(self) -> tuple[int, int]:
        """Open the source transaction's snapshot; return (cursor, xmax) as 64-bit transaction ids.

        The cursor is the oldest transaction whose rows this snapshot may not see: the
        snapshot's oldest running transaction, leaving out those of other databases (they
        cannot write this table).  Those are read in a transaction of their own just before
        the snapshot is taken, so a transaction that starts in between counts as one of ours.
        """
        cur = await self.src.execute(
            """
            SELECT coalesce(array_agg(backend_xid::text), '{}') FROM pg_stat_activity
             WHERE backend_xid IS NOT NULL AND datid IS DISTINCT FROM
                   (SELECT oid FROM pg_database WHERE datname = current_database())
            """
        )
        row = await cur.fetchone()
        elsewhere = {int(x) for x in (row[0] if row else [])}
        await self.src.rollback()
        cur = await self.src.execute(
            "SELECT pg_snapshot_xmax(s)::text, array(SELECT x::text FROM pg_snapshot_xip(s) x)"
            " FROM pg_current_snapshot() s"
        )
        row = await cur.fetchone()
        assert row is not None
        xmax = int(row[0])
        ours = [int(x) for x in row[1] if int(x) % (1 << 32) not in elsewhere]
        cursor = min([*ours, xmax])
        self.ctx.log.debug(
            "snapshot of %s: cursor %s, xmax %s, %s running elsewhere",
            self.source.name,
            cursor,
            xmax,
            len(row[1]) - len(ours),
        )
        return cursor, xmax

    def select(self, columns: list[str]) -> sql.Composable:
        parts: list[sql.Composable] = [sql.Identifier(c) for c in columns]
        if self.cfg.soft_delete_column:
            col = sql.Identifier(self.cfg.soft_delete_column)
            parts.append(sql.SQL("({c} IS NOT NULL AND {c}::text NOT IN ('false', 'f'))").format(c=col))
        return sql.SQL(", ").join(parts)

    async def full_copy(self, columns: list[str], state: dict[str, Any]) -> dict[str, Any]:
        """Copy everything in key order, a batch at a time, checkpointing every half second.

        All batches are read in one snapshot (one statement, while every batch goes straight
        into the table; else a statement per batch); its cursor is where the next pass starts
        from.  A copy resumed after a crash keeps the cursor of the copy's start: the rows
        changed since are read by the pass that follows, whichever batch they were in.
        """
        key = sql.SQL(", ").join(sql.Identifier(k) for k in self.source.key)
        if state.get("phase") != "full":
            cursor = (await self.snapshot_cursor())[0] if self.tracking == BY_XMIN else None
            high = await self.high_water()
            self.fresh = not await self.destination_has_rows()
            state = {
                "phase": "full",
                "after": None,
                "high_water": high,
                "xmin": None if cursor is None else str(cursor),
                "fresh": self.fresh,
            }
            self.ctx.log.info("full copy of %s started", self.source.name)
        else:
            self.fresh = state.get("fresh") is True
            self.ctx.log.info("full copy of %s resumed after key %s", self.source.name, state["after"])
        size = self.cfg.destination.batch_size
        self.saved_at = time.monotonic()
        assert self.loader is not None
        finished = False
        if self.loader.can_copy_direct:
            state, finished = await self.stream_copy(columns, state)
        while not finished:
            after = state["after"]
            statement = sql.SQL(
                "COPY (SELECT {cols} FROM {rel} WHERE {where} ORDER BY {key} LIMIT {n}) TO STDOUT"
            ).format(
                cols=self.select(columns),
                rel=self.source.relation(),
                where=self.after_key(after),
                key=key,
                n=sql.Literal(size),
            )
            batch = await self.copy_batch(statement, after, direct=self.loader.can_copy_direct)
            if batch is None:  # some rows were already there (or one is bad): upsert this batch
                batch = await self.copy_batch(statement, after, direct=False)
            assert batch is not None
            self.read += batch.rows
            if batch.rows < size:
                break
            state = {**state, "after": batch.last_key(len(self.source.key))}
            await self.checkpoint_copy(state)
        await self.src.rollback()
        self.ctx.log.info("full copy of %s done: %s rows", self.source.name, self.read)
        done: dict[str, Any] = {"phase": "incremental"}
        if self.tracking == BY_XMIN and state.get("xmin") is not None:
            done["xmin"] = state["xmin"]
        if state.get("high_water") is not None or self.tracking == BY_UPDATED_AT:
            done["watermark"] = state.get("high_water")
        return done

    def after_key(self, after: list[str | None] | None) -> sql.Composable:
        if after is None:
            return sql.SQL("TRUE")
        key = sql.SQL(", ").join(sql.Identifier(k) for k in self.source.key)
        return sql.SQL("({}) > ({})").format(key, sql.SQL(", ").join(sql.Placeholder() * len(after)))

    async def checkpoint_copy(self, state: dict[str, Any]) -> None:
        """Checkpoint the copy's position, at most every COPY_CHECKPOINT_SECONDS."""
        if time.monotonic() - self.saved_at >= COPY_CHECKPOINT_SECONDS:
            await self.checkpoint(state)
            self.saved_at = time.monotonic()

    async def stream_copy(self, columns: list[str], state: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """The copy's fast path: one statement for all that is left, COPYed into the table a
        batch at a time.  Returns the state reached and whether the copy is done; not done when
        a batch met rows already there (or a bad one), and the rest goes batch by batch."""
        assert self.loader is not None
        key = sql.SQL(", ").join(sql.Identifier(k) for k in self.source.key)
        after = state["after"]
        # An index on the key streams the rows in order; sorting the whole table would not.
        await self.src.execute("SET LOCAL enable_sort = off")
        statement = sql.SQL("COPY (SELECT {cols} FROM {rel} WHERE {where} ORDER BY {key}) TO STDOUT").format(
            cols=self.select(columns), rel=self.source.relation(), where=self.after_key(after), key=key
        )
        stream = CopyStream(self.src.cursor().copy(statement, after), prefetch=True)
        try:
            async with stream:
                while not stream.done:
                    before = stream.rows
                    if not await self.loader.copy_direct(stream.chunks(self.cfg.destination.batch_size)):
                        raise _GaveWay
                    self.read += stream.rows - before
                    if stream.rows > before:
                        state = {**state, "after": stream.last_key(len(self.source.key))}
                        await self.checkpoint_copy(state)
        except _GaveWay:
            # The statement was cancelled, and its transaction with it: the rest is read in
            # another snapshot, which the cursor saved at the copy's start covers.
            await self.src.rollback()
            return state, False
        return state, True

    async def destination_has_rows(self) -> bool:
        cur = await self.dest.execute(
            sql.SQL("SELECT EXISTS (SELECT FROM {})").format(self.cfg.destination.identifier())
        )
        row = await cur.fetchone()
        return bool(row and row[0])

    async def copy_batch(self, statement: sql.Composed, params: Any, *, direct: bool) -> CopyStream | None:
        """One batch of the full copy into the destination; None if the direct COPY gave way."""
        assert self.loader is not None
        batch = CopyStream(self.src.cursor().copy(statement, params))
        async with batch:
            if direct:
                loaded = await self.loader.copy_direct(batch.chunks())
            else:
                await self.loader.load_copy_data(batch.chunks())
                loaded = True
        return batch if loaded else None

    async def incremental(self, columns: list[str], state: dict[str, Any]) -> dict[str, Any]:
        """Every row changed since the saved cursor, read in one snapshot (left open for deletes)."""
        where: sql.Composable = sql.SQL("TRUE")
        params: list[Any] = []
        new = dict(state)
        since: Any = None
        check_window: str | None = None
        if self.tracking == BY_XMIN:
            cursor, xmax = await self.snapshot_cursor()
            previous = state.get("xmin")
            start = int(previous) if previous is not None else None
            if start is not None and (problem := cursor_problem(start, xmax)) is not None:
                self.ctx.log.warning("%s: %s; reading every row once", self.source.name, problem)
                start = None
            if start is not None:
                where, params = changed_since(start)
            since = f"transaction {start}" if start is not None else "the start"
            new.pop("watermark", None)
            new["xmin"] = str(cursor)
            if self.cfg.deletes == "hard" and start is not None:
                self.tombstones_cover = await self.apply_tombstones(start)
        else:
            high = await self.high_water()
            watermark = state.get("watermark")
            if watermark is not None and self.source.updated_at is not None:
                col = sql.Identifier(self.source.updated_at)
                if self.window_checkable(columns):
                    # after the watermark; the lookback window is compared, not read
                    check_window = watermark
                    where = sql.SQL("{} > %s::{}").format(col, sql.SQL(await self._updated_at_type()))
                    params = [watermark]
                    since = watermark
                else:
                    where = sql.SQL("{col} >= {since}").format(col=col, since=await self.since_expression())
                    params = [watermark, self.lookback()]
                    since = f"{watermark} (lookback {self.lookback()}s)"
            new.pop("xmin", None)
            if self.source.updated_at is not None:
                new["watermark"] = high if high is not None else watermark
        statement = sql.SQL("COPY (SELECT {cols} FROM {rel} WHERE {where}) TO STDOUT").format(
            cols=self.select(columns), rel=self.source.relation(), where=where
        )
        stream = CopyStream(self.src.cursor().copy(statement, params or None), prefetch=True)
        assert self.loader is not None
        async with stream:
            while not stream.done:
                await self.loader.load_copy_data(stream.chunks(self.cfg.destination.batch_size))
                await self.commit_data()
        self.read += stream.rows
        self.ctx.log.info(
            "incremental sync of %s: %s rows changed since %s", self.source.name, stream.rows, since
        )
        if check_window is not None:
            await self.compare_window(columns, check_window)
        return new

    def window_checkable(self, columns: list[str]) -> bool:
        """Whether the destination holds updated_at, so the lookback window can be compared."""
        assert self.loader is not None
        return self.source.updated_at is not None and self.source.updated_at in columns

    # long: the window's SQL for both sides, then the re-read of the buckets that differ
    async def compare_window(self, columns: list[str], watermark: str) -> None:
        """Rows with `updated_at` in the lookback window before `watermark`: compare both sides
        per key bucket (count, sum of hashes of key and updated_at) and read again only the
        source rows of the buckets that differ (a late commit, a clock behind), whatever their
        `updated_at` now.  Nothing differs in the usual case, and nothing is read."""
        assert self.loader is not None and self.source.updated_at is not None
        started = time.monotonic()
        column_type = await self._updated_at_type()
        col = self.source.updated_at
        if _TIME_TYPES.match(column_type):
            low = sql.SQL("({w}::{t} - make_interval(secs => {l}))")
        else:
            low = sql.SQL("({w}::{t} - {l})")
        since = low.format(w=sql.Literal(watermark), t=sql.SQL(column_type), l=sql.Literal(self.lookback()))
        until = sql.SQL("{}::{}").format(sql.Literal(watermark), sql.SQL(column_type))

        def window(alias: str | None) -> sql.Composable:
            c = sql.Identifier(alias, col) if alias else sql.Identifier(col)
            return sql.SQL("{c} >= {since} AND {c} <= {until}").format(c=c, since=since, until=until)

        src_where = window(None)
        if self.cfg.soft_delete_column:  # rows marked deleted are not in the destination
            soft = sql.Identifier(self.cfg.soft_delete_column)
            src_where = sql.SQL("{} AND NOT ({s} IS NOT NULL AND {s}::text NOT IN ('false', 'f'))").format(
                src_where, s=soft
            )
        key = self.source.key
        dest_key = self.cfg.destination.key
        src_hash, dest_hash = key_hash(key, {}), key_hash(dest_key, {}, alias="d")
        src_sum = key_hash((*key, col), {})
        dest_sum = key_hash((*dest_key, col), {}, alias="d")
        # timestamps hashed as text, in UTC as on the source (the session's zone is put back)
        cur = await self.dest.execute("SELECT current_setting('TimeZone')")
        zone = await cur.fetchone()
        await self.dest.execute("SET LOCAL TimeZone = 'UTC'")
        cur = await self.src.execute(
            sql.SQL("SELECT count(*) FROM {} WHERE {}").format(self.source.relation(), src_where)
        )
        row = await cur.fetchone()
        buckets = bucket_count(int(row[0]) if row else 0)
        differing = await self.differing_buckets(
            src_hash,
            dest_hash,
            buckets,
            src_sum=src_sum,
            dest_sum=dest_sum,
            src_where=src_where,
            dest_where=window("d"),
        )
        if zone is not None:
            await self.dest.execute("SELECT set_config('TimeZone', %s, true)", [zone[0]])
        reread = 0
        if differing:
            if len(differing) > buckets // 2:
                where: sql.Composable = src_where
                params: list[Any] | None = None
            else:
                where = sql.SQL("{} IN (SELECT unnest(%s::int[]))").format(bucket_of(src_hash, buckets))
                params = [differing]
            statement = sql.SQL("COPY (SELECT {cols} FROM {rel} WHERE {where}) TO STDOUT").format(
                cols=self.select(columns), rel=self.source.relation(), where=where
            )
            stream = CopyStream(self.src.cursor().copy(statement, params), prefetch=True)
            async with stream:
                while not stream.done:
                    await self.loader.load_copy_data(stream.chunks(self.cfg.destination.batch_size))
                    await self.commit_data()
            reread = stream.rows
            self.read += reread
        self.ctx.log.info(
            "lookback window of %s: %s of %s key buckets differ, %s rows read again (%.2fs)",
            self.source.name,
            len(differing),
            buckets,
            reread,
            time.monotonic() - started,
        )

    async def high_water(self) -> str | None:
        if self.source.updated_at is None or self.tracking == BY_XMIN:
            return None
        cur = await self.src.execute(
            sql.SQL("SELECT max({})::text FROM {}").format(
                sql.Identifier(self.source.updated_at), self.source.relation()
            )
        )
        row = await cur.fetchone()
        return None if row is None else row[0]

    async def since_expression(self) -> sql.Composable:
        """`watermark - lookback` in the type of updated_at (an interval for times, a number else)."""
        column_type = await self._updated_at_type()
        if _TIME_TYPES.match(column_type):
            return sql.SQL("(%s::{t} - make_interval(secs => %s))").format(t=sql.SQL(column_type))
        return sql.SQL("(%s::{t} - %s)").format(t=sql.SQL(column_type))

    async def _updated_at_type(self) -> str:
        assert self.source.updated_at is not None
        cur = await self.src.execute(
            sql.SQL("SELECT {} FROM {} LIMIT 0").format(
                sql.Identifier(self.source.updated_at), self.source.relation()
            )
        )
        oid = (cur.description or [])[0].type_code
        cur = await self.src.execute("SELECT format_type(%s, NULL)", [oid])
        row = await cur.fetchone()
        assert row is not None
        return str(row[0])

    def lookback(self) -> float:
        if self.cfg.lookback is not None:
            return self.cfg.lookback
        if self.ctx.period_seconds is not None:
            return 3 * self.ctx.period_seconds
        return DEFAULT_LOOKBACK_SECONDS

    # -- deletes --------------------------------------------------------------------------

    def key_diff_due(self, copied: bool) -> bool:
        """Whether to compare key buckets this run.

        After a full copy, unless the destination started empty and the tombstones covered
        every delete since the copy's snapshot; when the tombstones miss part of what this
        run had to cover; and every `hard_delete_every_seconds`, tombstones or not (they
        miss what a disabled trigger did not record).
        """
        if copied:
            return not (self.fresh and self.tombstones_cover is True)
        if self.tombstones_cover is False:
            return True  # installed, but they miss part of the span (a TRUNCATE, pruned)
        last = self.ctx.state.get("keys_checked_at")
        if not isinstance(last, int | float):
            return True
        return time.time() - last >= self.cfg.hard_delete_every

    def tombstone_names(self) -> tuple[sql.Identifier, sql.Identifier]:
        assert self.source.table is not None
        schema, _, _ = qualified_name(self.source.table).partition(".")
        return sql.Identifier(schema, TOMBSTONES), sql.Identifier(schema, HORIZON)

    async def tombstone_horizon(self) -> int | None:
        """From which transaction on the source records every delete of this table (None: it does not)."""
        if self.source.table is None:
            return None
        _, horizon = self.tombstone_names()
        try:
            async with self.src.transaction():
                cur = await self.src.execute("SELECT to_regclass(%s) IS NOT NULL", [horizon.as_string(None)])
                row = await cur.fetchone()
                if not row or not row[0]:
                    return None
                cur = await self.src.execute(
                    sql.SQL(
                        """
                        SELECT h.key, h.complete_from::text FROM {horizon} h
                         WHERE h.relation = %s
                           AND EXISTS (SELECT FROM pg_trigger t WHERE t.tgrelid = %s::regclass
                                          AND t.tgname = %s AND t.tgenabled <> 'D')
                        """
                    ).format(horizon=horizon),
                    [qualified_name(self.source.table), self.regclass(), DELETE_TRIGGER],
                )
                found = await cur.fetchone()
        except psycopg.errors.QueryCanceled:
            raise
        except psycopg.Error as exc:
            if self.src.broken or isinstance(exc, psycopg.OperationalError):
                raise
            self.ctx.log.info("tombstones of %s cannot be read: %s", self.source.name, exc)
            return None
        if found is None or list(found[0]) != list(self.source.key):
            return None
        return int(found[1])

    async def apply_tombstones(self, start: int) -> bool | None:
        """Delete the keys the source's trigger recorded since `start` and that the source no
        longer has.  None when there is no such trigger (or for another key); False when the
        tombstones miss part of that span (pruned past it, installed since, a TRUNCATE)."""
        complete_from = await self.tombstone_horizon()
        if complete_from is None:
            return None
        if start < complete_from:
            return False
        assert self.source.table is not None
        tomb, _ = self.tombstone_names()
        relation = qualified_name(self.source.table)
        cur = await self.src.execute(
            sql.SQL(
                "SELECT EXISTS (SELECT FROM {} WHERE relation = %s AND xid >= %s::xid8 AND key IS NULL)"
            ).format(tomb),
            [relation, str(start)],
        )
        row = await cur.fetchone()
        if row and row[0]:
            self.ctx.log.info("%s was truncated: its keys are compared in buckets", self.source.name)
            return False
        key = self.source.key
        values = sql.SQL(", ").join(sql.SQL("t.key[{}]").format(sql.Literal(i + 1)) for i in range(len(key)))
        match = sql.SQL(" AND ").join(
            sql.SQL("s.{c} = t.key[{i}]::{t}").format(
                c=sql.Identifier(k), i=sql.Literal(i + 1), t=sql.SQL(self.types[k])
            )
            for i, k in enumerate(key)
        )
        statement = sql.SQL(
            """
            COPY (SELECT DISTINCT {values}, true FROM {tomb} t
                   WHERE t.relation = %s AND t.xid >= %s::xid8
                     AND NOT EXISTS (SELECT FROM {rel} s WHERE {match})) TO STDOUT
            """
        ).format(values=values, tomb=tomb, rel=self.source.relation(), match=match)
        dest = dataclasses.replace(self.cfg.destination, create_table=False)
        gone = Loader(self.dest, dest, list(key), self.ctx, soft_delete=True)
        await gone.prepare()
        try:
            stream = CopyStream(self.src.cursor().copy(statement, [relation, str(start)]))
            async with stream:
                await gone.load_copy_data(stream.chunks())
        finally:
            await gone.close()
        self.merge_deleted(gone)
        self.ctx.log.info(
            "tombstones of %s: %s keys, %s rows deleted", self.source.name, stream.rows, gone.counts.deleted
        )
        return True

    async def prune_tombstones(self) -> None:
        """Remove this table's tombstones older than the retention, moving its horizon past them."""
        if self.ctx.dry_run or self.tracking != BY_XMIN or self.cfg.source.table is None:
            return
        tomb, horizon = self.tombstone_names()
        try:
            await self.src.set_read_only(False)
            async with self.src.transaction():
                cur = await self.src.execute("SELECT to_regclass(%s) IS NOT NULL", [horizon.as_string(None)])
                row = await cur.fetchone()
                if not row or not row[0]:
                    return
                await self.src.execute(
                    sql.SQL(
                        """
                        WITH gone AS (
                          DELETE FROM {tomb} WHERE relation = %(rel)s
                             AND deleted_at < now() - make_interval(days => %(days)s)
                          RETURNING xid::text::numeric AS x
                        )
                        UPDATE {horizon} h
                           SET complete_from = greatest(
                                 h.complete_from, ((SELECT max(x) FROM gone) + 1)::text::xid8)
                         WHERE h.relation = %(rel)s AND EXISTS (SELECT FROM gone)
                        """
                    ).format(tomb=tomb, horizon=horizon),
                    {"rel": qualified_name(self.cfg.source.table), "days": TOMBSTONE_RETENTION_DAYS},
                )
        except psycopg.errors.QueryCanceled:
            raise
        except psycopg.Error as exc:
            if self.src.broken or isinstance(exc, psycopg.OperationalError):
                raise
            self.ctx.log.info("tombstones of %s cannot be pruned: %s", self.source.name, exc)
        finally:
            await self.src.set_read_only(True)

    # long: totals, then buckets, then the keys of the buckets that differ: one comparison, read top to bottom
    async def bucket_deletes(self) -> None:
        """Find the destination rows the source no longer has, reading as few keys as possible.

        Both sides are summed at once (row count and sum of key hashes; one scan each, run
        side by side).  Equal sums end it.  Otherwise the same per key bucket, and only the
        keys of the buckets that differ are read from the source and compared.
        """
        assert self.loader is not None
        key = self.source.key
        dest_key = self.cfg.destination.key
        integer = all(self.types.get(k) in INTEGER_TYPES for k in key) and all(
            self.loader.types.get(k) in INTEGER_TYPES for k in dest_key
        )
        src_hash = key_hash(key, dict.fromkeys(key, "bigint") if integer else {})
        dest_hash = key_hash(dest_key, dict.fromkeys(dest_key, "bigint") if integer else {}, alias="d")
        src_rel = self.source.relation()
        dest_rel = sql.SQL("{} AS d").format(self.cfg.destination.identifier())
        started = time.monotonic()
        total = "SELECT count(*), coalesce(sum({h}), 0) FROM {rel}"
        src_total, dest_total = await asyncio.gather(
            _one(self.src, sql.SQL(total).format(h=src_hash, rel=src_rel)),
            _one(self.dest, sql.SQL(total).format(h=dest_hash, rel=dest_rel)),
        )
        differing: list[int] = []
        buckets = bucket_count(max(int(src_total[0]), int(dest_total[0])))
        if src_total != dest_total:
            differing = await self.differing_buckets(src_hash, dest_hash, buckets)
        deleted = 0
        if differing:
            every = len(differing) > buckets // 2
            src_where: sql.Composable = sql.SQL("TRUE")
            dest_where: sql.Composable = sql.SQL("TRUE")
            params: list[Any] = []
            if not every:  # a hashed semi-join: `= ANY(array)` would compare each row with every bucket
                src_where = sql.SQL("{} IN (SELECT unnest(%s::int[]))").format(bucket_of(src_hash, buckets))
                dest_where = sql.SQL("{} IN (SELECT unnest(%s::int[]))").format(bucket_of(dest_hash, buckets))
                params = [differing]
            dest = dataclasses.replace(self.cfg.destination, create_table=False)  # made by the main load
            keys = Loader(self.dest, dest, list(key), self.ctx, track_seen=True)
            await keys.prepare()
            try:
                cols = sql.SQL(", ").join(sql.Identifier(k) for k in key)
                stream = CopyStream(
                    self.src.cursor().copy(
                        sql.SQL("COPY (SELECT {} FROM {} WHERE {}) TO STDOUT").format(
                            cols, src_rel, src_where
                        ),
                        params or None,
                    )
                )
                async with stream:
                    await keys.copy_seen_keys(stream.chunks())
                await self.dest.execute(sql.SQL("ANALYZE {}").format(keys.seen))
                await keys.delete_unseen(within=dest_where, params=params)
            finally:
                await keys.close()
            self.merge_deleted(keys)
            deleted = keys.counts.deleted
        self.ctx.log.info(
            "key buckets of %s: %s of %s differ, %s rows deleted (%.2fs)",
            self.source.name,
            len(differing),
            buckets,
            deleted,
            time.monotonic() - started,
        )

    # long: the bucket query for both sides, built once and run on each: read top to bottom
    async def differing_buckets(
        self,
        src_hash: sql.Composable,
        dest_hash: sql.Composable,
        buckets: int,
        *,
        src_sum: sql.Composable | None = None,
        dest_sum: sql.Composable | None = None,
        src_where: sql.Composable = _TRUE,
        dest_where: sql.Composable = _TRUE,
    ) -> list[int]:
        """The key buckets whose (count, sum of hashes) differ between the two sides.

        Rows are bucketed by `*_hash` (of the key) and summed by `*_sum` (the same by
        default), among the rows matching `*_where` (literal SQL: no parameters).

        The source's per-bucket sums arrive as COPY data (25 bytes a bucket) while the
        destination computes its own into a temporary table; the comparison runs there.
        """
        n = next(_bucket_ids)
        theirs, ours = (
            sql.Identifier(f"syncworker_buckets_src_{n}"),
            sql.Identifier(f"syncworker_buckets_{n}"),
        )
        per_bucket = "SELECT {b}, count(*), sum({h}) FROM {rel} WHERE {w} GROUP BY 1"

        async def source_sums() -> list[bytes]:
            statement = sql.SQL("COPY ({}) TO STDOUT").format(
                sql.SQL(per_bucket).format(
                    b=bucket_of(src_hash, buckets),
                    h=src_sum or src_hash,
                    rel=self.source.relation(),
                    w=src_where,
                )
            )
            stream = CopyStream(self.src.cursor().copy(statement))
            async with stream:
                return [block async for block in stream.chunks()]

        dest_rel = sql.SQL("{} AS d").format(self.cfg.destination.identifier())
        # Room for every bucket in the hash aggregate (it spills to disk otherwise).
        for conn in (self.src, self.dest):
            await conn.execute(sql.SQL("SET LOCAL work_mem = {}").format(sql.Literal(AGGREGATE_WORK_MEM)))
        try:
            data, _ = await asyncio.gather(
                source_sums(),
                self.dest.execute(
                    sql.SQL("CREATE TEMP TABLE {} (b, n, s) AS {}").format(
                        ours,
                        sql.SQL(per_bucket).format(
                            b=bucket_of(dest_hash, buckets),
                            h=dest_sum or dest_hash,
                            rel=dest_rel,
                            w=dest_where,
                        ),
                    )
                ),
            )
            await self.dest.execute(
                sql.SQL("CREATE TEMP TABLE {} (b int, n bigint, s bigint)").format(theirs)
            )
            async with self.dest.cursor().copy(sql.SQL("COPY {} FROM STDIN").format(theirs)) as copy:
                for block in data:
                    await copy.write(block)
            del data
            cur = await self.dest.execute(
                sql.SQL(
                    """
                    SELECT coalesce(array_agg(coalesce(t.b, o.b)), '{{}}')
                      FROM {theirs} t FULL JOIN {ours} o ON o.b = t.b
                     WHERE (t.n, t.s) IS DISTINCT FROM (o.n, o.s)
                    """
                ).format(theirs=theirs, ours=ours)
            )
            row = await cur.fetchone()
        finally:
            if (
                not self.dest.broken
                and self.dest.info.transaction_status != psycopg.pq.TransactionStatus.INERROR
            ):
                await self.dest.execute(sql.SQL("DROP TABLE IF EXISTS {}, {}").format(theirs, ours))
        return list(row[0]) if row else []

    def merge_deleted(self, other: Loader) -> None:
        assert self.loader is not None
        self.loader.counts.deleted += other.counts.deleted
        kept = self.loader.counts.preview["delete"]
        kept.extend(other.counts.preview["delete"][: max(0, 10 - len(kept))])

    # -- committing -----------------------------------------------------------------------

    async def commit_data(self) -> None:
        """Make the loaded batches durable in a destination of its own (not in a dry run)."""
        if not self.external:
            return
        if self.ctx.dry_run:
            return  # rolled back when the connection closes
        await self.dest.commit()

    async def checkpoint(self, state: dict[str, Any]) -> None:
        """Data first, then the state that describes it (fenced on the run being live)."""
        await self.commit_data()
        if not self.ctx.dry_run:
            await self.ctx.checkpoint(state)


async def _one(conn: Conn, query: sql.Composed) -> tuple[Any, ...]:
    cur = await conn.execute(query)
    row = await cur.fetchone()
    assert row is not None
    return row


_bucket_ids = itertools.count(1)


class _GaveWay(Exception):
    """The direct COPY of a batch met a row already there: the stream is abandoned."""


def _gather(copy: Any, max_bytes: int) -> Any:
    """A psycopg generator reading COPY rows until `max_bytes` (or READ_ROWS rows) are in hand."""
    parts: list[Any] = []
    size = 0
    while size < max_bytes and len(parts) < READ_ROWS:
        data = yield from copy._read_gen()
        if not data:
            break
        parts.append(data)
        size += len(data)
    return parts


class CopyStream:
    """Raw `COPY … TO STDOUT` text data, handed out in batches cut at row boundaries.

    With `prefetch`, a task reads ahead (at most PREFETCH_BLOCKS blocks) while the caller
    writes what it has: reading the source and writing the destination overlap.
    """

    def __init__(self, copy: Any, *, prefetch: bool = False) -> None:
        self._copy = copy
        self._active: Any = None
        self._iter: AsyncIterator[Any] | None = None
        self._carry = b""
        self.rows = 0
        self.done = False
        self._last_row = b""
        self._prefetch = prefetch
        self._queue: asyncio.Queue[bytes | BaseException | None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._stopping = False

    async def __aenter__(self) -> CopyStream:
        self._copy_cm = self._copy
        copy = self._active = await self._copy_cm.__aenter__()
        self._iter = copy.__aiter__()
        if self._prefetch:
            self._queue = asyncio.Queue(PREFETCH_BLOCKS)
            self._reader = asyncio.create_task(self._read_ahead())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader is not None and not self._reader.done():
            # Let the reader finish the block it is reading (never cancel it inside psycopg).
            self._stopping = True
            assert self._queue is not None
            while not self._reader.done():
                while not self._queue.empty():
                    self._queue.get_nowait()
                await asyncio.wait([self._reader], timeout=0.05)
        await self._copy_cm.__aexit__(*exc)

    async def _read_ahead(self) -> None:
        assert self._queue is not None
        try:
            while not self._stopping:
                data = await self._read_block()
                await self._queue.put(data)
                if data is None:
                    return
        except Exception as exc:  # handed to the consumer
            await self._queue.put(exc)

    async def _read(self) -> bytes | None:
        if self._queue is None:
            return await self._read_block()
        got = await self._queue.get()
        if isinstance(got, BaseException):
            raise got
        return got

    async def _read_block(self) -> bytes | None:
        """The next block of whole rows, None at the end.

        The server sends one message per row; reading them one await at a time costs more
        than the rows themselves, so blocks are gathered in one go where psycopg allows it.
        """
        copy = self._active
        if hasattr(copy, "_read_gen") and hasattr(copy, "connection"):
            parts = await copy.connection.wait(_gather(copy, READ_BLOCK))
            return b"".join(parts) if parts else None
        assert self._iter is not None
        try:
            return bytes(await self._iter.__anext__())
        except StopAsyncIteration:
            return None

    async def chunks(self, max_rows: int | None = None) -> AsyncIterator[bytes]:
        """Data of up to `max_rows` rows (all that is left without a limit), in large pieces."""
        rows = 0
        pending = self._carry
        self._carry = b""
        try:
            while max_rows is None or rows < max_rows:
                if pending:
                    data, pending = pending, b""
                else:
                    read = await self._read()
                    if read is None:
                        self.done = True
                        break
                    data = read
                n = data.count(b"\n")
                if max_rows is not None and rows + n > max_rows:
                    cut = _nth_newline(data, max_rows - rows) + 1
                    data, self._carry = data[:cut], data[cut:]
                    n = max_rows - rows
                rows += n
                self._remember_last(data)
                yield data
        finally:
            self.rows += rows

    def _remember_last(self, data: bytes | bytearray) -> None:
        end = len(data) - 1 if data.endswith(b"\n") else len(data)
        start = data.rfind(b"\n", 0, end) + 1
        if start == 0:
            self._last_row += bytes(data[:end])  # a row longer than one piece
        else:
            self._last_row = bytes(data[start:end])

    def last_key(self, n: int) -> list[str | None]:
        """The first `n` fields of the last row handed out (the key, in key order)."""
        return [unescape_copy_field(f) for f in self._last_row.split(b"\t")[:n]]


def _nth_newline(data: bytes, n: int) -> int:
    at = -1
    for _ in range(n):
        at = data.index(b"\n", at + 1)
    return at


_ESCAPES = {b"b": "\b", b"f": "\f", b"n": "\n", b"r": "\r", b"t": "\t", b"v": "\v", b"\\": "\\"}


def unescape_copy_field(raw: bytes) -> str | None:
    r"""One field of COPY text format as a string (`\N` is NULL)."""
    if raw == rb"\N":
        return None
    if b"\\" not in raw:
        return raw.decode()
    out = bytearray()
    i = 0
    while i < len(raw):
        ch = raw[i : i + 1]
        if ch != b"\\" or i + 1 >= len(raw):
            out += ch
            i += 1
            continue
        nxt = raw[i + 1 : i + 2]
        if nxt in _ESCAPES:
            out += _ESCAPES[nxt].encode()
            i += 2
        elif nxt.isdigit():
            digits = re.match(rb"[0-7]{1,3}", raw[i + 1 : i + 4])
            assert digits is not None
            out.append(int(digits.group(), 8))
            i += 1 + len(digits.group())
        elif nxt == b"x" and re.match(rb"[0-9a-fA-F]", raw[i + 2 : i + 3]):
            digits = re.match(rb"[0-9a-fA-F]{1,2}", raw[i + 2 : i + 4])
            assert digits is not None
            out.append(int(digits.group(), 16))
            i += 2 + len(digits.group())
        else:
            out += nxt
            i += 2
    return out.decode()
