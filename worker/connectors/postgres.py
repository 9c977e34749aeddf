"""`postgres`: mirror a table (or query) of another database into a destination table.

The first run copies everything, streamed in key order as raw `COPY` data, one
batch at a time; each batch is checkpointed with the last key it holds, so a
crash resumes where the copy stopped.  Later runs are incremental: every row
whose `updated_at` is at or after the saved watermark minus a lookback window is
read again (rows that share the watermark value are never skipped; rows whose
commit was late within the lookback are caught).  The watermark saved is the
source's `max(updated_at)` read in the same snapshot as the rows.

Deletes: `none`; `soft` (the source marks a deleted row by setting a column;
that row is removed from the destination); `hard` (periodically, the source's
keys are streamed into the destination session and every destination row whose
key is missing is deleted).
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import AsyncConnection, sql
from psycopg.rows import TupleRow

from worker import db, secrets
from worker.connectors.base import (
    ConfigError,
    Connector,
    RealtimeSource,
    RunContext,
    RunResult,
    SyncError,
    expect,
    reject_unknown,
    require,
)
from worker.connectors.load import (
    Destination,
    Loader,
    check_secret,
    identifier,
    key_columns,
    parse_destination,
    table_name,
)

# NOTIFY channel of the real-time trigger; the payload is the source table's name.
CHANNEL = "syncworker_changes"
DEFAULT_HARD_DELETE_SECONDS = 3600
# Lookback when the job has no schedule to scale it from.
DEFAULT_LOOKBACK_SECONDS = 3600
DELETE_MODES = ("none", "soft", "hard")
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
            if cfg.destination.dsn is None:
                return await Mirror(ctx, cfg, src, ctx.conn, external=False).run()
            dest_dsn = secrets.resolve(cfg.destination.dsn, "destination.dsn")
            async with await psycopg.AsyncConnection.connect(
                dest_dsn, **db.connect_kwargs("syncworker destination")
            ) as dest:
                return await Mirror(ctx, cfg, src, dest, external=True).run()


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

    @property
    def source(self) -> Source:
        return self.cfg.source

    async def run(self) -> RunResult:
        columns, types = await self.source_columns()
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
            # (Without updated_at every run reads everything; once is enough.)
            if not copied or self.source.updated_at is not None:
                state = await self.incremental(ordered, state)
            if self.cfg.deletes == "hard" and self.key_diff_due(state):
                state = {**state, "keys_checked_at": time.time()}
                await self.hard_deletes()
        finally:
            await loader.close()
        await self.commit_data()
        counts = loader.counts
        return RunResult(
            state=state,
            records_processed=self.read,
            inserted=counts.inserted,
            updated=counts.updated,
            deleted=counts.deleted,
            preview=counts.preview if self.ctx.dry_run else None,
        )

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
                [sql.Identifier(*self.source.table).as_string(None)],
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

    def select(self, columns: list[str]) -> sql.Composable:
        parts: list[sql.Composable] = [sql.Identifier(c) for c in columns]
        if self.cfg.soft_delete_column:
            col = sql.Identifier(self.cfg.soft_delete_column)
            parts.append(sql.SQL("({c} IS NOT NULL AND {c}::text NOT IN ('false', 'f'))").format(c=col))
        return sql.SQL(", ").join(parts)

    async def full_copy(self, columns: list[str], state: dict[str, Any]) -> dict[str, Any]:
        """Copy everything in key order, a batch per statement, checkpointing after each batch."""
        key = sql.SQL(", ").join(sql.Identifier(k) for k in self.source.key)
        if state.get("phase") != "full":
            high = await self.high_water()
            state = {"phase": "full", "after": None, "high_water": high}
            self.ctx.log.info("full copy of %s started", self.source.name)
        else:
            self.ctx.log.info("full copy of %s resumed after key %s", self.source.name, state["after"])
        size = self.cfg.destination.batch_size
        while True:
            after = state["after"]
            where: sql.Composable = sql.SQL("TRUE")
            if after is not None:
                where = sql.SQL("({}) > ({})").format(key, sql.SQL(", ").join(sql.Placeholder() * len(after)))
            statement = sql.SQL(
                "COPY (SELECT {cols} FROM {rel} WHERE {where} ORDER BY {key} LIMIT {n}) TO STDOUT"
            ).format(
                cols=self.select(columns),
                rel=self.source.relation(),
                where=where,
                key=key,
                n=sql.Literal(size),
            )
            assert self.loader is not None
            batch = await self.copy_batch(statement, after, direct=self.loader.can_copy_direct)
            if batch is None:  # some rows were already there (or one is bad): upsert this batch
                batch = await self.copy_batch(statement, after, direct=False)
            assert batch is not None
            self.read += batch.rows
            if batch.rows < size:
                break
            state = {**state, "after": batch.last_key(len(self.source.key))}
            await self.checkpoint(state)
        self.ctx.log.info("full copy of %s done: %s rows", self.source.name, self.read)
        return {"phase": "incremental", "watermark": state["high_water"]}

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
        await self.src.rollback()
        return batch if loaded else None

    async def incremental(self, columns: list[str], state: dict[str, Any]) -> dict[str, Any]:
        """Every row changed since the watermark minus the lookback, read in one snapshot."""
        assert self.source.updated_at is not None or state.get("watermark") is None
        high = await self.high_water()
        watermark = state.get("watermark")
        where: sql.Composable = sql.SQL("TRUE")
        params: list[Any] = []
        if watermark is not None and self.source.updated_at is not None:
            where = sql.SQL("{col} >= {since}").format(
                col=sql.Identifier(self.source.updated_at), since=await self.since_expression()
            )
            params = [watermark, self.lookback()]
        statement = sql.SQL("COPY (SELECT {cols} FROM {rel} WHERE {where}) TO STDOUT").format(
            cols=self.select(columns), rel=self.source.relation(), where=where
        )
        stream = CopyStream(self.src.cursor().copy(statement, params or None))
        assert self.loader is not None
        async with stream:
            while not stream.done:
                await self.loader.load_copy_data(stream.chunks(self.cfg.destination.batch_size))
                await self.commit_data()
        await self.src.rollback()
        self.read += stream.rows
        self.ctx.log.info(
            "incremental sync of %s: %s rows since %s (lookback %ss)",
            self.source.name,
            stream.rows,
            watermark,
            self.lookback(),
        )
        return {**state, "watermark": high if high is not None else watermark}

    async def high_water(self) -> str | None:
        if self.source.updated_at is None:
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

    def key_diff_due(self, state: dict[str, Any]) -> bool:
        last = self.ctx.state.get("keys_checked_at")
        if self.ctx.state.get("phase") != "incremental" or not isinstance(last, int | float):
            return True  # right after a full copy, and whenever it never ran
        return time.time() - last >= self.cfg.hard_delete_every

    async def hard_deletes(self) -> None:
        """Stream the source's keys into the destination session; delete the rows not among them."""
        dest = dataclasses.replace(self.cfg.destination, create_table=False)  # made by the main load
        keys = Loader(self.dest, dest, list(self.source.key), self.ctx, track_seen=True)
        await keys.prepare()
        try:
            key = sql.SQL(", ").join(sql.Identifier(k) for k in self.source.key)
            stream = CopyStream(
                self.src.cursor().copy(
                    sql.SQL("COPY (SELECT {} FROM {}) TO STDOUT").format(key, self.source.relation())
                )
            )
            async with stream:
                await keys.copy_seen_keys(stream.chunks())
            await self.src.rollback()
            await keys.delete_unseen()
        finally:
            await keys.close()
        assert self.loader is not None
        self.loader.counts.deleted += keys.counts.deleted
        self.loader.counts.preview["delete"].extend(keys.counts.preview["delete"])
        self.ctx.log.info("key diff of %s: %s rows deleted", self.source.name, keys.counts.deleted)

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


