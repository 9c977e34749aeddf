"""`postgres`: mirror a table (or query) of another database into a destination table.

The first run copies everything, streamed in key order as raw `COPY` data, one batch
per statement, all in one snapshot of the source; each batch is checkpointed with the
last key it holds, so a crash resumes where the copy stopped.  Later runs are
incremental.  How they find the changed rows depends on the source:

* a table on a primary (the usual case): the rows written by transactions the previous
  run's snapshot could not see, found by their `xmin` (see `tracking`).  No
  clock is trusted: a transaction that commits late, or stamps `updated_at` from a skewed
  clock, is read all the same, and rows written long ago are never read again.  The
  changed rows are written while the scan goes on, a large table's last pages first;
* a query, a view, a foreign table or a standby: every row whose `updated_at` is after the
  saved watermark; the rows within the lookback window before it are compared with the
  destination's per key bucket, and the buckets that differ are read again (rows sharing
  the watermark value are never skipped; rows whose commit was late within the lookback
  are caught);
* neither: every row, every run.

With `"changes": "logical"` (opt-in), runs read the source table's logical replication
stream instead (a publication and a slot on the source, see `logical`): only the rows that
changed, deletes and truncates included, whatever the table's size.

Deletes: `none`; `soft` (the source marks a deleted row by setting a column; that row is
removed from the destination); `hard`: the keys recorded by the source's delete trigger
since the previous run (`syncworker install-trigger`), and periodically, a comparison of
key buckets (row count and a sum of key hashes per bucket) that re-reads only the keys of
the buckets that differ.

The parts: `config` (the job's settings, checked), `mirror` (one run: the copy and the
incremental read), `deletes`, `tracking` (finding changes without trusting clocks),
`stream` (the source's COPY data), `logical` and `pgoutput` (the logical replication mode
and its messages) and `tools` (`install-trigger`, `verify`, `drop-slot`).
"""

from __future__ import annotations

from collections.abc import Mapping
from logging import Logger, LoggerAdapter
from typing import Any

import psycopg
from psycopg import sql

from worker import db, secrets
from worker.connectors.base import Connector, RealtimeSource, RunContext, RunResult
from worker.connectors.load import destination_session
from worker.connectors.postgres.config import (
    CHANNEL,
    LOGICAL,
    PostgresConfig,
    Source,
    parse_config,
    qualified_name,
)
from worker.connectors.postgres.logical import SESSION_SETTINGS, LogicalMirror
from worker.connectors.postgres.mirror import Mirror
from worker.connectors.postgres.stream import unescape_copy_field


class PostgresConnector(Connector):
    kind = "postgres"

    def validate(self, config: Mapping[str, Any]) -> PostgresConfig:
        return parse_config(config)

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
            await src.execute(db.SETTINGS_FOR_ANY_SERVER)
            await src.execute("SET TimeZone = 'UTC'")
            await compress_wal(src, ctx.log)  # its scan may prune pages the source's writes left
            await src.commit()
            # Reads see one snapshot each (the incremental's max(updated_at) and its rows).
            await src.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)
            await src.set_read_only(True)
            if cfg.logical:
                return await self._logical(ctx, cfg, src, source_dsn)
            if ctx.state.get("changes") == LOGICAL:
                ctx.log.warning(
                    "%s: the replication slot %s of this job's logical mode is still on the source,"
                    " holding WAL: drop it with `syncworker drop-slot %s`",
                    cfg.source.name,
                    ctx.state.get("slot"),
                    ctx.name,
                )
            async with destination_session(ctx, cfg.destination) as dest:
                await compress_wal(dest, ctx.log)
                return await Mirror(ctx, cfg, src, dest, external=cfg.destination.dsn is not None).run()

    @staticmethod
    async def _logical(
        ctx: RunContext, cfg: PostgresConfig, src: psycopg.AsyncConnection[Any], source_dsn: str
    ) -> RunResult:
        """A run of `"changes": "logical"`: a second source session (autocommit) for the slot."""
        async with await psycopg.AsyncConnection.connect(
            source_dsn, autocommit=True, **db.connect_kwargs("syncworker slot")
        ) as admin:
            await admin.execute(db.SETTINGS_FOR_ANY_SERVER)
            for name, value in SESSION_SETTINGS.items():
                await admin.execute("SELECT set_config(%s, %s, false)", [name, value])
            async with destination_session(ctx, cfg.destination) as dest:
                await compress_wal(dest, ctx.log)
                external = cfg.destination.dsn is not None
                return await LogicalMirror(ctx, cfg, src, dest, admin, external=external).run()


async def compress_wal(conn: psycopg.AsyncConnection[Any], log: Logger | LoggerAdapter[Logger]) -> None:
    """Have the session compress the full-page images it writes to the WAL, where the server
    does not already and the login may (a superuser, or `GRANT SET ON PARAMETER
    wal_compression`, PostgreSQL 15): an incremental run changes rows one in a page, and the
    first change of a page after a checkpoint logs the whole page.  lz4 where the server has
    it, else pglz; a session that may not set it goes on as it is."""
    row = await (await conn.execute("SELECT current_setting('wal_compression', true)")).fetchone()
    if row is None or row[0] != "off":  # compressing already, or a server without the setting
        return
    for method in ("lz4", "on"):
        try:
            async with conn.transaction():  # a savepoint inside the run's transaction
                await conn.execute(sql.SQL("SET wal_compression = {}").format(sql.Literal(method)))
            return
        except (psycopg.errors.InsufficientPrivilege, psycopg.errors.CantChangeRuntimeParam):
            log.debug("full-page images stay uncompressed: no right to set wal_compression")
            return
        except psycopg.errors.InvalidParameterValue:
            continue  # a server without lz4 (or before PostgreSQL 15)


__all__ = [
    "CHANNEL",
    "PostgresConfig",
    "PostgresConnector",
    "Source",
    "qualified_name",
    "unescape_copy_field",
]
