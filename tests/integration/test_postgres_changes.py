"""The `postgres` mirror stays exact while its source is written to, and finds deletes cheaply.

Changes are found by the rows' transaction ids (no clock trusted), deletes by the
tombstones the delete trigger records or by comparing key buckets.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from helpers import ROOT, TESTS, add_job, create_database, drop_database, execute, one, rows
from worker.connectors.postgres import tracking
from worker.run.once import run_once

TABLE = """
CREATE TABLE public.items (
  id bigint PRIMARY KEY, grp int NOT NULL, body text, updated_at timestamptz NOT NULL DEFAULT now()
)
"""
FINGERPRINT = "SELECT count(*) AS n, md5(coalesce(string_agg(i::text, ',' ORDER BY id), '')) FROM {} i"


@pytest.fixture
def source(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name, url = create_database()
    try:
        execute(url, TABLE)
        monkeypatch.setenv("TEST_SOURCE_DSN", url)
        yield url
    finally:
        drop_database(name)


def config(**extra: Any) -> dict[str, Any]:
    return {
        "source": {
            "dsn": {"env": "TEST_SOURCE_DSN"},
            "table": "public.items",
            "key": ["id"],
            "updated_at": "updated_at",
        },
        "destination": {"table": "public.items", "key": ["id"], "create_table": True, "batch_size": 500},
        "deletes": "hard",
        "lookback_seconds": 0,
        **extra,
    }


def run(db: str) -> dict[str, Any]:
    assert asyncio.run(run_once(db, "items")).status == "success"
    return rows(db, "SELECT * FROM syncworker.sync_runs ORDER BY id DESC LIMIT 1")[0]


def identical(source: str, db: str) -> bool:
    return rows(source, FINGERPRINT.format("public.items")) == rows(db, FINGERPRINT.format("public.items"))


def cli(db: str, source: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNCWORKER_", "PG"))}
    env.update({"PYTHONPATH": str(TESTS), "SYNCWORKER_DATABASE_URL": db, "TEST_SOURCE_DSN": source})
    return subprocess.run(
        [sys.executable, "-m", "worker", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def fill(source: str, n: int) -> None:
    execute(
        source,
        "INSERT INTO items (id, grp, body, updated_at)"
        " SELECT g, g %% 10, md5(g::text), now() FROM generate_series(1, %s) g",
        [n],
    )


def test_deletes_are_read_from_tombstones_when_the_trigger_is_installed(source: str, db: str) -> None:
    fill(source, 2000)
    add_job(db, "items", "postgres", config(), interval_seconds=60)
    installed = cli(db, source, "install-trigger", "items")
    assert installed.returncode == 0, installed.stderr
    assert "deleted keys are recorded in public.syncworker_tombstones" in installed.stdout
    first = run(db)
    assert first["records_inserted"] == 2000 and identical(source, db)
    # a copy into an empty table, with every delete since its snapshot in the tombstones,
    # counts as a key comparison
    checked = one(db, "SELECT state->>'keys_checked_at' FROM syncworker.integrations")
    assert checked is not None

    execute(source, "DELETE FROM items WHERE id % 100 = 0")
    # deleted, then inserted again under the same key: it stays
    execute(source, "DELETE FROM items WHERE id = 5; INSERT INTO items (id, grp) VALUES (5, 0)")
    # deleted inside a subtransaction that rolls back: it stays too
    execute(source, "BEGIN; SAVEPOINT a; DELETE FROM items WHERE id = 6; ROLLBACK TO a; COMMIT")
    second = run(db)
    assert identical(source, db)
    assert second["records_deleted"] == 20
    assert second["records_processed"] == 1  # the row inserted again
    # found through the tombstones alone: no key comparison ran
    assert one(db, "SELECT state->>'keys_checked_at' FROM syncworker.integrations") == checked

    # A TRUNCATE is one tombstone without a key: that run compares key buckets instead.
    execute(source, "TRUNCATE items")
    fill(source, 30)
    assert run(db)["records_deleted"] == 2000 - 20 - 30
    assert identical(source, db)


def test_without_tombstones_only_differing_key_buckets_are_read(source: str, db: str) -> None:
    fill(source, 3000)
    add_job(db, "items", "postgres", config(hard_delete_every_seconds=0), interval_seconds=60)
    run(db)
    execute(source, "DELETE FROM items WHERE id IN (10, 20, 2999)")
    # a stale row the destination has and the source never had
    execute(db, "INSERT INTO items (id, grp) VALUES (-1, 0)")
    assert run(db)["records_deleted"] == 4
    assert identical(source, db)


def test_a_cursor_the_source_cannot_have_reads_everything_once(source: str, db: str) -> None:
    fill(source, 100)
    add_job(db, "items", "postgres", config(), interval_seconds=60)
    run(db)
    execute(db, "UPDATE syncworker.integrations SET state = jsonb_set(state, '{xmin}', '\"99999999999\"')")
    execute(db, "DELETE FROM items WHERE id = 1")
    assert run(db)["records_processed"] == 100
    assert identical(source, db)


def test_a_table_read_by_ranges_of_pages_gets_every_change_once(
    source: str, db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tracking, "SPLIT_PAGES", 1)  # this small table is read in ranges too
    fill(source, 5000)
    add_job(db, "items", "postgres", config(hard_delete_every_seconds=0), interval_seconds=60)
    run(db)
    # changed rows all over the table: rewritten in their page or moved to its end, new rows
    # at its end, deleted rows
    execute(source, "UPDATE items SET body = 'changed' WHERE id % 97 = 0")
    execute(source, "UPDATE items SET body = md5(body) WHERE id % 101 = 0")
    execute(source, "INSERT INTO items (id, grp) SELECT g, 0 FROM generate_series(5001, 5100) g")
    execute(source, "DELETE FROM items WHERE id % 89 = 0")
    second = run(db)
    assert second["records_processed"] == 51 + 49 + 99  # each changed row read once (5073 is gone)
    assert second["records_deleted"] == 56
    assert identical(source, db)


def test_a_mirror_table_it_created_takes_changed_rows_in_their_own_pages(source: str, db: str) -> None:
    fill(source, 3000)
    add_job(db, "items", "postgres", config(), interval_seconds=60)
    run(db)
    pages = "SELECT array_agg((ctid::text::point)[0] ORDER BY id) FROM items WHERE id % 20 = 0"
    before = one(db, pages)
    execute(source, "UPDATE items SET body = md5(body), updated_at = now() WHERE id % 20 = 0")
    assert run(db)["records_updated"] == 150
    # the mirror left room in its pages: each changed row stays in its page (a HOT update,
    # with no new index entry), rather than moving to the end of the table
    assert one(db, pages) == before
    assert identical(source, db)


@pytest.mark.parametrize(
    "mode", ["xmin and tombstones", "xmin and key buckets", "xmin by ranges of pages", "query and lookback"]
)
def test_the_mirror_stays_exact_under_concurrent_writes(
    source: str, db: str, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if mode == "xmin by ranges of pages":
        monkeypatch.setattr(tracking, "SPLIT_PAGES", 1)
    fill(source, 5000)
    job = config(hard_delete_every_seconds=0)
    if mode == "query and lookback":
        # No xmin for a query: updated_at and a lookback longer than any transaction's skew
        # (a clock ahead would move the watermark past every other writer's rows).
        job["source"] = {**job["source"], "query": "SELECT * FROM items"}
        del job["source"]["table"]
        job["lookback_seconds"] = 4 * 3600
    add_job(db, "items", "postgres", job, interval_seconds=60)
    if mode == "xmin and tombstones":
        assert cli(db, source, "install-trigger", "items").returncode == 0
    ahead = mode != "query and lookback"
    # by xmin, any stamp at all; by updated_at, one within the lookback
    old_stamp = datetime(2001, 1, 1, tzinfo=UTC) if ahead else datetime.now(UTC) - timedelta(hours=3)
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer(seed: int) -> None:
        rnd = random.Random(seed)
        try:
            with psycopg.connect(source, autocommit=True) as conn:
                next_id = 100_000 * (seed + 1)
                while not stop.is_set():
                    roll = rnd.random()
                    ident = rnd.randint(1, 5000)
                    if roll < 0.3:
                        conn.execute(
                            "UPDATE items SET body = md5(random()::text), updated_at = now() WHERE id = %s",
                            [ident],
                        )
                    elif roll < 0.5:
                        next_id += 1
                        conn.execute("INSERT INTO items (id, grp) VALUES (%s, 1)", [next_id])
                    elif roll < 0.65:
                        conn.execute("DELETE FROM items WHERE id = %s", [ident])
                    elif roll < 0.8:
                        # a long transaction stamping an old updated_at, with a subtransaction
                        with conn.transaction():
                            conn.execute(
                                "UPDATE items SET body = 'late', updated_at = now() - interval '2 hours'"
                                " WHERE id = %s",
                                [ident],
                            )
                            with conn.transaction():
                                next_id += 1
                                conn.execute(
                                    "INSERT INTO items (id, grp, updated_at) VALUES (%s, 2, %s)",
                                    [next_id, old_stamp],
                                )
                                conn.execute("DELETE FROM items WHERE id = %s", [rnd.randint(1, 5000)])
                            time.sleep(rnd.uniform(0.05, 0.4))
                    elif ahead:
                        # a clock a day ahead
                        conn.execute(
                            "UPDATE items SET body = 'ahead', updated_at = now() + interval '1 day'"
                            " WHERE id = %s",
                            [ident],
                        )
        except BaseException as exc:  # surfaced by the test
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    try:
        for _ in range(6):
            run(db)
            time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors
    run(db)
    assert identical(source, db)
    verify = cli(db, source, "verify", "items")
    assert verify.returncode == 0 and "match" in verify.stdout, verify.stdout + verify.stderr


def test_old_tombstones_are_pruned_and_a_job_paused_past_them_compares_buckets(source: str, db: str) -> None:
    fill(source, 200)
    add_job(db, "items", "postgres", config(), interval_seconds=60)
    assert cli(db, source, "install-trigger", "items").returncode == 0
    run(db)
    cursor = one(db, "SELECT state->>'xmin' FROM syncworker.integrations")
    execute(source, "DELETE FROM items WHERE id <= 3")
    execute(source, "UPDATE syncworker_tombstones SET deleted_at = now() - interval '8 days'")
    # a later run's periodic key comparison prunes them and moves the horizon past them
    execute(db, "UPDATE syncworker.integrations SET state = state - 'keys_checked_at'")
    assert run(db)["records_deleted"] == 3
    assert one(source, "SELECT count(*) FROM syncworker_tombstones") == 0
    horizon = int(one(source, "SELECT complete_from::text FROM syncworker_tombstone_horizon"))
    assert horizon > int(cursor)
    # a run starting from a cursor older than the horizon cannot trust the tombstones
    execute(source, "DELETE FROM items WHERE id = 10")
    execute(
        db,
        "UPDATE syncworker.integrations SET state = jsonb_set(state, '{xmin}', to_jsonb(%s::text))",
        [cursor],
    )
    second = run(db)
    assert second["records_deleted"] == 1
    assert identical(source, db)
