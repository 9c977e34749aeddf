"""`"changes": "logical"`: a `postgres` mirror fed by its source table's logical replication
stream instead of scanning the table.

On the source, the job owns a publication of the one table and a logical replication slot
using the built-in `pgoutput` plugin, both named `syncworker_<job id>_<tag>` (the tag, eight
hex digits, tells apart the jobs of two control databases that read one server).  The slot
is read through the SQL interface (`pg_logical_slot_peek_binary_changes`: psycopg has no
replication protocol), its messages parsed by `pgoutput`.

* **First run**: the publication, then the slot, then the usual full copy in a snapshot
  taken after the slot exists, then the stream from the slot's start.  The stream then
  repeats changes the copy already holds; applied in order as upserts and deletes by key,
  a repeated change writes what the copy holds already or a value a later change in the
  stream overwrites again, so the destination ends exactly as the source at the stream's
  end (see `apply`).
* **Later runs** read the stream from the slot in bounded rounds and batches.  Each batch
  is applied to the destination, which commits, then the job's state `{"lsn": …}` (the end
  of the last transaction applied) through the fenced checkpoint; only then is the slot
  advanced to that position.  After a crash in between, the slot hands out those changes
  again: the transactions at or below the saved lsn are skipped.
* **The slot lost** (dropped, invalidated by `max_slot_wal_keep_size`, or moved past the
  saved position by someone else): a warning, a new slot, and a full copy, after which the
  rows the source no longer has are deleted (`deletes: hard`) as after any full copy.

Deletes come from the stream (`deletes: none` ignores them); a TRUNCATE empties the
destination.  A value the stream does not carry (an unchanged TOASTed column of an updated
row) keeps the destination's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, NoReturn

from psycopg import AsyncConnection, sql
from psycopg.rows import TupleRow

from worker.connectors.base import ConfigError, RunContext, RunResult, SyncError
from worker.connectors.load import DELETED, Loader
from worker.connectors.postgres.config import PostgresConfig, qualified_name
from worker.connectors.postgres.mirror import MIRROR_FILLFACTOR, Mirror
from worker.connectors.postgres.pgoutput import (
    Batch,
    ProtocolError,
    Stream,
    lsn_from_text,
    lsn_to_text,
    parse,
)
from worker.connectors.postgres.stream import CopyStream

# Messages asked for per peek (a transaction is never cut: one larger is handed out whole,
# a page at a time) and rows fetched per page of it.
PEEK_MESSAGES = 100_000
FETCH_ROWS = 1000
PLUGIN = "pgoutput"
UNCHANGED = "_sw_unchanged"
# The tag of a control database: its server's system identifier and its own name.
TAG_SQL = "SELECT md5((SELECT system_identifier::text FROM pg_control_system()) || '/' || current_database())"
# The text form of values as the stream sends them must read back the same in the destination.
SESSION_SETTINGS = {
    "TimeZone": "UTC",
    "DateStyle": "ISO",
    "IntervalStyle": "postgres",
    "extra_float_digits": "3",
    "bytea_output": "hex",
}

Conn = AsyncConnection[TupleRow]


def slot_name(integration_id: int, tag: str) -> str:
    """The name of a job's slot and publication on its source."""
    return f"syncworker_{integration_id}_{tag[:8]}"


@dataclass(frozen=True)
class SlotInfo:
    confirmed: int | None  # confirmed_flush_lsn
    problem: str | None  # why the slot cannot be read from (before comparing with the state)


