"""Loading records into a destination table: COPY into staging, then one set-based upsert.

Every connector that writes a table goes through `Loader`:

* a batch is COPYed (text format) into a temporary staging table whose columns
  are all `text`, with a sequence number per row;
* one `INSERT … SELECT … ON CONFLICT (key) DO UPDATE` casts the batch to the
  destination's column types and applies it; a row whose values did not change is
  left alone (it counts as neither inserted nor updated);
* if that statement fails (a value that does not cast, a constraint), the batch
  is applied again row by row, each under a savepoint, and each failing row is
  reported as a per-record error with its key: the rest of the batch lands.

The Loader never commits: the caller owns the transaction (the run's session on
the control database, or a connection to another destination database).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import AsyncConnection, sql
from psycopg.rows import TupleRow

from worker import db, secrets
from worker.connectors.base import RunContext, RunResult, SyncError
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

DEFAULT_BATCH_SIZE = 10_000
# Keys kept per category (insert / update / delete) for a dry run's report.
PREVIEW_KEYS = 10

# A column type as written in CREATE TABLE: words, digits, (precision, scale), [].
_TYPE = re.compile(r"^[A-Za-z_][A-Za-z0-9_ ]*(\(\s*\d+\s*(,\s*\d+\s*)?\))?[A-Za-z ]*(\[\])*$")

SEQ = "_sw_seq"
DELETED = "_sw_deleted"

Conn = AsyncConnection[TupleRow]


@dataclass(frozen=True)
class Destination:
    """Where records go: a table, its key, and optionally how to create it."""

    table: tuple[str, ...]  # (schema, name) or (name,)
    key: tuple[str, ...]
    columns: dict[str, str] = field(default_factory=dict)  # name -> type, for create_table
    create_table: bool = False
    dsn: Any = None  # a secret reference; None is the control database
    batch_size: int = DEFAULT_BATCH_SIZE

    @property
    def name(self) -> str:
        return ".".join(self.table)

    def identifier(self) -> sql.Identifier:
        return sql.Identifier(*self.table)


def parse_destination(config: Mapping[str, Any], field: str = "destination") -> Destination:
    """The `destination` object of a job's config."""
    dest = require(config, "destination", dict, 'an object like {"table": "public.t", "key": ["id"]}')
    reject_unknown(dest, {"table", "key", "columns", "create_table", "dsn", "batch_size"}, field)

    def sub(name: str) -> str:
        return f"{field}.{name}"

    if "table" not in dest:
        raise ConfigError(sub("table"), 'is required (a table name like "public.orders")')
    table = table_name(dest["table"], sub("table"))
    if "key" not in dest:
        raise ConfigError(sub("key"), "is required (the column or columns that identify a row)")
    key = key_columns(dest["key"], sub("key"))
    create = expect(dest, "create_table", bool, "true or false", False, prefix=field)
    columns_raw = expect(dest, "columns", dict, "an object of column name to SQL type", {}, prefix=field)
    columns: dict[str, str] = {}
    for name, type_ in columns_raw.items():
        identifier(name, sub("columns"))
        if not isinstance(type_, str) or not _TYPE.match(type_.strip()):
            raise ConfigError(
                sub(f"columns.{name}"), f"expected an SQL type like text or numeric(10,2), got {type_!r:.60}"
            )
        columns[name] = type_.strip()
    if columns and not set(key) <= set(columns):
        missing = ", ".join(sorted(set(key) - set(columns)))
        raise ConfigError(sub("columns"), f"must include the key column(s): {missing}")
    batch = expect(dest, "batch_size", int, "a positive integer", DEFAULT_BATCH_SIZE, prefix=field)
    if batch <= 0:
        raise ConfigError(sub("batch_size"), f"expected a positive integer, got {batch}")
    dsn = check_secret(dest, "dsn", sub("dsn"), required=False)
    return Destination(table, key, columns, create, dsn, batch)


