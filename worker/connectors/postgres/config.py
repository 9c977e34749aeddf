"""The `postgres` job's config: the source, the destination and how deletes and changes are found."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from psycopg import sql

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
from worker.connectors.load import Destination, parse_destination

# NOTIFY channel of the real-time trigger; the payload is the source table's name.
CHANNEL = "syncworker_changes"
DEFAULT_HARD_DELETE_SECONDS = 3600
# Lookback when the job has no schedule to scale it from.
DEFAULT_LOOKBACK_SECONDS = 3600
DELETE_MODES = ("none", "soft", "hard")
# How incremental runs find changes: the xmin cursor or updated_at (the default), or the
# source's logical replication stream (a slot and a publication on the source).
CHANGE_MODES = ("auto", "logical")
LOGICAL = "logical"


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

    def regclass(self) -> str:
        assert self.table is not None
        return sql.Identifier(*self.table).as_string(None)


@dataclass(frozen=True)
class PostgresConfig:
    source: Source
    destination: Destination
    deletes: str
    soft_delete_column: str | None
    hard_delete_every: float
    lookback: float | None  # seconds; None = three times the job's period
    realtime: bool
    changes: str = "auto"  # one of CHANGE_MODES

    @property
    def logical(self) -> bool:
        return self.changes == LOGICAL


def parse_config(config: Mapping[str, Any]) -> PostgresConfig:
    """`config` checked and parsed (the connector's `validate`)."""
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
            "changes",
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
    changes = parse_changes(config, source)
    if changes == LOGICAL:
        for name, value in (("lookback_seconds", lookback), ("hard_delete_every_seconds", every)):
            if value is not None:
                raise ConfigError(name, 'does not apply with "changes": "logical" (the stream has them all)')
    elif source.updated_at is None and (lookback is not None or realtime):
        raise ConfigError("source.updated_at", "is required for incremental and real-time syncs")
    return PostgresConfig(
        source,
        destination,
        deletes,
        soft,
        float(DEFAULT_HARD_DELETE_SECONDS if every is None else every),
        None if lookback is None else float(lookback),
        realtime,
        changes,
    )


def parse_changes(config: Mapping[str, Any], source: Source) -> str:
    """`changes`: "auto" (the default) or "logical", which needs a source table and its key."""
    changes = expect(config, "changes", str, '"auto" or "logical"', "auto")
    if changes not in CHANGE_MODES:
        raise ConfigError(
            "changes",
            'expected "auto" (the default: the xmin cursor, or updated_at) or "logical" (the'
            f' source\'s logical replication stream), got "{changes:.40}"',
        )
    if changes == LOGICAL and source.table is None:
        raise ConfigError("changes", '"logical" needs source.table (a query has no change stream)')
    if changes == LOGICAL and not source.key:
        raise ConfigError("source.key", 'is required with "changes": "logical"')
    return str(changes)


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