class Slot:
    """The job's replication slot and publication, on a session of their own (autocommit)."""

    def __init__(self, conn: Conn, name: str) -> None:
        self.conn = conn
        self.name = name

    async def info(self) -> SlotInfo | None:
        cur = await self.conn.execute(
            """
            SELECT confirmed_flush_lsn::text, wal_status, database = current_database(), plugin,
                   slot_type
              FROM pg_replication_slots WHERE slot_name = %s
            """,
            [self.name],
        )
        row = await cur.fetchone()
        if row is None:
            return None
        confirmed, wal_status, here, plugin, kind = row
        problem = None
        if kind != "logical" or plugin != PLUGIN or not here:
            where = "" if here else " of another database"
            problem = f"it is not this job's: a {kind} slot{where}, plugin {plugin}"
        elif wal_status == "lost" or confirmed is None:
            problem = "it was invalidated: the WAL it needed is gone (max_slot_wal_keep_size)"
        return SlotInfo(None if confirmed is None else lsn_from_text(confirmed), problem)

    async def create(self) -> int:
        """Create the slot (waits for the transactions running on the server); its start."""
        cur = await self.conn.execute(
            "SELECT lsn::text FROM pg_create_logical_replication_slot(%s, %s)", [self.name, PLUGIN]
        )
        row = await cur.fetchone()
        assert row is not None
        return lsn_from_text(row[0])

    async def drop(self) -> None:
        await self.conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s",
            [self.name],
        )

    async def advance(self, lsn: int) -> None:
        """Let the server recycle the WAL before `lsn` (never moves the slot back)."""
        info = await self.info()
        if info is not None and info.confirmed is not None and info.confirmed < lsn:
            await self.conn.execute(
                "SELECT pg_replication_slot_advance(%s, %s::pg_lsn)", [self.name, lsn_to_text(lsn)]
            )

    async def end(self) -> int:
        """Where a run reads up to: the end of a (transactional, empty) logical message written
        now and flushed with its commit.

        Every transaction that committed before that position is in what a peek up to it
        hands out, so the slot may be moved there even when none of them wrote the table.
        And the peek never waits: the SQL interface reads up to the flush position, and when
        that is in the middle of a record (the WAL writer flushes whole pages) it waits for
        the rest, which an uncommitted writer may not flush for seconds.
        """
        async with self.conn.transaction():
            await self.conn.execute("SET LOCAL synchronous_commit = local")
            cur = await self.conn.execute("SELECT pg_logical_emit_message(true, 'syncworker', '')::text")
            row = await cur.fetchone()
        assert row is not None
        return lsn_from_text(row[0])

    async def ensure_publication(self, table: tuple[str, ...]) -> None:
        cur = await self.conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", [self.name])
        if await cur.fetchone() is None:
            await self.conn.execute(
                sql.SQL("CREATE PUBLICATION {} FOR TABLE {} WITH (publish_via_partition_root = true)").format(
                    sql.Identifier(self.name), sql.Identifier(*table)
                )
            )


# What `check_source` checks, in one round trip.
SOURCE_FACTS = """
SELECT current_setting('wal_level'), current_setting('max_replication_slots')::int,
       current_user::text, r.rolsuper OR r.rolreplication, pg_has_role(c.relowner, 'USAGE'),
       has_database_privilege(current_database(), 'CREATE'), c.relreplident::text,
       (SELECT coalesce(array_agg(a.attname::text), '{}') FROM pg_index i
          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
         WHERE i.indrelid = c.oid AND CASE c.relreplident WHEN 'd' THEN i.indisprimary
                                                          WHEN 'i' THEN i.indisreplident END),
       EXISTS (SELECT FROM pg_publication WHERE pubname = %(pub)s),
       EXISTS (SELECT FROM pg_publication_tables
                WHERE pubname = %(pub)s AND schemaname = %(schema)s AND tablename = %(table)s),
       current_setting('server_version_num')::int, pg_is_in_recovery()
  FROM pg_roles r, pg_class c
 WHERE r.rolname = current_user AND c.oid = %(rel)s::regclass
"""


def publication_sql(name: str, table: str) -> str:
    return f"CREATE PUBLICATION {name} FOR TABLE {table} WITH (publish_via_partition_root = true);"


