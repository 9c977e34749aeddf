"""One run of a `postgres` job: the first copy or an incremental read, then the deletes."""

from __future__ import annotations

import re
import time
from typing import Any

import psycopg
from psycopg import AsyncConnection, sql
from psycopg.rows import TupleRow

from worker.connectors.base import RunContext, RunResult, SyncError
from worker.connectors.load import Loader
from worker.connectors.postgres.config import DEFAULT_LOOKBACK_SECONDS, PostgresConfig
from worker.connectors.postgres.deletes import Deletes
from worker.connectors.postgres.stream import CopyStream
from worker.connectors.postgres.tracking import (
    BY_UPDATED_AT,
    BY_XMIN,
    EVERYTHING,
    bucket_count,
    bucket_of,
    changed_since,
    cursor_problem,
    key_hash,
    page_ranges,
    pages_between,
)

# The first copy commits its batches (with the position they reach) at most this often: a
# commit per batch costs more than the batch when batches are small.
COPY_CHECKPOINT_SECONDS = 0.5
# An incremental batch is applied when full or this long after its first row; the rest of
# the changes are read ahead meanwhile, up to this many bytes.
BATCH_SECONDS = 0.03
CHANGES_AHEAD = 1 << 23
# A destination table the mirror creates leaves a tenth of each page free: a row the source
# changes is then rewritten in its own page (a HOT update), with no new index entry.
MIRROR_FILLFACTOR = 90
_TIME_TYPES = re.compile(r"^(timestamp|date)")

Conn = AsyncConnection[TupleRow]


class Mirror(Deletes):
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
        self.split_scan = False  # whether the source table can be read by ranges of pages
        # the destination was empty when the first copy started (no stale rows to find)
        self.fresh = False
        self.saved_at = 0.0  # when the copy last checkpointed (monotonic)
        # whether the tombstones held every delete since this run's starting cursor
        # (None: there are none to read)
        self.tombstones_cover: bool | None = None

    async def run(self) -> RunResult:
        columns, types = await self.source_columns()
        self.types = types
        self.tracking = await self.tracking_mode()
        key = list(self.source.key)
        ordered = key + [c for c in columns if c not in key]
        loader = self.loader = Loader(
            self.dest, self.cfg.destination, ordered, self.ctx, soft_delete=self.cfg.deletes == "soft"
        )
        await loader.prepare(create_columns={c: types[c] for c in ordered}, fillfactor=MIRROR_FILLFACTOR)
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
                [self.source.regclass()],
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

    async def tracking_mode(self) -> str:
        """xmin for a table on a primary whose row versions can be read; else updated_at, else all."""
        mode = BY_UPDATED_AT if self.source.updated_at else EVERYTHING
        if self.source.table is not None:
            cur = await self.src.execute(
                "SELECT c.relkind::text, pg_is_in_recovery(), current_setting('server_version_num')::int"
                " FROM pg_class c WHERE c.oid = %s::regclass",
                [self.source.regclass()],
            )
            row = await cur.fetchone()
            # TID range scans came with PostgreSQL 14; a partitioned table's pages are its partitions'
            self.split_scan = row is not None and row[0] == "r" and row[2] >= 140000
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
        new = dict(state)
        check_window: str | None = None
        if self.tracking == BY_XMIN:
            query, params, since = await self.changes_by_xmin(columns, new)
        else:
            where, params, since, check_window = await self.changes_by_updated_at(columns, new)
            query = sql.SQL("SELECT {cols} FROM {rel} WHERE {where}").format(
                cols=self.select(columns), rel=self.source.relation(), where=where
            )
        statement = sql.SQL("COPY ({}) TO STDOUT").format(query)
        changed = await self.load_changes(statement, params or None)
        self.ctx.log.info(
            "incremental sync of %s: %s rows changed since %s", self.source.name, changed, since
        )
        if check_window is not None:
            await self.compare_window(columns, check_window)
        return new

    async def changes_by_xmin(
        self, columns: list[str], new: dict[str, Any]
    ) -> tuple[sql.Composable, list[Any], str]:
        """The query of the rows written since the saved cursor (in `new`, moved to this snapshot's).

        A large table is read in ranges of pages, its end first: new row versions go there when
        the pages before are full, so the first changes reach the destination early, and it
        writes them while the rest of the table is scanned (in the same snapshot: each row
        version is in one range).
        """
        cursor, xmax = await self.snapshot_cursor()
        previous = new.get("xmin")
        start = int(previous) if previous is not None else None
        if start is not None and (problem := cursor_problem(start, xmax)) is not None:
            self.ctx.log.warning("%s: %s; reading every row once", self.source.name, problem)
            start = None
        new.pop("watermark", None)
        new["xmin"] = str(cursor)
        select = sql.SQL("SELECT {cols} FROM {rel} WHERE {where}")
        cols, rel = self.select(columns), self.source.relation()
        if start is None:
            return select.format(cols=cols, rel=rel, where=sql.SQL("TRUE")), [], "the start"
        if self.cfg.deletes == "hard":
            self.tombstones_cover = await self.apply_tombstones(start)
        where, params = changed_since(start)
        ranges = page_ranges(await self.table_pages()) if self.split_scan else [(None, None)]
        parts = [
            select.format(cols=cols, rel=rel, where=sql.SQL("{} AND {}").format(where, pages_between(*r)))
            for r in ranges
        ]
        return sql.SQL(" UNION ALL ").join(parts), params * len(parts), f"transaction {start}"

    async def table_pages(self) -> int:
        cur = await self.src.execute(
            "SELECT pg_relation_size(%s::regclass) / current_setting('block_size')::int",
            [self.source.regclass()],
        )
        row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def changes_by_updated_at(
        self, columns: list[str], new: dict[str, Any]
    ) -> tuple[sql.Composable, list[Any], Any, str | None]:
        """The condition for the rows after the saved watermark (in `new`, moved to the source's
        latest), its parameters, what it is since, and the lookback window to compare, if any."""
        where: sql.Composable = sql.SQL("TRUE")
        params: list[Any] = []
        since: Any = None
        check_window: str | None = None
        high = await self.high_water()
        watermark = new.get("watermark")
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
        return where, params, since, check_window

    async def load_changes(self, statement: sql.Composed, params: list[Any] | None) -> int:
        """Upsert the rows `statement` reads, batch by batch while it reads on; the number read.

        The changed rows of a large table are few and far between: a batch is applied once it
        is full or BATCH_SECONDS after its first row, while the rest of the scan is read ahead
        (up to CHANGES_AHEAD bytes), so the scan and the writes overlap.
        """
        assert self.loader is not None
        stream = CopyStream(self.src.cursor().copy(statement, params), prefetch=True, ahead=CHANGES_AHEAD)
        async with stream:
            while not stream.done:
                await self.loader.load_copy_data(
                    stream.chunks(self.cfg.destination.batch_size, BATCH_SECONDS)
                )
                await self.commit_data()
        self.read += stream.rows
        return stream.rows

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
            reread = await self.load_changes(statement, params)
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


class _GaveWay(Exception):
    """The direct COPY of a batch met a row already there: the stream is abandoned."""
