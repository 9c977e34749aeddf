"""`redis`: flush sorted sets or hashes into a table, inserting, updating and deleting to match.

Three source shapes:

* joined sorted sets, ``{"type": "zset", "columns": {"daily": "lb:daily", …}}``: one
  row per member (in `key_column`), one score column per set, NULL where a member is
  absent from a set (daily / weekly / monthly leaderboards);
* sorted sets by pattern, ``{"type": "zset", "pattern": "lb:*"}``: one row per
  (set, member) with its score;
* hashes by pattern, ``{"type": "hash", "pattern": "user:*", "fields": {...}}``: one
  row per hash, keyed by the part of the key the `*` matched.

Keys are found with SCAN and read with ZSCAN / pipelined HMGET in chunks, so no reply
is larger than a chunk.  Everything read is loaded through the staging loader and
every destination row whose key was not seen is deleted, in one transaction.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

from worker import secrets
from worker.connectors.base import Connector, RunContext, RunResult, SyncError
from worker.connectors.config import ConfigError, check_secret, expect, identifier, reject_unknown, require
from worker.connectors.load import Loader, destination_session, parse_destination
from worker.errors import ErrorType

CHUNK = 1000
SCORE_TYPE = "double precision"


@dataclass(frozen=True)
class RedisConfig:
    url: Any  # secret reference
    type: str  # "zset" or "hash"
    sets: dict[str, str]  # column -> sorted set key (joined form)
    pattern: str | None
    key_column: str
    set_column: str
    member_column: str
    score_column: str
    fields: dict[str, str]  # column -> hash field
    destination: Any

    @property
    def columns(self) -> list[str]:
        if self.type == "hash":
            return [self.key_column, *self.fields]
        if self.pattern is None:
            return [self.key_column, *self.sets]
        return [self.set_column, self.member_column, self.score_column]

    def column_types(self) -> dict[str, str]:
        types = dict.fromkeys(self.columns, "text")
        if self.type == "zset":
            for column in self.sets if self.pattern is None else [self.score_column]:
                types[column] = SCORE_TYPE
        return types


class RedisConnector(Connector):
    kind = "redis"

    def validate(self, config: Mapping[str, Any]) -> RedisConfig:
        reject_unknown(config, {"url", "source", "key_column", "destination"})
        url = check_secret(config, "url", "url", required=True)
        source = require(config, "source", dict, 'an object like {"type": "zset", "columns": {...}}')
        kind = source.get("type")
        if kind not in ("zset", "hash"):
            raise ConfigError("source.type", f"expected zset or hash, got {kind!r:.40}")
        sets: dict[str, str] = {}
        fields: dict[str, str] = {}
        pattern = None
        key_column = config.get("key_column")
        set_column = source.get("set_column", "set")
        member_column = source.get("member_column", "member")
        score_column = source.get("score_column", "score")
        if kind == "zset" and "columns" in source:
            reject_unknown(source, {"type", "columns"}, "source")
            sets = _names(source["columns"], "source.columns", "a sorted set key")
            key_column = identifier(key_column, "key_column") if key_column is not None else "member"
        elif kind == "zset":
            reject_unknown(
                source, {"type", "pattern", "set_column", "member_column", "score_column"}, "source"
            )
            pattern = _pattern(source)
            _check_pattern_columns(set_column, member_column, score_column, key_column)
        else:
            reject_unknown(source, {"type", "pattern", "fields"}, "source")
            pattern = _pattern(source)
            fields = _names(
                require(source, "fields", dict, "an object of column name to hash field", prefix="source"),
                "source.fields",
                "a hash field name",
            )
            key_column = identifier(key_column, "key_column") if key_column is not None else "key"
        destination = parse_destination(config)
        parsed = RedisConfig(
            url,
            kind,
            sets,
            pattern,
            key_column or "",
            set_column,
            member_column,
            score_column,
            fields,
            destination,
        )
        if key_column and key_column in (sets or fields):
            raise ConfigError("key_column", f'"{key_column}" is also a value column')
        _check_key(parsed)
        return parsed

    async def run(self, ctx: RunContext) -> RunResult:
        cfg: RedisConfig = ctx.config
        url = secrets.resolve(cfg.url, "url")
        client = aioredis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=10)
        try:
            async with destination_session(ctx, cfg.destination) as dest:
                return await _sync(ctx, cfg, client, dest)
        except redis.exceptions.ConnectionError as exc:
            raise SyncError(f"redis: {secrets.redact(str(exc))}", error_type=ErrorType.CONNECTION) from None
        except redis.exceptions.TimeoutError as exc:
            raise SyncError(
                f"redis: timed out: {secrets.redact(str(exc))}", error_type=ErrorType.CONNECTION
            ) from None
        except redis.exceptions.ResponseError as exc:
            raise SyncError(
                f"redis: {secrets.redact(str(exc))}", error_type=ErrorType.SOURCE_INVALID
            ) from None
        finally:
            await client.aclose()


def _names(value: Any, field: str, what: str) -> dict[str, str]:
    if not isinstance(value, dict) or not value:
        raise ConfigError(field, f"expected a non-empty object of column name to {what}")
    for column, target in value.items():
        identifier(column, field)
        if not isinstance(target, str) or not target:
            raise ConfigError(f"{field}.{column}", f"expected {what} as a non-empty string")
    return dict(value)


def _pattern(source: Mapping[str, Any]) -> str:
    pattern = expect(source, "pattern", str, 'a key pattern like "lb:*"', prefix="source")
    if not pattern:
        raise ConfigError("source.pattern", 'is required (a key pattern like "user:*")')
    return str(pattern)


async def _sync(ctx: RunContext, cfg: RedisConfig, client: aioredis.Redis, conn: Any) -> RunResult:
    loader = Loader(conn, cfg.destination, cfg.columns, ctx, track_seen=True)
    await loader.prepare(create_columns=cfg.column_types())
    read = 0
    try:
        async for rows in _read(cfg, client):
            read += len(rows)
            await loader.write_batch(rows)
        await loader.delete_unseen()
    finally:
        await loader.close()
    ctx.log.info(
        "read %s records; %s inserted, %s updated, %s deleted",
        read,
        loader.counts.inserted,
        loader.counts.updated,
        loader.counts.deleted,
    )
    return loader.counts.result(ctx, read)


def _read(cfg: RedisConfig, client: aioredis.Redis) -> AsyncIterator[list[tuple[Any, ...]]]:
    if cfg.type == "hash":
        return _hashes(cfg, client)
    if cfg.pattern is None:
        return _joined_sets(cfg, client)
    return _sets_by_pattern(cfg, client)


def _text(value: bytes | str | None) -> str | None:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


async def _expect_type(client: aioredis.Redis, key: str, wanted: str) -> None:
    found = _text(await client.type(key))
    if found not in (wanted, "none"):
        raise SyncError(
            f'redis key "{key}" is a {found}, not a {wanted}', error_type=ErrorType.SOURCE_INVALID
        )


async def _joined_sets(cfg: RedisConfig, client: aioredis.Redis) -> AsyncIterator[list[tuple[Any, ...]]]:
    """One row per member of any set; each set's score in its column (NULL if absent).

    Each set is scanned in turn; a member is emitted by the first set that has it,
    together with its scores in every set (ZMSCORE), so rows are complete without
    holding the sets in memory.
    """
    columns = list(cfg.sets)
    keys = [cfg.sets[c] for c in columns]
    for key in keys:
        await _expect_type(client, key, "zset")
    for position, key in enumerate(keys):
        cursor = 0
        while True:
            cursor, chunk = await client.zscan(key, cursor, count=CHUNK)
            members = [m for m, _ in chunk]
            if members:
                async with client.pipeline(transaction=False) as pipe:
                    for other in keys:
                        pipe.zmscore(other, members)
                    scores = await pipe.execute()
                rows = [
                    (_text(member), *(s[i] for s in scores))
                    for i, member in enumerate(members)
                    if all(scores[earlier][i] is None for earlier in range(position))
                ]
                if rows:
                    yield rows
            if cursor == 0:
                break


async def _scan(client: aioredis.Redis, pattern: str, type_: str) -> AsyncIterator[list[str]]:
    cursor = 0
    while True:
        cursor, keys = await client.scan(cursor, match=pattern, count=CHUNK, _type=type_)
        if keys:
            yield [k.decode() if isinstance(k, bytes) else k for k in keys]
        if cursor == 0:
            break


async def _sets_by_pattern(cfg: RedisConfig, client: aioredis.Redis) -> AsyncIterator[list[tuple[Any, ...]]]:
    assert cfg.pattern is not None
    async for keys in _scan(client, cfg.pattern, "zset"):
        for key in keys:
            cursor = 0
            while True:
                cursor, chunk = await client.zscan(key, cursor, count=CHUNK)
                if chunk:
                    yield [(key, _text(member), score) for member, score in chunk]
                if cursor == 0:
                    break


async def _hashes(cfg: RedisConfig, client: aioredis.Redis) -> AsyncIterator[list[tuple[Any, ...]]]:
    assert cfg.pattern is not None
    prefix = cfg.pattern[:-1] if cfg.pattern.endswith("*") and "*" not in cfg.pattern[:-1] else ""
    wanted = list(cfg.fields.values())
    async for keys in _scan(client, cfg.pattern, "hash"):
        async with client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hmget(key, wanted)
            values = await pipe.execute()
        yield [
            (key[len(prefix) :] if prefix else key, *(_text(v) for v in found))
            for key, found in zip(keys, values, strict=True)
        ]


def _check_pattern_columns(set_column: Any, member_column: Any, score_column: Any, key_column: Any) -> None:
    """The pattern form of a zset source: three distinct column names, keyed by set and member."""
    for field_name, value in (
        ("set_column", set_column),
        ("member_column", member_column),
        ("score_column", score_column),
    ):
        identifier(value, f"source.{field_name}")
    if len({set_column, member_column, score_column}) < 3:
        raise ConfigError("source", "set_column, member_column and score_column must differ")
    if key_column is not None:
        raise ConfigError("key_column", "the pattern form is keyed by (set_column, member_column)")


def _check_key(parsed: RedisConfig) -> None:
    """The destination's key must be among the columns the source gives."""
    missing = set(parsed.destination.key) - set(parsed.columns)
    if missing:
        raise ConfigError(
            "destination.key",
            f"must be among the columns this source gives ({', '.join(parsed.columns)}); "
            f"not {', '.join(sorted(missing))}",
        )