class CopyStream:
    """Raw `COPY … TO STDOUT` text data, handed out in batches cut at row boundaries."""

    def __init__(self, copy: Any) -> None:
        self._copy = copy
        self._iter: AsyncIterator[Any] | None = None
        self._carry = b""
        self.rows = 0
        self.done = False
        self._last_row = b""

    async def __aenter__(self) -> CopyStream:
        self._copy_cm = self._copy
        copy = await self._copy_cm.__aenter__()
        self._iter = copy.__aiter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._copy_cm.__aexit__(*exc)

    async def chunks(self, max_rows: int | None = None) -> AsyncIterator[bytes]:
        """Data of up to `max_rows` rows (all that is left without a limit), in large pieces."""
        assert self._iter is not None
        rows = 0
        buffer = bytearray(self._carry)
        self._carry = b""
        while True:
            try:
                data = bytes(await self._iter.__anext__())
            except StopAsyncIteration:
                self.done = True
                break
            n = data.count(b"\n")
            if max_rows is not None and rows + n >= max_rows:
                cut = _nth_newline(data, max_rows - rows) + 1
                buffer += data[:cut]
                self._carry = data[cut:]
                rows += data[:cut].count(b"\n")
                break
            buffer += data
            rows += n
            if len(buffer) >= 1 << 16:
                self._remember_last(buffer)
                yield bytes(buffer)
                buffer.clear()
        self.rows += rows
        if buffer:
            self._remember_last(buffer)
            yield bytes(buffer)

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
