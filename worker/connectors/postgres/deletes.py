"""Deletes of a `postgres` mirror run: the source's tombstones, and the comparison of key
buckets on both sides that finds the rest (see `tracking`)."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from typing import Any

import psycopg
from psycopg import AsyncConnection, sql
from psycopg.rows import TupleRow

from worker.connectors.base import RunContext
from worker.connectors.load import Loader
from worker.connectors.postgres.config import PostgresConfig, Source, qualified_name
from worker.connectors.postgres.stream import CopyStream
from worker.connectors.postgres.tracking import (
    BY_XMIN,
    DELETE_TRIGGER,
    HORIZON,
    INTEGER_TYPES,
    TOMBSTONE_RETENTION_DAYS,
    TOMBSTONES,
    bucket_count,
    bucket_of,
    key_hash,
)

# work_mem of the per-bucket aggregates (this transaction only).
AGGREGATE_WORK_MEM = "32MB"
_TRUE = sql.SQL("TRUE")

Conn = AsyncConnection[TupleRow]


class Deletes:
    """The delete half of `Mirror` (which mixes it in): its run's state, declared here."""

    ctx: RunContext
    cfg: PostgresConfig
    src: Conn
    dest: Conn
    loader: Loader | None
    types: dict[str, str]
    tracking: str
    fresh: bool
    tombstones_cover: bool | None

    @property
    def source(self) -> Source:
        return self.cfg.source

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
                    [qualified_name(self.source.table), self.source.regclass(), DELETE_TRIGGER],
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


async def _one(conn: Conn, query: sql.Composed) -> tuple[Any, ...]:
    cur = await conn.execute(query)
    row = await cur.fetchone()
    assert row is not None
    return row


_bucket_ids = itertools.count(1)
