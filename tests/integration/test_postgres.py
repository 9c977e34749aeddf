"""The `postgres` connector: full copy, incremental by watermark, deletes, dry run, bad input."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from helpers import add_job, create_database, drop_database, execute, one, rows
from worker.connectors import get
from worker.connectors.base import ConfigError
from worker.connectors.postgres import compress_wal
from worker.connectors.postgres.stream import unescape_copy_field
from worker.run.once import run_once

ORDERS = """
CREATE TABLE public.orders (
  id bigint PRIMARY KEY,
  customer text NOT NULL,
  total numeric(12,2),
  tags text[],
  note text,
  updated_at timestamptz NOT NULL DEFAULT now(),
  deleted_at timestamptz
);
"""


@pytest.fixture
def source(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name, url = create_database()
    try:
        execute(url, ORDERS)
        monkeypatch.setenv("TEST_SOURCE_DSN", url)
        yield url
    finally:
        drop_database(name)


def mirror_config(**extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "source": {
            "dsn": {"env": "TEST_SOURCE_DSN"},
            "table": "public.orders",
            "key": ["id"],
            "updated_at": "updated_at",
        },
        "destination": {
            "table": "public.orders_copy",
            "key": ["id"],
            "create_table": True,
            "batch_size": 100,
        },
    }
    config.update(extra)
    return config


def run(db: str, name: str = "orders") -> str | None:
    return asyncio.run(run_once(db, name)).status


def last_run(db: str) -> dict[str, Any]:
    return rows(db, "SELECT * FROM syncworker.sync_runs ORDER BY id DESC LIMIT 1")[0]


def same(source: str, db: str, table: str = "orders_copy") -> bool:
    query = "SELECT id, customer, total, tags, note, updated_at, deleted_at FROM {} ORDER BY id"
    return rows(source, query.format("orders")) == rows(db, query.format(table))


def test_first_run_copies_everything_in_batches_then_runs_incrementally(source: str, db: str) -> None:
    execute(
        source,
        r"""
        INSERT INTO orders (id, customer, total, tags, note, updated_at)
        SELECT g, 'c' || g, g * 1.5, ARRAY['a', 'b\c'], E'tab\there\nnewline',
                   '2024-01-01'::timestamptz + g * interval '1 minute'
          FROM generate_series(1, 1050) g
    """,
    )
    add_job(db, "orders", "postgres", mirror_config(), interval_seconds=60)
    assert run(db) == "success"
    assert same(source, db)
    run_row = last_run(db)
    # everything, then the rows written since the copy's snapshot (none): the catch-up pass
    # that picks up what changed during the copy
    assert (run_row["records_processed"], run_row["records_inserted"]) == (1050, 1050)
    state = one(db, "SELECT state FROM syncworker.integrations")
    assert set(state) == {"phase", "xmin"} and state["phase"] == "incremental"

    execute(source, "UPDATE orders SET total = 0, updated_at = '2024-01-02' WHERE id <= 10")
    execute(source, "INSERT INTO orders (id, customer, updated_at) VALUES (5000, 'new', '2024-01-02')")
    assert run(db) == "success"
    assert same(source, db)
    run_row = last_run(db)
    # the 11 rows written since, and nothing else
    assert (run_row["records_inserted"], run_row["records_updated"]) == (1, 10)
    assert run_row["records_processed"] == 11
    assert int(one(db, "SELECT state->>'xmin' FROM syncworker.integrations")) > int(state["xmin"])
    assert run(db) == "success"
    assert last_run(db)["records_processed"] == 0


def query_source(config: dict[str, Any]) -> dict[str, Any]:
    """The same job reading a query: no xmin to go by, so the updated_at watermark is used."""
    config["source"] = {**config["source"], "query": "SELECT * FROM orders"}
    del config["source"]["table"]
    return config


@pytest.mark.parametrize("kind", ["table", "query"])
def test_rows_sharing_the_watermark_are_never_skipped(source: str, db: str, kind: str) -> None:
    execute(source, "INSERT INTO orders (id, customer, updated_at) VALUES (1, 'a', '2024-01-01 10:00')")
    config = mirror_config(lookback_seconds=0)
    add_job(
        db, "orders", "postgres", query_source(config) if kind == "query" else config, interval_seconds=60
    )
    assert run(db) == "success"
    # Committed later, but stamped with the same time as the watermark.
    execute(source, "INSERT INTO orders (id, customer, updated_at) VALUES (2, 'b', '2024-01-01 10:00')")
    assert run(db) == "success"
    assert same(source, db)


@pytest.mark.parametrize("kind", ["table", "query"])
def test_a_late_commit_inside_the_lookback_is_caught(source: str, db: str, kind: str) -> None:
    execute(source, "INSERT INTO orders (id, customer, updated_at) VALUES (1, 'a', '2024-01-01 10:00')")
    config = mirror_config(lookback_seconds=600)
    add_job(
        db, "orders", "postgres", query_source(config) if kind == "query" else config, interval_seconds=60
    )
    assert run(db) == "success"
    execute(source, "INSERT INTO orders (id, customer, updated_at) VALUES (2, 'b', '2024-01-01 09:55')")
    assert run(db) == "success"
    assert same(source, db)
    # by xmin, or found in the lookback window by comparing it (the row at the watermark is
    # not read again)
    assert last_run(db)["records_processed"] == 1
    assert run(db) == "success"
    assert last_run(db)["records_processed"] == 0


def test_a_query_source_compares_its_lookback_window_instead_of_reading_it(source: str, db: str) -> None:
    execute(
        source,
        "INSERT INTO orders (id, customer, updated_at)"
        " SELECT g, 'c', '2024-01-01'::timestamptz + g * interval '1 second' FROM generate_series(1, 3000) g",
    )
    add_job(db, "orders", "postgres", query_source(mirror_config(lookback_seconds=3600)), interval_seconds=60)
    assert run(db) == "success"
    # all 3000 rows are within the lookback of the watermark: none is read again
    assert run(db) == "success"
    assert last_run(db)["records_processed"] == 0
    # changed after the watermark, and changed inside the window (a late commit, a slow clock)
    execute(source, "UPDATE orders SET customer = 'new', updated_at = '2024-01-02' WHERE id IN (1, 2)")
    execute(
        source,
        "UPDATE orders SET customer = 'late', updated_at = updated_at - interval '1 second' WHERE id = 2500",
    )
    assert run(db) == "success"
    assert same(source, db)
    # the 2 rows after the watermark; the bucket of row 2500, read again (about 32 rows)
    assert 3 <= last_run(db)["records_processed"] <= 2 + 100


def test_a_table_source_catches_late_commits_and_skewed_clocks_outside_any_lookback(
    source: str, db: str
) -> None:
    execute(
        source,
        "INSERT INTO orders (id, customer, updated_at)"
        " SELECT g, 'c', now() - interval '1 day' FROM generate_series(1, 500) g",
    )
    add_job(db, "orders", "postgres", mirror_config(lookback_seconds=0), interval_seconds=60)
    assert run(db) == "success"
    # A transaction that started before the next run, stamps its rows an hour in the past
    # (a clock behind, or a long transaction using now()), and commits after that run.
    with psycopg.connect(source) as late:
        late.execute(
            "UPDATE orders SET customer = 'late', updated_at = now() - interval '1 hour' WHERE id = 7"
        )
        late.execute("SAVEPOINT s")
        late.execute("INSERT INTO orders (id, customer, updated_at) VALUES (900, 'sub', '2000-01-01')")
        late.execute("RELEASE SAVEPOINT s")
        execute(
            source, "UPDATE orders SET customer = 'ahead', updated_at = now() + interval '1 day' WHERE id = 8"
        )
        assert run(db) == "success"
        assert last_run(db)["records_processed"] == 1  # id 8; id 7 and 900 are not committed
        late.commit()
    assert run(db) == "success"
    assert same(source, db)
    # ids 7 and 900; and id 8 once more: it committed after the late transaction began, so
    # the previous run could not tell it from what that transaction might write
    assert last_run(db)["records_processed"] == 3


def test_a_crash_during_the_full_copy_resumes_after_the_last_checkpoint(source: str, db: str) -> None:
    execute(source, "INSERT INTO orders (id, customer) SELECT g, 'c' FROM generate_series(1, 500) g")
    # as the crashed run saved it: the last key copied, and the cursor of the copy's snapshot
    cursor = one(source, "SELECT pg_snapshot_xmax(pg_current_snapshot())::text")
    add_job(
        db,
        "orders",
        "postgres",
        mirror_config(),
        interval_seconds=60,
        state={"phase": "full", "after": ["300"], "high_water": None, "xmin": cursor, "fresh": False},
    )
    assert run(db) == "success"
    assert one(db, "SELECT count(*) FROM orders_copy") == 200
    assert one(db, "SELECT min(id) FROM orders_copy") == 301
    assert last_run(db)["records_processed"] == 200


def test_soft_deletes_remove_marked_rows(source: str, db: str) -> None:
    execute(
        source,
        "INSERT INTO orders (id, customer, updated_at)"
        " SELECT g, 'c', '2024-01-01' FROM generate_series(1, 5) g",
    )
    add_job(
        db,
        "orders",
        "postgres",
        mirror_config(deletes="soft", soft_delete_column="deleted_at"),
        interval_seconds=60,
    )
    assert run(db) == "success"
    execute(source, "UPDATE orders SET deleted_at = now(), updated_at = '2024-01-02' WHERE id IN (2, 4)")
    assert run(db) == "success"
    assert [r["id"] for r in rows(db, "SELECT id FROM orders_copy ORDER BY id")] == [1, 3, 5]
    assert last_run(db)["records_deleted"] == 2


def test_hard_deletes_diff_the_keys(source: str, db: str) -> None:
    execute(source, "INSERT INTO orders (id, customer) SELECT g, 'c' FROM generate_series(1, 300) g")
    add_job(
        db,
        "orders",
        "postgres",
        mirror_config(deletes="hard", hard_delete_every_seconds=0),
        interval_seconds=60,
    )
    assert run(db) == "success"
    execute(source, "DELETE FROM orders WHERE id % 3 = 0")
    assert run(db) == "success"
    assert same(source, db)
    assert last_run(db)["records_deleted"] == 100


def test_a_destination_in_another_database(source: str, db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    name, dest = create_database()
    try:
        monkeypatch.setenv("TEST_DEST_DSN", dest)
        execute(source, "INSERT INTO orders (id, customer) SELECT g, 'c' FROM generate_series(1, 250) g")
        config = mirror_config()
        config["destination"]["dsn"] = {"env": "TEST_DEST_DSN"}
        add_job(db, "orders", "postgres", config, interval_seconds=60)
        assert run(db) == "success"
        assert same(source, dest)
        assert one(db, "SELECT state->>'phase' FROM syncworker.integrations") == "incremental"
    finally:
        drop_database(name)


def test_a_query_source_and_a_column_subset(source: str, db: str) -> None:
    execute(
        source, "INSERT INTO orders (id, customer, total) SELECT g, 'c' || g, g FROM generate_series(1, 30) g"
    )
    config = mirror_config()
    config["source"] = {
        "dsn": {"env": "TEST_SOURCE_DSN"},
        "key": ["id"],
        "updated_at": "updated_at",
        "query": "SELECT id, customer, updated_at FROM orders WHERE total > 10",
    }
    add_job(db, "orders", "postgres", config, interval_seconds=60)
    assert run(db) == "success"
    assert one(db, "SELECT count(*) FROM orders_copy") == 20
    columns = one(
        db,
        "SELECT array_agg(column_name::text ORDER BY ordinal_position) FROM information_schema.columns"
        " WHERE table_name = 'orders_copy'",
    )
    assert columns == ["id", "customer", "updated_at"]


def test_dry_run_writes_nothing(source: str, db: str) -> None:
    execute(source, "INSERT INTO orders (id, customer) SELECT g, 'c' FROM generate_series(1, 20) g")
    add_job(db, "orders", "postgres", mirror_config(), interval_seconds=60)
    outcome = asyncio.run(run_once(db, "orders", dry_run=True))
    assert outcome.result is not None and outcome.result.inserted == 20
    assert outcome.result.preview is not None and outcome.result.preview["insert"][:3] == ["1", "2", "3"]
    assert one(db, "SELECT to_regclass('public.orders_copy')") is None
    assert one(db, "SELECT state FROM syncworker.integrations") == {}
    assert one(db, "SELECT count(*) FROM syncworker.sync_runs") == 0


def test_a_first_copy_into_a_table_that_already_holds_some_rows_upserts_them(source: str, db: str) -> None:
    # New rows are COPYed straight in; a batch that meets existing keys is upserted instead.
    execute(
        source,
        "INSERT INTO orders (id, customer, total) SELECT g, 'c' || g, g FROM generate_series(1, 1000) g",
    )
    execute(
        db,
        "CREATE TABLE orders_copy (id bigint PRIMARY KEY, customer text, total numeric(12,2), tags text[],"
        " note text, updated_at timestamptz, deleted_at timestamptz)",
    )
    execute(db, "INSERT INTO orders_copy (id, customer) SELECT g, 'stale' FROM generate_series(550, 560) g")
    add_job(db, "orders", "postgres", mirror_config(), interval_seconds=60)
    assert run(db) == "success"
    fingerprint = (
        "SELECT count(*) AS n, md5(string_agg(concat_ws('|', id, customer, total), ',' ORDER BY id)) FROM {}"
    )
    assert rows(db, fingerprint.format("orders_copy")) == rows(source, fingerprint.format("orders"))
    r = last_run(db)
    assert (r["records_inserted"], r["records_updated"]) == (989, 11)


def test_bad_rows_are_recorded_and_the_rest_lands(source: str, db: str) -> None:
    execute(source, "INSERT INTO orders (id, customer, total) SELECT g, 'c', g FROM generate_series(1, 10) g")
    execute(
        db,
        "CREATE TABLE orders_copy (id bigint PRIMARY KEY, customer text, total numeric CHECK (total < 8),"
        " tags text[], note text, updated_at timestamptz, deleted_at timestamptz)",
    )
    config = mirror_config()
    config["destination"]["create_table"] = False
    add_job(db, "orders", "postgres", config, interval_seconds=60)
    assert run(db) == "partial"
    assert one(db, "SELECT count(*) FROM orders_copy") == 7
    errors = rows(db, "SELECT record_key, error_type FROM syncworker.sync_errors ORDER BY record_key")
    assert errors == [{"record_key": k, "error_type": "record_invalid"} for k in ("10", "8", "9")]
    assert last_run(db)["records_failed"] == 3


def test_source_problems_fail_the_run_clearly(source: str, db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    config = mirror_config()
    config["source"]["updated_at"] = "modified"
    add_job(db, "orders", "postgres", config, interval_seconds=60)
    assert run(db) == "failed"
    assert last_run(db)["error"] == "SyncError: source public.orders has no column modified"
    monkeypatch.setenv(
        "TEST_SOURCE_DSN", source.replace("127.0.0.1:5432", "127.0.0.1:1") + "?password=hunter22"
    )
    assert run(db) == "failed"
    run_row = last_run(db)
    assert run_row["error_type"] == "connection" and "hunter22" not in run_row["error"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"source": None}, "source"),
        ({"source": {"table": "orders", "key": ["id"]}}, "source.dsn"),
        ({"source": {"dsn": "postgres://x", "table": "orders"}}, "source.dsn"),
        ({"source": {"dsn": {"env": "X"}, "table": "orders", "query": "SELECT 1"}}, "source.table"),
        (
            {"source": {"dsn": {"env": "X"}, "table": "orders", "key": "id", "updated_at": "a b"}},
            "source.updated_at",
        ),
        ({"deletes": "sometimes"}, "deletes"),
        ({"deletes": "soft"}, "soft_delete_column"),
        ({"hard_delete_every_seconds": 60}, "hard_delete_every_seconds"),
        ({"lookback_seconds": -1}, "lookback_seconds"),
        ({"realtime": "yes"}, "realtime"),
        ({"destination": {"table": "t"}}, "destination.key"),
        ({"colour": 1}, "colour"),
    ],
)
def test_config_errors_name_the_field(change: dict[str, Any], field: str) -> None:
    config = mirror_config()
    config.update(change)
    config = {k: v for k, v in config.items() if v is not None}
    with pytest.raises(ConfigError) as info:
        get("postgres").validate(config)
    assert info.value.field == field


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (rb"\N", None),
        (b"plain", "plain"),
        (rb"a\tb\\c\nd", "a\tb\\c\nd"),
        (rb"\101\x42", "AB"),
        ("é".encode(), "é"),
    ],
)
def test_copy_text_fields_unescape(raw: bytes, text: str | None) -> None:
    assert unescape_copy_field(raw) == text


def test_without_updated_at_a_table_is_still_read_incrementally(source: str, db: str) -> None:
    execute(source, "INSERT INTO orders (id, customer) SELECT g, 'c' FROM generate_series(1, 40) g")
    config = mirror_config(deletes="hard", hard_delete_every_seconds=0)
    del config["source"]["updated_at"]
    add_job(db, "orders", "postgres", config, interval_seconds=60)
    assert run(db) == "success"
    assert last_run(db)["records_processed"] == 40
    execute(source, "UPDATE orders SET customer = 'x' WHERE id = 3; DELETE FROM orders WHERE id = 4")
    assert run(db) == "success"
    run_row = last_run(db)
    counts = (run_row["records_processed"], run_row["records_updated"], run_row["records_deleted"])
    assert counts == (1, 1, 1)
    assert same(source, db)


def test_a_query_without_updated_at_is_read_whole_every_run(source: str, db: str) -> None:
    execute(source, "INSERT INTO orders (id, customer) SELECT g, 'c' FROM generate_series(1, 40) g")
    config = query_source(mirror_config(deletes="hard", hard_delete_every_seconds=0))
    del config["source"]["updated_at"]
    add_job(db, "orders", "postgres", config, interval_seconds=60)
    assert run(db) == "success"
    assert last_run(db)["records_processed"] == 40
    execute(source, "UPDATE orders SET customer = 'x' WHERE id = 3; DELETE FROM orders WHERE id = 4")
    assert run(db) == "success"
    run_row = last_run(db)
    counts = (run_row["records_processed"], run_row["records_updated"], run_row["records_deleted"])
    assert counts == (39, 1, 1)
    assert same(source, db)


def wal_position(url: str) -> int:
    return int(one(url, "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn"))


def test_an_incremental_run_compresses_the_whole_pages_it_logs(source: str, db: str) -> None:
    """After a checkpoint the first change of a page logs the whole page: the rows an
    incremental run changes lie one in a page, so its WAL is a page per row unless the
    mirror's sessions compress those images (they do, where the login may)."""
    execute(
        source,
        """INSERT INTO orders (id, customer, note, updated_at)
           SELECT g, 'c' || g, repeat('n', 200), now() FROM generate_series(1, 6000) g""",
    )
    add_job(db, "orders", "postgres", mirror_config(), interval_seconds=60)
    assert run(db) == "success"
    per_page = one(db, "SELECT count(*) FROM orders_copy WHERE (ctid::text::point)[0] = 0")
    changed = one(
        source,
        "WITH c AS (UPDATE orders SET total = 1, updated_at = now() WHERE id %% %s = 0 RETURNING 1)"
        " SELECT count(*) FROM c",
        (per_page,),
    )
    execute(source, "CHECKPOINT")
    before = wal_position(db)
    assert run(db) == "success"
    written = wal_position(db) - before
    assert last_run(db)["records_processed"] == changed
    assert same(source, db)
    # uncompressed: at least a page (8 kB) per changed row for the destination alone
    assert written < changed * 8192 / 2, f"{written} bytes of WAL for {changed} changed rows"


