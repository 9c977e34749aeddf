"""The shared destination loader: staging COPY, set-based upsert, per-record fallback, deletes."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import psycopg
import pytest

from helpers import execute, rows
from worker.connectors.base import ConfigError, RunContext, SyncError
from worker.connectors.load import Loader, parse_destination


def _ctx(conn: psycopg.AsyncConnection[Any], dry_run: bool = False) -> RunContext:
    return RunContext(
        integration_id=1,
        name="t",
        kind="test",
        run_id=1,
        config=None,
        state={},
        conn=conn,
        log=logging.getLogger("test"),
        dry_run=dry_run,
    )


async def _load(
    url: str,
    dest_cfg: dict[str, Any],
    columns: list[str],
    batches: list[list[tuple[Any, ...]]],
    *,
    delete_unseen: bool = False,
    soft_delete: bool = False,
    dry_run: bool = False,
) -> tuple[Loader, RunContext]:
    dest = parse_destination({"destination": dest_cfg})
    async with await psycopg.AsyncConnection.connect(url) as conn:
        ctx = _ctx(conn, dry_run)
        loader = Loader(conn, dest, columns, ctx, track_seen=delete_unseen, soft_delete=soft_delete)
        await loader.prepare()
        for batch in batches:
            await loader.write_batch(batch)
        if delete_unseen:
            await loader.delete_unseen()
        await loader.close()
        if dry_run:
            await conn.rollback()
        else:
            await conn.commit()
    return loader, ctx


def test_creates_the_table_and_counts_inserts_updates_and_unchanged_rows(db: str) -> None:
    dest = {
        "table": "public.people",
        "key": ["id"],
        "create_table": True,
        "columns": {"id": "bigint", "name": "text", "score": "numeric(10,2)"},
    }
    loader, _ = asyncio.run(_load(db, dest, ["id", "name", "score"], [[(1, "ann", 1.5), (2, "bob", None)]]))
    assert (loader.counts.inserted, loader.counts.updated) == (2, 0)
    loader, _ = asyncio.run(
        _load(db, dest, ["id", "name", "score"], [[(1, "ann", 1.5), (2, "bob", 3), (3, "cy", 0)]])
    )
    assert (loader.counts.inserted, loader.counts.updated) == (1, 1)  # row 1 unchanged: not an update
    assert rows(db, "SELECT id, name, score::text FROM people ORDER BY id") == [
        {"id": 1, "name": "ann", "score": "1.50"},
        {"id": 2, "name": "bob", "score": "3.00"},
        {"id": 3, "name": "cy", "score": "0.00"},
    ]


def test_a_repeated_key_within_a_batch_keeps_the_last_record(db: str) -> None:
    dest = {"table": "t", "key": "id", "create_table": True, "columns": {"id": "int", "v": "text"}}
    loader, _ = asyncio.run(_load(db, dest, ["id", "v"], [[(1, "old"), (2, "x"), (1, "new")]]))
    assert rows(db, "SELECT id, v FROM t ORDER BY id") == [{"id": 1, "v": "new"}, {"id": 2, "v": "x"}]
    assert loader.counts.inserted == 2


def test_bad_records_are_reported_with_their_key_and_the_rest_lands(db: str) -> None:
    execute(db, "CREATE TABLE t (id int PRIMARY KEY, qty int CHECK (qty >= 0), at timestamptz)")
    loader, ctx = asyncio.run(
        _load(
            db,
            {"table": "t", "key": ["id"]},
            ["id", "qty", "at"],
            [[(1, 5, "2024-01-01T00:00:00Z"), (2, "lots", None), (3, -1, None), (4, 1, "not a date")]],
        )
    )
    assert rows(db, "SELECT id FROM t") == [{"id": 1}]
    assert loader.counts.failed == 3
    assert sorted(e.record_key or "" for e in ctx.errors) == ["2", "3", "4"]
    messages = " ".join(e.message for e in ctx.errors)
    assert "invalid input syntax for type integer" in messages and "check constraint" in messages


def test_delete_unseen_removes_what_the_source_no_longer_has(db: str) -> None:
    dest = {
        "table": "t",
        "key": ["a", "b"],
        "create_table": True,
        "columns": {"a": "text", "b": "int", "v": "int"},
    }
    asyncio.run(_load(db, dest, ["a", "b", "v"], [[("x", 1, 1), ("x", 2, 2), ("y", 1, 3)]]))
    loader, _ = asyncio.run(
        _load(db, dest, ["a", "b", "v"], [[("x", 1, 1)], [("y", 1, 4)]], delete_unseen=True)
    )
    assert (loader.counts.inserted, loader.counts.updated, loader.counts.deleted) == (0, 1, 1)
    assert rows(db, "SELECT a, b, v FROM t ORDER BY a, b") == [
        {"a": "x", "b": 1, "v": 1},
        {"a": "y", "b": 1, "v": 4},
    ]


def test_soft_delete_flag_removes_the_row(db: str) -> None:
    dest = {"table": "t", "key": "id", "create_table": True, "columns": {"id": "int", "v": "text"}}
    asyncio.run(_load(db, dest, ["id", "v"], [[(1, "a"), (2, "b")]]))
    loader, _ = asyncio.run(
        _load(db, dest, ["id", "v"], [[(1, "a", True), (2, "c", False), (3, "n", None)]], soft_delete=True)
    )
    assert (loader.counts.inserted, loader.counts.updated, loader.counts.deleted) == (1, 1, 1)
    assert rows(db, "SELECT id, v FROM t ORDER BY id") == [{"id": 2, "v": "c"}, {"id": 3, "v": "n"}]


def test_dry_run_reports_keys_and_writes_nothing(db: str) -> None:
    dest = {"table": "t", "key": "id", "create_table": True, "columns": {"id": "int", "v": "text"}}
    asyncio.run(_load(db, dest, ["id", "v"], [[(1, "a"), (2, "b")]]))
    loader, _ = asyncio.run(
        _load(db, dest, ["id", "v"], [[(2, "B"), (3, "c")]], delete_unseen=True, dry_run=True)
    )
    assert loader.counts.preview == {"insert": ["3"], "update": ["2"], "delete": ["1"]}
    assert rows(db, "SELECT id, v FROM t ORDER BY id") == [{"id": 1, "v": "a"}, {"id": 2, "v": "b"}]


def test_a_destination_without_a_unique_key_is_a_clear_error(db: str) -> None:
    execute(db, "CREATE TABLE t (id int, v text)")
    with pytest.raises(SyncError, match=r"needs a primary key or unique index on \(id\)"):
        asyncio.run(_load(db, {"table": "t", "key": "id"}, ["id", "v"], []))
    with pytest.raises(SyncError, match=r"does not exist; set \"create_table\""):
        asyncio.run(_load(db, {"table": "missing", "key": "id"}, ["id", "v"], []))
    execute(db, "CREATE TABLE u (id int PRIMARY KEY)")
    with pytest.raises(SyncError, match="has no column v"):
        asyncio.run(_load(db, {"table": "u", "key": "id"}, ["id", "v"], []))


@pytest.mark.parametrize(
    ("dest", "field"),
    [
        ({"key": "id"}, "destination.table"),
        ({"table": "a.b.c", "key": "id"}, "destination.table"),
        ({"table": "t; drop table x", "key": "id"}, "destination.table"),
        ({"table": "t"}, "destination.key"),
        ({"table": "t", "key": []}, "destination.key"),
        ({"table": "t", "key": "id", "columns": {"id": "int); drop table x; --"}}, "destination.columns.id"),
        ({"table": "t", "key": "id", "columns": {"v": "int"}}, "destination.columns"),
        ({"table": "t", "key": "id", "batch_size": 0}, "destination.batch_size"),
        ({"table": "t", "key": "id", "dsn": "postgres://u:p@h/db"}, "destination.dsn"),
        ({"table": "t", "key": "id", "colour": "red"}, "destination.colour"),
    ],
)
def test_destination_config_errors_name_the_field(dest: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_destination({"destination": dest})
    assert info.value.field == field
