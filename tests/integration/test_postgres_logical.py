"""The `postgres` mirror with `"changes": "logical"`: its source table's logical replication
stream (a slot using `pgoutput`, read through the SQL interface) instead of a scan.

The sources and destinations live on a private cluster with `wal_level = logical`, started
once for the session; the control databases on the usual test server, whose `wal_level` is
`replica` (the test of a source that cannot stream uses it).  The parser of the stream's
messages and the folding of changes are pure: tested here on bytes built by hand.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from helpers import (
    ROOT,
    TESTS,
    Cluster,
    add_job,
    create_database,
    db_prefix,
    drop_database,
    execute,
    missing_server,
    one,
    private_cluster,
    rows,
    wait_for,
    workers,
)
from worker.connectors import get
from worker.connectors.base import ConfigError
from worker.connectors.postgres import logical, pgoutput
from worker.connectors.postgres.logical import LogicalMirror, Slot
from worker.connectors.postgres.pgoutput import (
    UNCHANGED,
    Batch,
    Begin,
    Commit,
    Delete,
    Insert,
    Layout,
    Relation,
    Stream,
    Truncate,
    Update,
    parse,
)
from worker.run.once import run_once

TABLE = """
CREATE TABLE public.items (
  id bigint PRIMARY KEY, grp int NOT NULL, body text, big text, deleted_at timestamptz,
  updated_at timestamptz NOT NULL DEFAULT now()
);
-- large values out of line and uncompressed: an update that leaves them alone does not carry them
ALTER TABLE public.items ALTER big SET STORAGE EXTERNAL;
"""
FINGERPRINT = (
    "SELECT count(*) AS n, md5(coalesce(string_agg(i::text, ',' ORDER BY id), '')) FROM public.items i"
)


# -- the private cluster and its databases ----------------------------------------------------


@pytest.fixture(scope="session")
def logical_server() -> Iterator[Cluster]:
    """A private cluster with wal_level = logical (the test server's is replica)."""
    reason = missing_server()
    if reason is not None:
        pytest.skip(f"no private cluster with wal_level = logical: {reason}")
    with private_cluster(
        "swtest-logical-",
        wal_level="logical",
        max_replication_slots=10,
        max_wal_senders=10,
        fsync="off",
        full_page_writes="off",
    ) as cluster:
        yield cluster


def private_database(cluster: Cluster) -> tuple[str, str]:
    name = f"{db_prefix()}{uuid.uuid4().hex[:12]}"
    execute(cluster.url(), f'CREATE DATABASE "{name}"')
    return name, cluster.url(name)


def drop_private_database(cluster: Cluster, name: str) -> None:
    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        # a database with a logical slot cannot be dropped: its slots go first
        conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = %s", [name]
        )
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def source(logical_server: Cluster, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name, url = private_database(logical_server)
    try:
        execute(url, TABLE)
        monkeypatch.setenv("TEST_SOURCE_DSN", url)
        yield url
    finally:
        drop_private_database(logical_server, name)


@pytest.fixture
def dest(logical_server: Cluster, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name, url = private_database(logical_server)
    try:
        monkeypatch.setenv("TEST_DEST_DSN", url)
        yield url
    finally:
        drop_private_database(logical_server, name)


def config(**extra: Any) -> dict[str, Any]:
    return {
        "source": {
            "dsn": {"env": "TEST_SOURCE_DSN"},
            "table": "public.items",
            "key": ["id"],
            "updated_at": "updated_at",
        },
        "destination": {
            "table": "public.items",
            "key": ["id"],
            "create_table": True,
            "batch_size": 50,
            "dsn": {"env": "TEST_DEST_DSN"},
        },
        "deletes": "hard",
        "changes": "logical",
        **extra,
    }


def run(db: str, *, status: str = "success") -> dict[str, Any]:
    assert asyncio.run(run_once(db, "items")).status == status
    return rows(db, "SELECT * FROM syncworker.sync_runs ORDER BY id DESC LIMIT 1")[0]


def identical(source: str, dest: str) -> bool:
    return rows(source, FINGERPRINT) == rows(dest, FINGERPRINT)


def fill(source: str, n: int, start: int = 1) -> None:
    execute(
        source,
        "INSERT INTO items (id, grp, body, updated_at)"
        " SELECT g, g %% 10, md5(g::text), '2024-01-01' FROM generate_series(%s::int, %s::int) g",
        [start, start + n - 1],
    )


def state(db: str) -> dict[str, Any]:
    return dict(one(db, "SELECT state FROM syncworker.integrations WHERE name = 'items'"))


def slot(source: str) -> dict[str, Any] | None:
    found = rows(
        source,
        "SELECT slot_name, confirmed_flush_lsn::text AS confirmed, wal_status FROM pg_replication_slots"
        " WHERE database = current_database()",
    )
    assert len(found) <= 1, found
    return found[0] if found else None


def publications(source: str) -> list[str]:
    return [r["pubname"] for r in rows(source, "SELECT pubname FROM pg_publication ORDER BY 1")]


def lsn(text: str) -> int:
    return pgoutput.lsn_from_text(text)


def cli(db: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNCWORKER_", "PG"))}
    env.update({"PYTHONPATH": str(TESTS), "SYNCWORKER_DATABASE_URL": db})
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


# -- the stream, end to end ---------------------------------------------------------------------


def test_the_first_run_copies_then_inserts_updates_deletes_and_a_truncate_come_from_the_stream(
    source: str, dest: str, db: str
) -> None:
    fill(source, 1000)
    add_job(db, "items", "postgres", config(), interval_seconds=60)
    first = run(db)
    assert (first["records_processed"], first["records_inserted"]) == (1000, 1000)
    assert identical(source, dest)
    saved = state(db)
    made = slot(source)
    assert (
        made is not None
        and made["slot_name"] == saved["slot"]
        and made["slot_name"].startswith("syncworker_")
    )
    assert publications(source) == [saved["slot"]]
    assert saved["changes"] == "logical" and made["confirmed"] == saved["lsn"]

    execute(source, "INSERT INTO items (id, grp) SELECT g, 0 FROM generate_series(2001, 2005) g")
    execute(source, "UPDATE items SET body = 'changed' WHERE id <= 10")
    execute(source, "DELETE FROM items WHERE id IN (20, 21, 22)")
    # several changes of one row in one transaction, and a row inserted and deleted again
    execute(
        source,
        "BEGIN; UPDATE items SET grp = 7 WHERE id = 30; UPDATE items SET grp = 8 WHERE id = 30; COMMIT",
    )
    execute(
        source,
        "BEGIN; INSERT INTO items (id, grp) VALUES (3000, 1); DELETE FROM items WHERE id = 3000; COMMIT",
    )
    # a key changed
    execute(source, "UPDATE items SET id = 4000 WHERE id = 40")
    second = run(db)
    assert identical(source, dest)
    counts = [second[f"records_{k}"] for k in ("processed", "inserted", "updated", "deleted")]
    # 5 + 10 + 3 + 2 + 2 + 1 changes; 4000 and the five new rows inserted, 40 deleted with 20-22
    assert counts == [23, 6, 11, 4]
    assert lsn(state(db)["lsn"]) > lsn(saved["lsn"])
    assert slot(source)["confirmed"] == state(db)["lsn"]  # type: ignore[index]

    assert run(db)["records_processed"] == 0  # nothing changed, nothing read

    execute(source, "BEGIN; TRUNCATE items; INSERT INTO items (id, grp) VALUES (1, 1), (2, 2); COMMIT")
    third = run(db)
    assert identical(source, dest) and one(dest, "SELECT count(*) FROM items") == 2
    assert third["records_deleted"] == 1002  # every row the destination had
    assert third["records_inserted"] == 2


def test_an_incremental_run_reads_the_changed_rows_not_the_table(source: str, dest: str, db: str) -> None:
    fill(source, 20_000)
    add_job(db, "items", "postgres", config(destination={**config()["destination"], "batch_size": 1000}))
    run(db)
    execute(source, "UPDATE items SET body = 'x' WHERE id % 100 = 0")  # 1%, one transaction
    execute(source, "DELETE FROM items WHERE id % 1000 = 1")
    changed = run(db)
    assert changed["records_processed"] == 200 + 20  # the changes, not 20,000 rows
    assert (changed["records_updated"], changed["records_deleted"]) == (200, 20)
    assert identical(source, dest)


def test_the_slot_moves_past_what_other_tables_write_so_the_source_keeps_no_wal_for_it(
    source: str, dest: str, db: str
) -> None:
    fill(source, 10)
    add_job(db, "items", "postgres", config())
    run(db)
    execute(source, "CREATE TABLE other AS SELECT g, md5(g::text) FROM generate_series(1, 20000) g")
    written = lsn(one(source, "SELECT pg_current_wal_insert_lsn()::text"))
    # and a writer that has not committed yet, whose WAL ends the flushed part mid-page
    with psycopg.connect(dest) as open_writer:
        open_writer.execute("CREATE TABLE pending AS SELECT g FROM generate_series(1, 3000) g")
        started = time.monotonic()
        assert run(db)["records_processed"] == 0
        assert time.monotonic() - started < 5
    assert lsn(slot(source)["confirmed"]) > written  # type: ignore[index]
    assert slot(source)["confirmed"] == state(db)["lsn"]  # type: ignore[index]


def test_a_destination_in_the_control_database_commits_data_and_position_together(
    source: str, db: str
) -> None:
    fill(source, 300)
    job = config()
    del job["destination"]["dsn"]
    add_job(db, "items", "postgres", job)
    run(db)
    execute(source, "UPDATE items SET body = 'y' WHERE id < 50; DELETE FROM items WHERE id > 290")
    assert run(db)["records_processed"] == 49 + 10
    assert identical(source, db)


def test_an_unchanged_toast_value_survives_an_update_of_another_column(
    source: str, dest: str, db: str
) -> None:
    # incompressible values of 20 kB, stored out of line
    big = "SELECT string_agg(md5(random()::text || g), '') FROM generate_series(1, 640) g"
    fill(source, 100)
    execute(source, f"UPDATE items SET big = ({big}) WHERE id <= 5")
    add_job(db, "items", "postgres", config())
    run(db)
    values = {r["id"]: r["big"] for r in rows(dest, "SELECT id, big FROM items WHERE id <= 5")}
    assert all(len(v) == 20_480 for v in values.values())

    # the stream does not carry `big` for these: the destination's value stays
    execute(source, "UPDATE items SET body = 'other column' WHERE id <= 3")
    # inserted with a large value and updated in the same run: the value from the insert
    execute(source, f"INSERT INTO items (id, grp, big) VALUES (500, 0, ({big}))")
    execute(source, "UPDATE items SET body = 'after the insert' WHERE id = 500")
    # the key changes and `big` does not: the row is read again from the source
    execute(source, "UPDATE items SET id = 600 WHERE id = 4")
    # a later change of the large value itself, then one of another column
    execute(source, f"UPDATE items SET big = ({big}) WHERE id = 5")
    execute(source, "UPDATE items SET grp = 99 WHERE id = 5")
    run(db)
    assert identical(source, dest)
    after = {r["id"]: r["big"] for r in rows(dest, "SELECT id, big FROM items WHERE big IS NOT NULL")}
    assert [after[i] for i in (1, 2, 3)] == [values[i] for i in (1, 2, 3)]
    assert after[600] == values[4] and after[5] != values[5] and len(after[500]) == 20_480


def test_soft_deletes_come_from_the_stream(source: str, dest: str, db: str) -> None:
    fill(source, 50)
    add_job(db, "items", "postgres", config(deletes="soft", soft_delete_column="deleted_at"))
    run(db)
    execute(source, "UPDATE items SET deleted_at = now() WHERE id IN (2, 4, 6)")
    execute(source, "DELETE FROM items WHERE id = 8")
    assert run(db)["records_deleted"] == 4
    live = "SELECT id, grp, body FROM items WHERE deleted_at IS NULL ORDER BY id"
    assert rows(source, live) == rows(dest, "SELECT id, grp, body FROM items ORDER BY id")
    execute(source, "UPDATE items SET deleted_at = NULL WHERE id = 4")  # marked live again: it returns
    assert run(db)["records_inserted"] == 1
    assert rows(source, live) == rows(dest, "SELECT id, grp, body FROM items ORDER BY id")


def test_deletes_none_keeps_what_the_source_deletes(source: str, dest: str, db: str) -> None:
    fill(source, 20)
    add_job(db, "items", "postgres", config(deletes="none"))
    run(db)
    execute(source, "DELETE FROM items WHERE id <= 5; UPDATE items SET body = 'z' WHERE id = 10")
    changed = run(db)
    assert (changed["records_deleted"], changed["records_updated"]) == (0, 1)
    assert one(dest, "SELECT count(*) FROM items") == 20


# -- crashes, a lost slot, concurrent writers ----------------------------------------------------


def test_a_crash_after_the_state_commit_and_before_the_slot_advance_applies_nothing_twice(
    source: str, dest: str, db: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fill(source, 200)
    add_job(db, "items", "postgres", config())
    run(db)
    execute(source, "UPDATE items SET body = 'once' WHERE id <= 120")  # three batches of 50
    execute(source, "INSERT INTO items (id, grp) VALUES (900, 9); DELETE FROM items WHERE id = 199")
    real_advance = Slot.advance

    async def killed(self: Slot, position: int) -> None:
        info = await self.info()
        if info is not None and info.confirmed is not None and info.confirmed < position:
            raise RuntimeError("killed before the slot moved")
        await real_advance(self, position)

    monkeypatch.setattr(Slot, "advance", killed)
    crashed = run(db, status="failed")
    assert "killed before the slot moved" in crashed["error"]
    # the destination and the state hold every change; the slot still hands them out
    assert identical(source, dest)
    assert lsn(slot(source)["confirmed"]) < lsn(state(db)["lsn"])  # type: ignore[index]

    # A dry run reads the slot from where it is: everything it hands out is skipped.
    caplog.set_level(logging.INFO, logger="syncworker.connector.postgres")
    preview = asyncio.run(run_once(db, "items", dry_run=True))
    assert preview.result is not None
    assert (preview.result.inserted, preview.result.updated, preview.result.deleted) == (0, 0, 0)
    assert "(122 skipped: applied before)" in caplog.text

    monkeypatch.setattr(Slot, "advance", real_advance)
    again = run(db)
    assert [again[f"records_{k}"] for k in ("processed", "inserted", "updated", "deleted")] == [0, 0, 0, 0]
    assert slot(source)["confirmed"] == state(db)["lsn"]  # type: ignore[index]
    execute(source, "UPDATE items SET body = 'twice' WHERE id = 1")
    assert run(db)["records_processed"] == 1
    assert identical(source, dest)


# A real `syncworker run-once` that kills itself (SIGKILL) where the slot would move forward:
# after the destination's and the state's commits.
KILLED_BEFORE_THE_ADVANCE = """
import os, signal, sys
from worker.connectors.postgres import logical
real = logical.Slot.advance
async def advance(self, position):
    info = await self.info()
    if info is not None and info.confirmed is not None and info.confirmed < position:
        os.kill(os.getpid(), signal.SIGKILL)
    await real(self, position)
logical.Slot.advance = advance
from worker.cli.main import main
sys.exit(main(["run-once", "items"]))
"""


def test_a_worker_killed_before_the_slot_advance_loses_nothing_and_applies_nothing_twice(
    source: str, dest: str, db: str, tmp_path: Path
) -> None:
    fill(source, 300)
    add_job(db, "items", "postgres", config())
    run(db)
    execute(source, "UPDATE items SET body = 'killed' WHERE id <= 75; DELETE FROM items WHERE id > 290")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNCWORKER_", "PG"))}
    env.update(
        {"PYTHONPATH": str(TESTS), "SYNCWORKER_DATABASE_URL": db, "SYNCWORKER_ALLOW_SUPERUSER_JOBS": "1"}
    )
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_BEFORE_THE_ADVANCE], env=env, cwd=ROOT, capture_output=True, timeout=120
    )
    assert killed.returncode == -9, killed.stderr
    assert identical(source, dest)
    assert lsn(slot(source)["confirmed"]) < lsn(state(db)["lsn"])  # type: ignore[index]
    # A worker rescues the killed run and runs the job again.
    with workers(db, tmp_path, 1):
        wait_for(lambda: successes(db) >= 2, timeout=60, what="the rerun")
    statuses = [r["status"] for r in rows(db, "SELECT status FROM syncworker.sync_runs ORDER BY id")]
    assert statuses == ["success", "abandoned", "success"]
    again = rows(db, "SELECT * FROM syncworker.sync_runs ORDER BY id DESC LIMIT 1")[0]
    assert [again[f"records_{k}"] for k in ("processed", "inserted", "updated", "deleted")] == [0, 0, 0, 0]
    assert slot(source)["confirmed"] == state(db)["lsn"]  # type: ignore[index]
    assert identical(source, dest)


def successes(db: str) -> int:
    return int(one(db, "SELECT count(*) FROM syncworker.sync_runs WHERE status = 'success'"))


def test_a_crash_after_the_destination_commit_and_before_the_state_replays_harmlessly(
    source: str, dest: str, db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(source, 200)
    add_job(db, "items", "postgres", config())
    run(db)
    before = state(db)
    execute(source, "UPDATE items SET body = 'once' WHERE id <= 60; DELETE FROM items WHERE id > 190")

    async def killed(self: LogicalMirror, _state: dict[str, Any]) -> None:
        await self.commit_data()  # the destination's commit, and no more
        raise RuntimeError("killed before the state was saved")

    with monkeypatch.context() as patch:
        patch.setattr(LogicalMirror, "checkpoint", killed)
        run(db, status="failed")
    assert identical(source, dest) and state(db) == before
    # read again from the saved position: the destination has it all already
    replay = run(db)
    assert replay["records_processed"] == 70
    assert [replay[f"records_{k}"] for k in ("inserted", "updated", "deleted")] == [0, 0, 0]
    assert identical(source, dest)


def test_a_copy_cut_short_resumes_with_the_same_slot(
    source: str, dest: str, db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(source, 1000)
    add_job(db, "items", "postgres", config())
    monkeypatch.setattr("worker.connectors.postgres.mirror.COPY_CHECKPOINT_SECONDS", 0)
    real = LogicalMirror.checkpoint_copy
    calls = 0

    async def cut(self: LogicalMirror, copied: dict[str, Any]) -> None:
        nonlocal calls
        calls += 1
        await real(self, copied)
        if calls == 3:
            execute(source, "UPDATE items SET body = 'during the copy' WHERE id IN (1, 999)")
            execute(source, "DELETE FROM items WHERE id = 2")
            raise RuntimeError("killed during the copy")

    with monkeypatch.context() as patch:
        patch.setattr(LogicalMirror, "checkpoint_copy", cut)
        run(db, status="failed")
    cut_short = state(db)
    assert cut_short["phase"] == "full" and cut_short["lsn"] == slot(source)["confirmed"]  # type: ignore[index]
    resumed = run(db)
    assert identical(source, dest)
    assert resumed["records_processed"] < 1000
    assert set(state(db)) == {"changes", "slot", "lsn"}


def test_a_dropped_slot_falls_back_to_a_full_copy_and_stays_exact(
    source: str, dest: str, db: str, caplog: pytest.LogCaptureFixture
) -> None:
    fill(source, 500)
    add_job(db, "items", "postgres", config())
    run(db)
    old = state(db)
    execute(source, f"SELECT pg_drop_replication_slot('{old['slot']}')")
    # what happens while nobody follows: lost with the slot
    execute(source, "DELETE FROM items WHERE id % 10 = 0; UPDATE items SET body = 'unseen' WHERE id % 7 = 0")
    execute(dest, "INSERT INTO items (id, grp) VALUES (-1, 0)")  # and a row the source never had
    caplog.set_level(logging.WARNING, logger="syncworker.connector.postgres")
    again = run(db)
    assert "cannot go on from the job's position (it does not exist)" in caplog.text
    assert again["records_processed"] == 450 and again["records_deleted"] == 51
    assert identical(source, dest)
    assert slot(source)["slot_name"] == old["slot"]  # type: ignore[index]
    execute(source, "UPDATE items SET body = 'seen' WHERE id = 1")
    assert run(db)["records_processed"] == 1
    assert identical(source, dest)


def test_a_slot_invalidated_by_max_slot_wal_keep_size_falls_back_to_a_full_copy(
    logical_server: Cluster, source: str, dest: str, db: str, caplog: pytest.LogCaptureFixture
) -> None:
    fill(source, 300)
    add_job(db, "items", "postgres", config())
    run(db)
    execute(source, "DELETE FROM items WHERE id <= 100")
    admin = logical_server.url()
    execute(admin, "ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
    execute(admin, "SELECT pg_reload_conf()")
    try:
        execute(source, "CREATE TABLE filler AS SELECT repeat('x', 1000) AS x FROM generate_series(1, 40000)")
        for _ in range(2):
            execute(source, "SELECT pg_switch_wal(); INSERT INTO filler VALUES ('y')")
        execute(source, "CHECKPOINT")
        assert slot(source)["wal_status"] == "lost"  # type: ignore[index]
    finally:
        execute(admin, "ALTER SYSTEM RESET max_slot_wal_keep_size")
        execute(admin, "SELECT pg_reload_conf()")
    caplog.set_level(logging.WARNING, logger="syncworker.connector.postgres")
    again = run(db)
    assert "it was invalidated" in caplog.text
    assert again["records_deleted"] == 100
    assert identical(source, dest) and slot(source)["wal_status"] != "lost"  # type: ignore[index]


def test_the_mirror_stays_exact_under_concurrent_writes_and_verify_agrees(
    source: str, dest: str, db: str
) -> None:
    fill(source, 5000)
    execute(source, "UPDATE items SET big = repeat(md5(id::text), 100) WHERE id % 50 = 0")
    add_job(db, "items", "postgres", config(destination={**config()["destination"], "batch_size": 200}))
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
                    if roll < 0.35:
                        conn.execute("UPDATE items SET body = md5(random()::text) WHERE id = %s", [ident])
                    elif roll < 0.55:
                        next_id += 1
                        conn.execute("INSERT INTO items (id, grp) VALUES (%s, 1)", [next_id])
                    elif roll < 0.7:
                        conn.execute("DELETE FROM items WHERE id = %s", [ident])
                    elif roll < 0.8:
                        conn.execute(
                            "UPDATE items SET id = %s WHERE id = %s", [next_id + 50_000, rnd.randint(1, 5000)]
                        )
                        next_id += 1
                    else:  # a longer transaction with a subtransaction that rolls back
                        with conn.transaction():
                            conn.execute(
                                "UPDATE items SET grp = grp + 1 WHERE id BETWEEN %s AND %s",
                                [ident, ident + 20],
                            )
                            try:
                                with conn.transaction():
                                    next_id += 1
                                    conn.execute("INSERT INTO items (id, grp) VALUES (%s, 3)", [next_id])
                                    raise _RollBack
                            except _RollBack:
                                pass
                            time.sleep(rnd.uniform(0.02, 0.2))
        except BaseException as exc:  # surfaced by the test
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    try:
        for _ in range(5):  # the first copies while they write
            run(db)
            time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors
    run(db)
    assert identical(source, dest)
    verify = cli(db, "verify", "items")
    assert verify.returncode == 0 and "match" in verify.stdout, verify.stdout + verify.stderr


class _RollBack(Exception):
    pass


# -- what the source must allow ---------------------------------------------------------------


def test_a_source_with_wal_level_replica_fails_clearly_and_loses_nothing(
    db: str, dest: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    name, replica = create_database()  # the test server: wal_level = replica
    try:
        assert one(replica, "SHOW wal_level") == "replica"
        monkeypatch.setenv("TEST_SOURCE_DSN", replica)
        execute(replica, TABLE)
        fill(replica, 100)
        job = config()
        del job["changes"]
        add_job(db, "items", "postgres", job, interval_seconds=60)
        run(db)
        before = state(db)
        execute(db, 'UPDATE syncworker.integrations SET config = config || \'{"changes": "logical"}\'')
        execute(replica, "UPDATE items SET body = 'kept' WHERE id <= 3")
        failed = run(db, status="failed")
        assert failed["error_type"] == "config_invalid"
        assert "wal_level = logical on the source server (it is replica)" in failed["error"]
        assert "ALTER SYSTEM SET wal_level = logical" in failed["error"]
        slots = "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'syncworker%'"
        assert state(db) == before and one(replica, slots) == 0
        disabled = rows(db, "SELECT enabled, disabled_reason FROM syncworker.integrations")[0]
        assert disabled["enabled"] is False and "wal_level" in disabled["disabled_reason"]
        # back to the default: it goes on from where it was
        execute(db, "UPDATE syncworker.integrations SET config = config - 'changes', enabled = true")
        assert run(db)["records_processed"] == 3
        assert identical(replica, dest)
    finally:
        drop_database(name)


def test_a_role_without_replication_or_ownership_is_told_what_to_run(
    logical_server: Cluster, source: str, dest: str, db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    role = f"{db_prefix()}role_{uuid.uuid4().hex[:8]}"
    admin = logical_server.url()
    execute(admin, f"CREATE ROLE {role} LOGIN")
    try:
        execute(source, f"GRANT SELECT ON items TO {role}")
        monkeypatch.setenv("TEST_SOURCE_DSN", source.replace("postgres@", f"{role}@"))
        fill(source, 10)
        add_job(db, "items", "postgres", config())
        failed = run(db, status="failed")
        assert failed["error_type"] == "config_invalid"
        assert (
            f'a source role with REPLICATION (or a superuser): run ALTER ROLE "{role}" REPLICATION;'
            in failed["error"]
        )
        assert one(dest, "SELECT to_regclass('public.items')") is None  # nothing written

        execute(admin, f"ALTER ROLE {role} REPLICATION")
        failed = run(db, status="failed")
        message = failed["error"]
        assert f"which the role {role} cannot create" in message
        statement = message[message.index("run CREATE PUBLICATION") + len("run ") :]
        assert statement.endswith(";")
        execute(source, statement)  # as the table's owner, what the message says

        execute(db, "UPDATE syncworker.integrations SET enabled = true")
        assert run(db)["records_inserted"] == 10
        execute(source, "UPDATE items SET body = 'by the role' WHERE id = 1")
        assert run(db)["records_updated"] == 1
        assert identical(source, dest)
    finally:
        execute(source, f"DROP OWNED BY {role}")
        execute(admin, f"DROP ROLE {role}")


def test_a_table_without_a_replica_identity_is_refused_before_anything_is_created(
    source: str, dest: str, db: str
) -> None:
    execute(source, "CREATE TABLE loose (id bigint NOT NULL, v text)")
    job = config()
    job["source"]["table"] = "public.loose"
    del job["source"]["updated_at"]
    job["destination"]["table"] = "public.loose"
    add_job(db, "items", "postgres", job)
    failed = run(db, status="failed")
    assert "REPLICA IDENTITY FULL" in failed["error"] and failed["error_type"] == "config_invalid"
    assert publications(source) == [] and slot(source) is None
    # the source's application can still update and delete (no publication without an identity)
    execute(source, "INSERT INTO loose VALUES (1, 'a'); UPDATE loose SET v = 'b'; DELETE FROM loose")


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"changes": "stream"}, "changes", 'expected "auto"'),
        ({"changes": 1}, "changes", ""),
        (
            {"changes": "logical", "source": {"dsn": {"env": "X"}, "query": "SELECT 1", "key": ["id"]}},
            "changes",
            "source.table",
        ),
        ({"changes": "logical", "lookback_seconds": 60}, "lookback_seconds", "does not apply"),
        (
            {"changes": "logical", "hard_delete_every_seconds": 60},
            "hard_delete_every_seconds",
            "does not apply",
        ),
        ({"change": "logical"}, "change", ""),
    ],
)
def test_config_errors_name_the_field(change: dict[str, Any], field: str, words: str) -> None:
    job = config()
    job.update(change)
    with pytest.raises(ConfigError) as info:
        get("postgres").validate(job)
    assert info.value.field == field and words in str(info.value)


def test_the_default_is_auto_and_logical_parses() -> None:
    job = config()
    del job["changes"]
    assert get("postgres").validate(job).changes == "auto"
    assert get("postgres").validate(config()).logical


# -- operator commands ---------------------------------------------------------------------------


def test_drop_slot_drops_the_slot_and_the_publication(source: str, dest: str, db: str) -> None:
    fill(source, 10)
    add_job(db, "items", "postgres", config())
    run(db)
    made = state(db)["slot"]
    assert slot(source) is not None and publications(source) == [made]
    done = cli(db, "drop-slot", "items")
    assert done.returncode == 0, done.stderr
    assert (
        f"items: dropped the replication slot {made} and the publication {made} on the source" in done.stdout
    )
    assert 'still has "changes": "logical"' in done.stdout
    assert slot(source) is None and publications(source) == []
    again = cli(db, "drop-slot", "items")
    assert again.returncode == 0 and "nothing to drop" in again.stdout


def test_dry_run_creates_nothing_on_the_source(source: str, dest: str, db: str) -> None:
    fill(source, 10)
    add_job(db, "items", "postgres", config())
    preview = asyncio.run(run_once(db, "items", dry_run=True))
    assert preview.result is not None and preview.result.inserted == 10
    assert slot(source) is None and publications(source) == [] and state(db) == {}


# -- the parser and the folding of changes (pure) -------------------------------------------------


def _string(text: str) -> bytes:
    return text.encode() + b"\0"


def _tuple(*values: object) -> bytes:
    out = struct.pack(">h", len(values))
    for v in values:
        if v is None:
            out += b"n"
        elif v is UNCHANGED:
            out += b"u"
        else:
            data = str(v).encode()
            out += b"t" + struct.pack(">i", len(data)) + data
    return out


RELATION = (
    b"R"
    + struct.pack(">I", 16384)
    + _string("public")
    + _string("items")
    + b"d"
    + struct.pack(">h", 3)
    + b"\x01" + _string("id") + struct.pack(">Ii", 20, -1)
    + b"\x00" + _string("body") + struct.pack(">Ii", 25, -1)
    + b"\x00" + _string("big") + struct.pack(">Ii", 25, -1)
)  # fmt: skip


def test_every_message_kind_parses() -> None:
    assert parse(b"B" + struct.pack(">QqI", 0x1_0000_0010, 5, 731)) == Begin(0x1_0000_0010, 5, 731)
    assert parse(b"C" + struct.pack(">bQQq", 0, 16, 48, 5)) == Commit(0, 16, 48, 5)
    assert parse(b"O" + struct.pack(">Q", 9) + _string("upstream")) == pgoutput.Origin(9, "upstream")
    relation = parse(RELATION)
    assert isinstance(relation, Relation)
    assert [(c.name, c.type_oid, c.key) for c in relation.columns] == [
        ("id", 20, True),
        ("body", 25, False),
        ("big", 25, False),
    ]
    assert parse(b"Y" + struct.pack(">I", 77) + _string("public") + _string("mood")) == pgoutput.Type(
        77, "public", "mood"
    )
    rel = struct.pack(">I", 16384)
    assert parse(b"I" + rel + b"N" + _tuple("1", "é\ttab", None)) == Insert(16384, ("1", "é\ttab", None))
    assert parse(b"U" + rel + b"N" + _tuple("1", "b", UNCHANGED)) == Update(16384, ("1", "b", UNCHANGED))
    assert parse(b"U" + rel + b"K" + _tuple("1", None, None) + b"N" + _tuple("2", "b", UNCHANGED)) == Update(
        16384, ("2", "b", UNCHANGED), ("1", None, None), "K"
    )
    assert parse(b"D" + rel + b"O" + _tuple("1", "b", "c")) == Delete(16384, ("1", "b", "c"), "O")
    assert parse(b"T" + struct.pack(">ib", 2, 1) + struct.pack(">II", 1, 2)) == Truncate((1, 2), True, False)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"Z",
        b"B\x00",
        b"I" + struct.pack(">I", 1) + b"X",
        b"I" + struct.pack(">I", 1) + b"N" + struct.pack(">h", 1) + b"b",
        RELATION + b"?",
    ],
)
def test_what_the_parser_does_not_know_is_a_protocol_error(data: bytes) -> None:
    with pytest.raises(pgoutput.ProtocolError):
        parse(data)


def test_lsn_text_round_trips() -> None:
    assert pgoutput.lsn_from_text("16/B374D848") == (0x16 << 32) | 0xB374D848
    assert pgoutput.lsn_to_text((0x16 << 32) | 0xB374D848) == "16/B374D848"
    assert pgoutput.lsn_to_text(0) == "0/0"


def _layout(soft: bool = False) -> Layout:
    relation = parse(RELATION)
    assert isinstance(relation, Relation)
    if soft:
        return Layout.of(relation, ["id", "body"], ["id"], "big")
    return Layout.of(relation, ["id", "body", "big"], ["id"], None)


def test_a_batch_keeps_each_keys_last_change() -> None:
    layout, batch = _layout(), Batch()
    batch.insert(layout, ("1", "a", "A"))
    batch.update(layout, ("1", "b", UNCHANGED))  # the value from the insert before it
    batch.insert(layout, ("2", "x", None))
    batch.delete(layout, ("2", None, None))
    batch.update(layout, ("3", "c", UNCHANGED))  # the destination's value, when applied
    assert batch.ops[("1",)].values == ["1", "b", "A"] and not batch.ops[("1",)].unchanged
    assert batch.ops[("2",)].delete and batch.ops[("2",)].deleted == "t"
    assert batch.ops[("3",)].unchanged == {2}
    assert batch.changes == 5 and len(batch) == 3
    batch.truncated()
    batch.insert(layout, ("4", "d", None))
    assert batch.truncate and list(batch.ops) == [("4",)]


def test_a_changed_key_deletes_the_old_one_and_rereads_values_it_kept() -> None:
    layout, batch = _layout(), Batch()
    batch.update(layout, ("9", "b", "B"), old=("8", None, None))
    assert batch.ops[("8",)].delete and batch.ops[("9",)].values == ["9", "b", "B"]
    batch.update(layout, ("11", "b", UNCHANGED), old=("10", None, None))
    assert batch.ops[("10",)].delete and ("11",) in batch.refetch and ("11",) not in batch.ops
    batch.delete(layout, ("11", None, None))
    assert not batch.refetch and batch.ops[("11",)].delete
    kept = Batch(deletes=False)
    kept.update(layout, ("9", "b", "B"), old=("8", None, None))
    kept.delete(layout, ("9", None, None))
    kept.truncated()
    assert list(kept.ops) == [("9",)] and not kept.truncate and kept.changes == 2


def test_the_soft_delete_flag_comes_from_its_column() -> None:
    layout, batch = _layout(soft=True), Batch()
    batch.insert(layout, ("1", "a", "2024-01-01 00:00:00+00"))
    batch.insert(layout, ("2", "a", None))
    batch.insert(layout, ("3", "a", "f"))
    batch.update(layout, ("4", "a", UNCHANGED))
    assert [batch.ops[(k,)].deleted for k in "1234"] == ["t", "f", "f", None]


def test_the_stream_skips_what_was_applied_before_and_tracks_its_position() -> None:
    stream = Stream(("public", "items"), ("id", "body", "big"), ("id",), None, saved=100)
    batch = Batch()
    relation = parse(RELATION)
    for message in (
        Begin(60, 0, 1),  # committed before the saved position: applied already
        relation,
        Insert(16384, ("1", "a", None)),
        Commit(0, 60, 100, 0),
        Begin(100, 0, 2),
        Insert(16384, ("2", "b", None)),
        Insert(99, ("3", "other table", None)),
    ):
        stream.feed(message, batch)
    assert list(batch.ops) == [("2",)] and stream.skipped == 1
    assert stream.position == 100  # the transaction under way is not done yet
    stream.feed(Commit(0, 100, 140, 0), batch)
    assert stream.position == 140
    stream.feed(Begin(150, 0, 3), batch)
    stream.feed(Truncate((16384,), False, False), batch)
    assert batch.truncate and not batch.ops


def test_a_column_the_stream_lacks_is_named() -> None:
    relation = parse(RELATION)
    assert isinstance(relation, Relation)
    with pytest.raises(pgoutput.ProtocolError, match="has no column updated_at"):
        Layout.of(relation, ["id", "updated_at"], ["id"], None)


def test_the_slot_name_is_the_jobs_id_and_the_control_databases_tag() -> None:
    assert logical.slot_name(42, "0123456789abcdef") == "syncworker_42_01234567"