@dataclass
class Counts:
    inserted: int = 0
    updated: int = 0
    deleted: int = 0
    failed: int = 0
    # dry runs: some keys of each kind of change
    preview: dict[str, list[str]] = field(default_factory=lambda: {"insert": [], "update": [], "delete": []})

    def result(self, ctx: RunContext, records: int, state: dict[str, Any] | None = None) -> RunResult:
        """The run's result from what was read and what the loader changed (the preview in a
        dry run only): the one place where counts become a RunResult."""
        return RunResult(
            state=state,
            records_processed=records,
            inserted=self.inserted,
            updated=self.updated,
            deleted=self.deleted,
            preview=self.preview if ctx.dry_run else None,
        )


@asynccontextmanager
async def destination_session(ctx: RunContext, dest: Destination) -> AsyncIterator[Conn]:
    """The session a connector writes its destination on: the rule every connector follows.

    Into the control database (no `dsn`): the run's own session, so that data and state
    commit in one transaction, exactly once.  Into another database: a session of its own,
    whose data commits when the connector returns, before the state (which the runner
    commits fenced): at least once, and upserts by key make a repeat harmless.  Nothing
    commits in a dry run or when the connector fails.
    """
    if dest.dsn is None:
        yield ctx.conn
        return
    url = secrets.resolve(dest.dsn, "destination.dsn")
    async with await psycopg.AsyncConnection.connect(
        url, **db.connect_kwargs("syncworker destination")
    ) as conn:
        await conn.execute(db.SETTINGS_FOR_ANY_SERVER)  # not the database's own timeouts
        await conn.commit()
        yield conn
        if not ctx.dry_run:
            await conn.commit()