def test_a_login_that_may_not_compress_the_wal_mirrors_all_the_same(
    source: str, db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    role = f"mirror_{uuid.uuid4().hex[:8]}"
    execute(db, f'CREATE ROLE "{role}" LOGIN')
    try:
        execute(source, f'GRANT SELECT ON orders TO "{role}"')
        execute(db, f'GRANT CREATE ON SCHEMA public TO "{role}"')
        execute(source, "INSERT INTO orders (id, customer) SELECT g, 'c' || g FROM generate_series(1, 50) g")
        monkeypatch.setenv("TEST_SOURCE_DSN", as_login(source, role))
        monkeypatch.setenv("TEST_DEST_DSN", as_login(db, role))
        config = mirror_config()
        config["destination"]["dsn"] = {"env": "TEST_DEST_DSN"}
        add_job(db, "orders", "postgres", config)
        assert run(db) == "success"
        assert same(source, db)

        async def setting_after_compress(url: str) -> str:
            async with await psycopg.AsyncConnection.connect(url) as conn:
                await conn.execute("SELECT 1")  # a transaction is open, as a run's is
                await compress_wal(conn, logging.getLogger("test"))
                assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
                row = await (await conn.execute("SHOW wal_compression")).fetchone()
                return str(row and row[0])

        assert asyncio.run(setting_after_compress(as_login(db, role))) == "off"
        assert asyncio.run(setting_after_compress(db)) == "lz4"
    finally:
        execute(db, f'DROP OWNED BY "{role}"')
        execute(source, f'DROP OWNED BY "{role}"')
        execute(db, f'DROP ROLE "{role}"')


def as_login(url: str, login: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{login}@{parts.hostname}:{parts.port or 5432}"))


def test_a_source_and_a_destination_with_their_own_timeouts_do_not_cut_a_run(
    source: str, db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database may set statement_timeout (or idle_in_transaction_session_timeout) for every
    session, to protect itself: a long COPY of a large table would then fail every time, and
    its job be disabled.  The job's own timeout_seconds bounds the run instead."""
    name, dest = create_database()
    try:
        for url in (source, dest):
            database = one(url, "SELECT current_database()")
            execute(url, f'ALTER DATABASE "{database}" SET statement_timeout = 200')
            execute(url, f'ALTER DATABASE "{database}" SET idle_in_transaction_session_timeout = 200')
        execute(source, "INSERT INTO orders (id, customer) SELECT g, 'c' || g FROM generate_series(1, 50) g")
        # Both sides take longer than 200 ms: the source's query, and each statement of the
        # destination (a trigger waits).
        execute(
            dest,
            """CREATE TABLE public.orders_copy (id bigint PRIMARY KEY, customer text, total numeric(12,2),
                 tags text[], note text, updated_at timestamptz, deleted_at timestamptz);
               CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS
                 $$ BEGIN PERFORM pg_sleep(0.3); RETURN NULL; END $$;
               CREATE TRIGGER slow AFTER INSERT ON public.orders_copy EXECUTE FUNCTION slow();""",
        )
        monkeypatch.setenv("TEST_DEST_DSN", dest)
        config = mirror_config()
        config["source"] = {
            "dsn": {"env": "TEST_SOURCE_DSN"},
            "query": "SELECT o.* FROM orders o, pg_sleep(0.3)",
            "key": ["id"],
        }
        config["destination"] = {
            "table": "public.orders_copy",
            "key": ["id"],
            "dsn": {"env": "TEST_DEST_DSN"},
        }
        add_job(db, "orders", "postgres", config, interval_seconds=60)
        assert run(db) == "success", last_run(db)["error"]
        assert one(dest, "SELECT count(*) FROM public.orders_copy") == 50
    finally:
        drop_database(name)