async def check_source(conn: Conn, cfg: PostgresConfig, name: str) -> None:
    """ConfigError (the job is disabled) saying what to run when the source cannot stream the
    table: wal_level, the role's REPLICATION, the publication (owner), the replica identity."""
    assert cfg.source.table is not None
    table = qualified_name(cfg.source.table)
    schema, _, relname = table.partition(".")
    quoted = sql.Identifier(schema, relname).as_string(None)  # in the statements a message suggests
    cur = await conn.execute(
        SOURCE_FACTS, {"pub": name, "schema": schema, "table": relname, "rel": cfg.source.regclass()}
    )
    row = await cur.fetchone()
    if row is None:
        raise SyncError(f"source {table} not found", error_type="source_invalid")
    (
        level,
        slots,
        user,
        replication,
        owner,
        create,
        identity,
        identity_cols,
        has_pub,
        in_pub,
        version,
        standby,
    ) = row
    role = sql.Identifier(user).as_string(None)
    if version < 130000 or standby:
        _needs("a primary server of PostgreSQL 13 or newer as the source")
    if level != "logical":
        _needs(
            f"wal_level = logical on the source server (it is {level}): run ALTER SYSTEM SET"
            " wal_level = logical; there and restart it"
        )
    if slots < 1:
        _needs(
            "replication slots on the source server (max_replication_slots is 0): run ALTER SYSTEM"
            " SET max_replication_slots = 10; there and restart it"
        )
    if not replication:
        _needs(f"a source role with REPLICATION (or a superuser): run ALTER ROLE {role} REPLICATION;")
    key = list(cfg.source.key)
    if identity == "n" or (identity != "f" and not set(key) <= set(identity_cols)):
        _needs(
            f"the source table's replica identity to cover the key ({', '.join(key)}), so that its"
            " updates and deletes are published with it: give it a primary key on the key, or run"
            f" ALTER TABLE {quoted} REPLICA IDENTITY FULL;"
        )
    if not has_pub and not (owner and create):
        _needs(
            f"the publication {name}, which the role {user} cannot create (that takes owning {table}"
            f" and CREATE on the database): as the table's owner, run {publication_sql(name, quoted)}"
        )
    if has_pub and not in_pub:
        _needs(f"the publication {name} to hold {table}: run ALTER PUBLICATION {name} ADD TABLE {quoted};")


def _needs(what: str) -> NoReturn:
    raise ConfigError("changes", f'"logical" needs {what}')


class ChangeLoader(Loader):
    """The loader of the stream's batches: each staged row also says which of its values the
    stream did not carry (positions of unchanged TOAST); those are taken from the destination's
    row, and rows the destination does not have are left in `missing`, to be read again."""

    def __init__(self, conn: Conn, cfg: PostgresConfig, columns: list[str], ctx: RunContext) -> None:
        dest = dataclasses.replace(cfg.destination, create_table=False)  # the copy's loader made it
        super().__init__(conn, dest, columns, ctx, soft_delete=True)
        self.copy_columns = [*self.columns, DELETED, UNCHANGED]
        self.missing: list[tuple[str | None, ...]] = []
        self.partial = False  # whether the staged batch has rows with values to fill in

    async def apply_stage(self) -> None:
        if self.partial:
            await self._fill_unchanged()
        await super().apply_stage()

    async def _fill_unchanged(self) -> None:
        unchanged = sql.Identifier(UNCHANGED)
        sets = [
            sql.SQL(
                "{c} = CASE WHEN {n} = ANY (string_to_array(s.{u}, ',')::int[])"
                " THEN d.{c}::text ELSE s.{c} END"
            ).format(c=sql.Identifier(c), n=sql.Literal(n + 1), u=unchanged)
            for n, c in enumerate(self.columns)
            if c not in self.dest.key
        ]
        sets.append(
            sql.SQL("{f} = coalesce(s.{f}, 'f'), {u} = NULL").format(f=sql.Identifier(DELETED), u=unchanged)
        )
        key = sql.SQL(", ").join(
            sql.SQL("s.{c}::{t}").format(c=sql.Identifier(k), t=sql.SQL(self.types[k])) for k in self.dest.key
        )
        await self.conn.execute(
            sql.SQL(
                "UPDATE {stage} s SET {sets} FROM {dest} d WHERE s.{u} IS NOT NULL AND ({dkey}) = ({skey})"
            ).format(
                stage=self.stage,
                sets=sql.SQL(", ").join(sets),
                dest=self.dest.identifier(),
                u=unchanged,
                dkey=self._qualified("d", self.dest.key),
                skey=key,
            )
        )
        cur = await self.conn.execute(
            sql.SQL("DELETE FROM {} WHERE {} IS NOT NULL RETURNING {}").format(
                self.stage, unchanged, self._cols(self.dest.key)
            )
        )
        self.missing.extend(tuple(r) for r in await cur.fetchall())