class Loader:
    """Writes batches of records into one destination table through a staging table.

    `columns` are the destination columns the records carry, in order; they must
    include the key.  With `soft_delete=True` each record carries one more value,
    a boolean: true removes the row from the destination instead of upserting it.
    With `track_seen=True` the keys of every record are remembered so that
    `delete_unseen()` can remove the rows the source no longer has.
    """

    def __init__(
        self,
        conn: Conn,
        dest: Destination,
        columns: Sequence[str],
        ctx: RunContext | None = None,
        *,
        soft_delete: bool = False,
        track_seen: bool = False,
    ) -> None:
        if not set(dest.key) <= set(columns):
            raise ConfigError("destination.key", "every key column must be among the loaded columns")
        self.conn = conn
        self.dest = dest
        self.columns = list(columns)
        self.ctx = ctx
        self.soft_delete = soft_delete
        self.track_seen = track_seen
        self.counts = Counts()
        self.types: dict[str, str] = {}
        n = uuid.uuid4().hex[:12]  # staging tables of one session never share a name
        self.stage = sql.Identifier(f"syncworker_stage_{n}")
        self.seen = sql.Identifier(f"syncworker_seen_{n}")
        self.copy_columns = [*self.columns, *([DELETED] if soft_delete else [])]
        self._direct_ok = True

    # -- set-up ---------------------------------------------------------------------------

    async def prepare(
        self, create_columns: Mapping[str, str] | None = None, *, fillfactor: int | None = None
    ) -> None:
        """Create the table if asked, check it, and create the staging tables.

        `create_columns` (name -> type) is used when the destination has
        `create_table` but no `columns` of its own (a mirror copies its source's);
        `fillfactor`, the share of each page a table created here fills (room for updates).
        """
        if self.dest.create_table:
            await self._create_table(self.dest.columns or dict(create_columns or {}), fillfactor)
        self.types = await self._column_types()
        missing = [c for c in self.columns if c not in self.types]
        if missing:
            raise SyncError(
                f"destination table {self.dest.name} has no column {', '.join(missing)}",
                error_type="destination_invalid",
            )
        if not await self._has_unique_key():
            raise SyncError(
                f"destination table {self.dest.name} needs a primary key or unique index on "
                f"({', '.join(self.dest.key)}) for upserts",
                error_type="destination_invalid",
            )
        stage_cols = sql.SQL(", ").join(
            sql.SQL("{} text").format(sql.Identifier(c)) for c in self.copy_columns
        )
        await self.conn.execute(
            sql.SQL("CREATE TEMP TABLE {stage} ({seq} bigint GENERATED ALWAYS AS IDENTITY, {cols})").format(
                stage=self.stage, seq=sql.Identifier(SEQ), cols=stage_cols
            )
        )
        if self.track_seen:
            await self.conn.execute(
                sql.SQL("CREATE TEMP TABLE {seen} AS SELECT {key} FROM {dest} WITH NO DATA").format(
                    seen=self.seen, key=self._cols(self.dest.key), dest=self.dest.identifier()
                )
            )

    async def close(self) -> None:
        """Drop the staging tables (they would otherwise live as long as the session)."""
        if self.conn.broken or self.conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
            return
        await self.conn.execute(sql.SQL("DROP TABLE IF EXISTS {}, {}").format(self.stage, self.seen))

    async def _create_table(self, columns: Mapping[str, str], fillfactor: int | None = None) -> None:
        if not columns:
            raise ConfigError(
                "destination.columns",
                "is required with create_table (an object of column name to SQL type)",
            )
        defs = sql.SQL(", ").join(
            sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(type_)) for name, type_ in columns.items()
        )
        storage: sql.Composable = sql.SQL("")
        if fillfactor is not None:
            storage = sql.SQL(" WITH (fillfactor = {})").format(sql.Literal(fillfactor))
        await self.conn.execute(
            sql.SQL("CREATE TABLE IF NOT EXISTS {} ({}, PRIMARY KEY ({})){}").format(
                self.dest.identifier(), defs, self._cols(self.dest.key), storage
            )
        )

    async def _column_types(self) -> dict[str, str]:
        cur = await self.conn.execute(
            """
            SELECT a.attname, format_type(a.atttypid, a.atttypmod)
              FROM pg_attribute a
             WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped
            """,
            [self._regclass()],
        )
        types = {name: type_ for name, type_ in await cur.fetchall()}
        if not types:
            hint = "" if self.dest.create_table else '; set "create_table": true to create it'
            raise SyncError(
                f"destination table {self.dest.name} does not exist{hint}", error_type="destination_invalid"
            )
        return types

    async def _has_unique_key(self) -> bool:
        cur = await self.conn.execute(
            """
            SELECT 1 FROM pg_index i
             WHERE i.indrelid = to_regclass(%s) AND i.indisunique AND i.indpred IS NULL
               AND (SELECT array_agg(a.attname::text ORDER BY a.attname)
                      FROM unnest(i.indkey) k JOIN pg_attribute a
                        ON a.attrelid = i.indrelid AND a.attnum = k)
                   = (SELECT array_agg(c ORDER BY c) FROM unnest(%s::text[]) c)
            """,
            [self._regclass(), list(self.dest.key)],
        )
        return await cur.fetchone() is not None

    def _regclass(self) -> str:
        return sql.Identifier(*self.dest.table).as_string(None)

    # -- loading --------------------------------------------------------------------------

    async def load_rows(self, rows: Iterable[Sequence[Any]]) -> None:
        """Load Python values (str, int, float, bool, None, datetime…), one batch at a time."""
        batch: list[Sequence[Any]] = []
        for row in rows:
            batch.append(row)
            if len(batch) >= self.dest.batch_size:
                await self.write_batch(batch)
                batch = []
        if batch:
            await self.write_batch(batch)

    async def write_batch(self, rows: Sequence[Sequence[Any]]) -> None:
        await self._truncate_stage()
        async with self._copy_in() as copy:
            for row in rows:
                await copy.write_row(row)
        await self.apply_stage()

    async def load_copy_data(self, chunks: AsyncIterable[bytes | memoryview]) -> None:
        """Load raw COPY text data (as produced by `COPY … TO STDOUT`) as one batch."""
        await self._truncate_stage()
        async with self._copy_in() as copy:
            async for chunk in chunks:
                await copy.write(chunk)
        await self.apply_stage()

    @property
    def can_copy_direct(self) -> bool:
        """Whether `copy_direct` is worth trying: plain upserts, not a dry run, no failure yet."""
        dry = self.ctx is not None and self.ctx.dry_run
        return self._direct_ok and not (self.soft_delete or self.track_seen or dry)

    async def copy_direct(self, chunks: AsyncIterable[bytes | memoryview]) -> bool:
        """The fast path for rows that should all be new (a first copy): COPY them into the table.

        True when every row landed. False, with nothing written and `chunks` drained, when any
        row conflicts with one already there or fails: the caller then loads the same rows
        through the staging table, which upserts and isolates bad records. After one failure
        the fast path is not tried again by this loader.
        """
        await self.conn.execute(b"SAVEPOINT syncworker_direct")
        cur = self.conn.cursor()
        cols = self._cols(self.columns)
        statement = sql.SQL("COPY {} ({}) FROM STDIN").format(self.dest.identifier(), cols)
        try:
            async with cur.copy(statement) as copy:
                async for chunk in chunks:
                    await copy.write(chunk)
        except psycopg.errors.QueryCanceled:
            raise
        except psycopg.Error as exc:
            if self.conn.broken or isinstance(exc, psycopg.OperationalError):
                raise
            async for _ in chunks:
                pass
            await self.conn.execute(b"ROLLBACK TO SAVEPOINT syncworker_direct")
            self._direct_ok = False
            return False
        self.counts.inserted += max(cur.rowcount, 0)
        await self.conn.execute(b"RELEASE SAVEPOINT syncworker_direct")
        return True

    def _copy_in(self) -> Any:
        cur = self.conn.cursor()
        return cur.copy(sql.SQL("COPY {} ({}) FROM STDIN").format(self.stage, self._cols(self.copy_columns)))

    async def _truncate_stage(self) -> None:
        await self.conn.execute(sql.SQL("TRUNCATE {}").format(self.stage))

    async def apply_stage(self) -> None:
        """Apply what is in the staging table: set-based, or row by row if that fails."""
        await self.conn.execute(b"SAVEPOINT syncworker_batch")
        try:
            await self._apply(where=sql.SQL("TRUE"), params={})
        except psycopg.errors.QueryCanceled:
            raise
        except psycopg.Error as exc:
            if self.conn.broken or isinstance(exc, psycopg.OperationalError):
                raise
            await self.conn.execute(b"ROLLBACK TO SAVEPOINT syncworker_batch")
            await self._apply_row_by_row()
        await self.conn.execute(b"RELEASE SAVEPOINT syncworker_batch")

    async def _apply_row_by_row(self) -> None:
        cur = await self.conn.execute(
            sql.SQL("SELECT {seq}, {key} FROM {stage} ORDER BY {seq}").format(
                seq=sql.Identifier(SEQ), key=self._cols(self.dest.key), stage=self.stage
            )
        )
        for seq, *key in await cur.fetchall():
            await self.conn.execute(b"SAVEPOINT syncworker_row")
            try:
                await self._apply(
                    where=sql.SQL("{} = %(seq)s").format(sql.Identifier(SEQ)), params={"seq": seq}
                )
            except psycopg.errors.QueryCanceled:
                raise
            except psycopg.Error as exc:
                if self.conn.broken or isinstance(exc, psycopg.OperationalError):
                    raise
                await self.conn.execute(b"ROLLBACK TO SAVEPOINT syncworker_row")
                self.record_failure(key, exc)
                continue
            await self.conn.execute(b"RELEASE SAVEPOINT syncworker_row")

    def record_failure(self, key: Sequence[Any], exc: psycopg.Error) -> None:
        self.counts.failed += 1
        record_key = key[0] if len(key) == 1 else ",".join("" if k is None else str(k) for k in key)
        message = exc.diag.message_primary or str(exc)
        if self.ctx is not None:
            self.ctx.record_error(
                record_key,
                f"{self.dest.name}: {message}",
                error_type="record_invalid",
                detail=exc.diag.message_detail,
                context={"sqlstate": exc.sqlstate, "table": self.dest.name},
            )

    async def _apply(self, where: sql.Composable, params: dict[str, Any]) -> None:
        """Upsert (and, with soft deletes, delete) the staged rows matching `where`."""
        if self.track_seen:
            await self.conn.execute(
                sql.SQL("INSERT INTO {seen} SELECT {cast_key} FROM {stage} WHERE {where}").format(
                    seen=self.seen, cast_key=self._casts(self.dest.key), stage=self.stage, where=where
                ),
                params,
            )
        live = where
        if self.soft_delete:
            live = sql.SQL("({}) AND {} IS DISTINCT FROM 'true' AND {} IS DISTINCT FROM 't'").format(
                where, sql.Identifier(DELETED), sql.Identifier(DELETED)
            )
            await self._delete_staged(where)
        cur = await self.conn.execute(self._upsert_sql(live), params)
        row = await cur.fetchone()
        assert row is not None
        inserted, updated, sample_inserted, sample_updated = row
        self.counts.inserted += inserted
        self.counts.updated += updated
        if self.ctx is not None and self.ctx.dry_run:
            self._remember("insert", sample_inserted)
            self._remember("update", sample_updated)

    def _upsert_sql(self, where: sql.Composable) -> sql.Composed:
        key = self._cols(self.dest.key)
        cols = self._cols(self.columns)
        others = [c for c in self.columns if c not in self.dest.key]
        conflict: sql.Composable = sql.SQL("DO NOTHING")
        if others:
            changed = sql.SQL("({}) IS DISTINCT FROM ({})").format(
                sql.SQL(", ").join(sql.SQL("d.{}").format(sql.Identifier(c)) for c in others),
                sql.SQL(", ").join(sql.SQL("EXCLUDED.{}").format(sql.Identifier(c)) for c in others),
            )
            conflict = sql.SQL("DO UPDATE SET ({cols}) = ROW({excluded}) WHERE {changed}").format(
                cols=self._cols(others),
                excluded=sql.SQL(", ").join(sql.SQL("EXCLUDED.{}").format(sql.Identifier(c)) for c in others),
                changed=changed,
            )
        # Dry runs also report the first keys that would be inserted and updated.
        preview: sql.Composable = sql.SQL("NULL::text AS k")
        samples: sql.Composable = sql.SQL("NULL::text[], NULL::text[]")
        if self.ctx is not None and self.ctx.dry_run:
            preview = sql.SQL("{} AS k").format(self._key_text("d"))
            samples = sql.SQL(
                "(array_agg(k) FILTER (WHERE inserted))[1:{n}],"
                " (array_agg(k) FILTER (WHERE NOT inserted))[1:{n}]"
            ).format(n=sql.Literal(PREVIEW_KEYS))
        # The newest staged row per key wins (a source may repeat a record within a batch).
        return sql.SQL(
            """
            WITH src AS (
              SELECT DISTINCT ON ({key}) {casts} FROM {stage}
               WHERE {where} ORDER BY {key}, {seq} DESC
            ), up AS (
              INSERT INTO {dest} AS d ({cols}) SELECT {cols} FROM src
              ON CONFLICT ({key}) {conflict}
              RETURNING (d.xmax = 0) AS inserted, {preview}
            )
            SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted), {samples}
              FROM up
            """
        ).format(
            key=key,
            casts=self._casts(self.columns),
            stage=self.stage,
            where=where,
            seq=sql.Identifier(SEQ),
            dest=self.dest.identifier(),
            cols=cols,
            conflict=conflict,
            preview=preview,
            samples=samples,
        )

    async def _delete_staged(self, where: sql.Composable) -> None:
        """Soft deletes: remove the destination rows whose staged record is flagged deleted."""
        flagged = sql.SQL("({}) AND {} IN ('true', 't')").format(where, sql.Identifier(DELETED))
        cur = await self.conn.execute(
            sql.SQL(
                """
                WITH gone AS (
                  DELETE FROM {dest} AS d USING (SELECT {casts} FROM {stage} WHERE {flagged}) s
                   WHERE ({dkey}) = ({skey})
                  RETURNING {preview}
                )
                SELECT count(*), (array_agg(k))[1:{n}] FROM gone
                """
            ).format(
                dest=self.dest.identifier(),
                casts=self._casts(self.dest.key),
                stage=self.stage,
                flagged=flagged,
                dkey=self._qualified("d", self.dest.key),
                skey=self._qualified("s", self.dest.key),
                preview=sql.SQL("{} AS k").format(self._key_text("d")),
                n=sql.Literal(PREVIEW_KEYS),
            ),
            {},
        )
        await self._count_deleted(cur)

    async def delete_unseen(
        self, within: sql.Composable | None = None, params: Sequence[Any] | None = None
    ) -> None:
        """Delete every destination row whose key no record of this load carried (`track_seen`).

        `within` (a condition on the destination's rows, aliased `d`, with `params`) limits
        the deletes to the part of the table whose keys were loaded.
        """
        assert self.track_seen, "delete_unseen needs track_seen=True"
        cur = await self.conn.execute(
            sql.SQL(
                """
                WITH gone AS (
                  DELETE FROM {dest} AS d
                   WHERE ({within}) AND NOT EXISTS (SELECT FROM {seen} s WHERE ({skey}) = ({dkey}))
                  RETURNING {preview}
                )
                SELECT count(*), (array_agg(k))[1:{n}] FROM gone
                """
            ).format(
                dest=self.dest.identifier(),
                within=sql.SQL("TRUE") if within is None else within,
                seen=self.seen,
                skey=self._qualified("s", self.dest.key),
                dkey=self._qualified("d", self.dest.key),
                preview=sql.SQL("{} AS k").format(self._key_text("d")),
                n=sql.Literal(PREVIEW_KEYS),
            ),
            params or None,
        )
        await self._count_deleted(cur)

    async def copy_seen_keys(self, chunks: AsyncIterable[bytes | memoryview]) -> None:
        """Add raw COPY text data of key values to the seen set (a key diff against a source)."""
        assert self.track_seen, "copy_seen_keys needs track_seen=True"
        cur = self.conn.cursor()
        async with cur.copy(
            sql.SQL("COPY {} ({}) FROM STDIN").format(self.seen, self._cols(self.dest.key))
        ) as copy:
            async for chunk in chunks:
                await copy.write(chunk)

    async def _count_deleted(self, cur: psycopg.AsyncCursor[TupleRow]) -> None:
        row = await cur.fetchone()
        assert row is not None
        self.counts.deleted += row[0]
        if self.ctx is not None and self.ctx.dry_run:
            self._remember("delete", row[1])

    def _remember(self, kind: str, keys: list[str] | None) -> None:
        kept = self.counts.preview[kind]
        kept.extend((keys or [])[: PREVIEW_KEYS - len(kept)])

    # -- SQL pieces -----------------------------------------------------------------------

    @staticmethod
    def _cols(names: Iterable[str]) -> sql.Composable:
        return sql.SQL(", ").join(sql.Identifier(n) for n in names)

    @staticmethod
    def _qualified(alias: str, names: Iterable[str]) -> sql.Composable:
        return sql.SQL(", ").join(
            sql.SQL("{}.{}").format(sql.Identifier(alias), sql.Identifier(n)) for n in names
        )

    def _casts(self, names: Iterable[str]) -> sql.Composable:
        """Staged text columns cast to the destination's types, keeping their names."""
        return sql.SQL(", ").join(
            sql.SQL("{c}::{t} AS {c}").format(c=sql.Identifier(n), t=sql.SQL(self.types[n])) for n in names
        )

    def _key_text(self, alias: str) -> sql.Composable:
        parts = [
            sql.SQL("{}.{}::text").format(sql.Identifier(alias), sql.Identifier(k)) for k in self.dest.key
        ]
        if len(parts) == 1:
            return parts[0]
        return sql.SQL("concat_ws(',', {})").format(sql.SQL(", ").join(parts))