class LogicalMirror(Mirror):
    """One run of a postgres job with `"changes": "logical"`."""

    def __init__(
        self, ctx: RunContext, cfg: PostgresConfig, src: Conn, dest: Conn, admin: Conn, *, external: bool
    ) -> None:
        super().__init__(ctx, cfg, src, dest, external=external)
        self.admin = admin
        self.slot = Slot(admin, "")
        # what the copy's checkpoints carry besides its position: the slot and where it started
        self.marker: dict[str, Any] = {}
        self.saved = 0  # the position the job's state holds

    async def run(self) -> RunResult:  # long: set-up, the copy when due, then the stream, in order
        columns, types = await self.source_columns()
        self.types = types
        key = list(self.source.key)
        ordered = key + [c for c in columns if c not in key]
        cur = await self.ctx.conn.execute(TAG_SQL)
        tag = await cur.fetchone()
        assert tag is not None
        self.slot = Slot(self.admin, slot_name(self.ctx.integration_id, tag[0]))
        # The slot comes first, before anything is written: creating it waits for every
        # transaction running on the source's server, this run's own included.
        state, copy, streaming = await self.position()
        loader = self.loader = Loader(
            self.dest, self.cfg.destination, ordered, self.ctx, soft_delete=self.cfg.deletes == "soft"
        )
        await loader.prepare(create_columns={c: types[c] for c in ordered}, fillfactor=MIRROR_FILLFACTOR)
        changes = ChangeLoader(self.dest, self.cfg, ordered, self.ctx)
        await changes.prepare()
        try:
            if copy:
                state = await self.copy(ordered, state)
            if streaming:
                state = await self.follow(ordered, changes, state)
            await self.src.rollback()
        finally:
            await changes.close()
            await loader.close()
        await self.commit_data()
        counts = loader.counts
        counts.inserted += changes.counts.inserted
        counts.updated += changes.counts.updated
        self.merge_deleted(changes)
        for kind in ("insert", "update"):
            kept = counts.preview[kind]
            kept.extend(changes.counts.preview[kind][: max(0, 10 - len(kept))])
        return counts.result(self.ctx, self.read, state)

    async def high_water(self) -> str | None:
        return None  # the stream, not updated_at, says what changed after the copy

    # -- the slot ------------------------------------------------------------------------------

    async def position(self) -> tuple[dict[str, Any], bool, bool]:
        """Where this run starts: (state, whether a copy is due, whether there is a stream).

        The saved position goes on when the slot is there and not past it; otherwise a new
        slot and a full copy.  (A dry run creates nothing: without a slot it previews a copy.)
        """
        await check_source(self.admin, self.cfg, self.slot.name)
        state = dict(self.ctx.state)
        info = await self.slot.info()
        saved = state.get("lsn") if state.get("changes") == "logical" else None
        if isinstance(saved, str):
            problem = "it does not exist" if info is None else info.problem
            if (
                problem is None
                and info is not None
                and info.confirmed is not None
                and info.confirmed > lsn_from_text(saved)
            ):
                problem = f"it is at {lsn_to_text(info.confirmed)}, past this job's position {saved}"
            if problem is None:
                self.saved = lsn_from_text(saved)
                if state.get("phase") == "full":  # a copy cut short: it resumes
                    self.marker = {k: state[k] for k in ("changes", "slot", "lsn")}
                    return state, True, True
                return state, False, True
            self.ctx.log.warning(
                "%s: the replication slot %s cannot go on from the job's position (%s): starting over"
                " with a new slot and a full copy",
                self.source.name,
                self.slot.name,
                problem,
            )
        if self.ctx.dry_run:
            return {}, True, False
        if info is not None:
            await self.slot.drop()
        assert self.source.table is not None
        await self.slot.ensure_publication(self.source.table)
        start = await self.slot.create()
        await self.src.rollback()  # the copy's snapshot is taken after the slot's start
        self.saved = start
        self.marker = {"changes": "logical", "slot": self.slot.name, "lsn": lsn_to_text(start)}
        self.ctx.log.info(
            "%s: replication slot %s created at %s", self.source.name, self.slot.name, self.marker["lsn"]
        )
        return dict(self.marker), True, True

    # -- the first copy ------------------------------------------------------------------------

    async def copy(self, columns: list[str], state: dict[str, Any]) -> dict[str, Any]:
        """The full copy (resumed if cut short), then the deletes a copy into a table that was
        not empty leaves to find; returns the state the stream starts from."""
        await self.full_copy(columns, state)
        if self.cfg.deletes == "hard" and not self.fresh:
            await self.bucket_deletes()
            await self.src.rollback()
        done = dict(self.marker)
        await self.checkpoint(done)
        self.marker = {}
        return done

    async def checkpoint_copy(self, state: dict[str, Any]) -> None:
        await super().checkpoint_copy({**state, **self.marker})

    # -- the stream ----------------------------------------------------------------------------

    async def follow(
        self, columns: list[str], changes: ChangeLoader, state: dict[str, Any]
    ) -> dict[str, Any]:
        """Apply the stream from the saved position up to the source's WAL position now."""
        if not self.ctx.dry_run:
            # Whatever the slot holds up to the saved position is in the destination already.
            await self.slot.advance(self.saved)
        target = await self.slot.end()
        assert self.source.table is not None
        schema, _, table = qualified_name(self.source.table).partition(".")
        stream = Stream(
            (schema, table),
            tuple(columns),
            self.source.key,
            self.cfg.soft_delete_column if self.cfg.deletes == "soft" else None,
            self.saved,
        )
        read_before = self.read
        more = True
        while more and not self.ctx.dry_run:  # a dry run peeks once (it moves nothing)
            more = await self.follow_round(stream, columns, changes, target)
            if not more and target > stream.position:
                # Every transaction that committed before `target` was handed out: none since
                # the last one applied wrote the table.  The slot moves on past them, so that
                # the next run does not decode their WAL again, nor holds it.
                stream.position = target
            await self.save(stream)
            await self.slot.advance(self.saved)
        if self.ctx.dry_run:
            await self.follow_round(stream, columns, changes, target)
        self.ctx.log.info(
            "%s: %s changes applied from the replication stream, up to %s (%s skipped: applied before)",
            self.source.name,
            self.read - read_before,
            lsn_to_text(stream.position),
            stream.skipped,
        )
        return {"changes": "logical", "slot": self.slot.name, "lsn": lsn_to_text(stream.position)}

    async def follow_round(
        self, stream: Stream, columns: list[str], changes: ChangeLoader, target: int
    ) -> bool:
        """One peek at the slot, applied a batch at a time; whether there may be more."""
        size = self.cfg.destination.batch_size
        batch = Batch(deletes=self.cfg.deletes != "none")
        messages = 0
        async with self.admin.transaction():
            cur = self.admin.cursor("syncworker_changes")
            try:
                await cur.execute(
                    "SELECT data FROM pg_logical_slot_peek_binary_changes(%s, %s::pg_lsn, %s,"
                    " 'proto_version', '1', 'publication_names', %s)",
                    [self.slot.name, lsn_to_text(target), PEEK_MESSAGES, self.slot.name],
                )
                while page := await cur.fetchmany(FETCH_ROWS):
                    for (data,) in page:
                        messages += 1
                        stream.feed(parse(data), batch)
                        if len(batch) >= size:
                            await self.apply(batch, columns, changes)
                            batch = Batch(deletes=batch.deletes)
                            await self.save(stream)
            except ProtocolError as exc:
                raise SyncError(
                    f"replication stream of {self.source.name}: {exc}", error_type="source_invalid"
                ) from None
            finally:
                await cur.close()
        await self.apply(batch, columns, changes)
        return messages >= PEEK_MESSAGES

    async def apply(self, batch: Batch, columns: list[str], changes: ChangeLoader) -> None:
        """One batch into the destination: a truncate first, then one operation per key.

        Why a change applied twice is harmless: each key's operation is its last change
        in the batch, an upsert of the whole row or a delete, and the batches follow the
        stream's order.  A change the destination already holds (the copy saw it, or a run
        applied it and crashed before saving its position) is applied again before the
        changes that came after it, which are applied again too: each key ends as its last
        change left it.  The one exception is a value the stream does not carry (unchanged
        TOAST): it is taken from the destination's row, where the same value is, or a later
        one the stream's later changes set again.
        """
        if batch.truncate:
            cur = await self.dest.execute(sql.SQL("DELETE FROM {}").format(self.cfg.destination.identifier()))
            changes.counts.deleted += max(cur.rowcount, 0)
        if batch.ops:
            rows = []
            partial = False
            for op in batch.ops.values():
                unchanged = None
                if op.unchanged or op.deleted is None:
                    unchanged = ",".join(str(n + 1) for n in sorted(op.unchanged))
                    partial = True
                rows.append([*op.values, op.deleted, unchanged])
            changes.partial = partial
            await changes.write_batch(rows)
        refetch = set(batch.refetch) | set(changes.missing)
        changes.missing.clear()
        if refetch:
            await self.refetch(columns, refetch)
        self.read += batch.changes

    async def refetch(self, columns: list[str], keys: set[tuple[str | None, ...]]) -> None:
        """Rows whose unchanged values the destination does not hold, read from the source as
        they are now (the stream's later changes of them still follow)."""
        assert self.loader is not None
        key = self.source.key
        statement = sql.SQL(
            "COPY (SELECT {cols} FROM {rel} WHERE ({key}) IN"
            " (SELECT {casts} FROM unnest({arrays}) AS u({names}))) TO STDOUT"
        ).format(
            cols=self.select(columns),
            rel=self.source.relation(),
            key=sql.SQL(", ").join(sql.Identifier(k) for k in key),
            casts=sql.SQL(", ").join(
                sql.SQL("u.{}::{}").format(sql.Identifier(f"k{i}"), sql.SQL(self.types[k]))
                for i, k in enumerate(key)
            ),
            arrays=sql.SQL(", ").join(sql.SQL("%s::text[]") for _ in key),
            names=sql.SQL(", ").join(sql.Identifier(f"k{i}") for i in range(len(key))),
        )
        params = [[k[i] for k in keys] for i in range(len(key))]
        await self.src.rollback()
        stream = CopyStream(self.src.cursor().copy(statement, params))
        async with stream:
            await self.loader.load_copy_data(stream.chunks())
        await self.src.rollback()
        self.read += stream.rows
        self.ctx.log.info(
            "%s: %s rows read again from the source (values the stream did not carry)",
            self.source.name,
            stream.rows,
        )

    async def save(self, stream: Stream) -> None:
        """Commit what is applied: the destination, then the state saying up to where (fenced)."""
        if stream.position <= self.saved:
            await self.commit_data()  # part of a transaction: its end is not reached yet
            return
        self.saved = stream.position
        await self.checkpoint(
            {"changes": "logical", "slot": self.slot.name, "lsn": lsn_to_text(stream.position)}
        )
