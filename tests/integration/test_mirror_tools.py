"""`syncworker install-trigger` and `syncworker verify` for postgres jobs."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from helpers import ROOT, TESTS, add_job, create_database, drop_database, execute, one
from worker.run.once import run_once


@pytest.fixture
def source() -> Iterator[str]:
    name, url = create_database()
    try:
        execute(
            url,
            "CREATE TABLE public.orders (id int PRIMARY KEY, v text, updated_at timestamptz DEFAULT now())",
        )
        yield url
    finally:
        drop_database(name)


def cli(db: str, source: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNCWORKER_", "PG"))}
    env.update({"PYTHONPATH": str(TESTS), "SYNCWORKER_DATABASE_URL": db, "TEST_SOURCE_DSN": source})
    return subprocess.run(
        [sys.executable, "-m", "worker", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def mirror(**extra: Any) -> dict[str, Any]:
    return {
        "source": {
            "dsn": {"env": "TEST_SOURCE_DSN"},
            "table": "orders",
            "key": "id",
            "updated_at": "updated_at",
        },
        "destination": {"table": "orders_copy", "key": "id", "create_table": True},
        "realtime": True,
        **extra,
    }


def notifications_per_transaction(source: str) -> list[str]:
    with psycopg.connect(source, autocommit=True) as listener:
        listener.execute("LISTEN syncworker_changes")
        with psycopg.connect(source) as writer:
            writer.execute("INSERT INTO orders (id) VALUES (1), (2)")
            writer.execute("UPDATE orders SET v = 'x'")
            writer.execute("DELETE FROM orders WHERE id = 2")
            writer.commit()
        return [n.payload for n in listener.notifies(timeout=1.0)]


def test_install_trigger_notifies_once_per_transaction(db: str, source: str) -> None:
    add_job(db, "orders", "postgres", mirror())
    result = cli(db, source, "install-trigger", "orders")
    assert result.returncode == 0, result.stderr
    assert "installed trigger syncworker_notify_change on public.orders" in result.stdout
    assert notifications_per_transaction(source) == ["public.orders"]
    # Installing again is harmless.
    assert cli(db, source, "install-trigger", "orders").returncode == 0


def test_the_cookbook_file_installs_the_same_trigger(source: str) -> None:
    subprocess.run(
        [
            "psql",
            source,
            "-v",
            "ON_ERROR_STOP=1",
            "-q",
            "-v",
            "table=orders",
            "-f",
            str(ROOT / "sql/realtime_trigger.sql"),
        ],
        check=True,
        capture_output=True,
    )
    assert notifications_per_transaction(source) == ["public.orders"]


def test_the_cookbook_file_with_a_key_installs_the_delete_trigger(
    db: str, source: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_SOURCE_DSN", source)
    execute(source, "INSERT INTO orders (id, v) SELECT g, 'v' FROM generate_series(1, 50) g")
    script = str(ROOT / "sql/realtime_trigger.sql")
    for _ in range(2):  # installing twice is harmless
        subprocess.run(
            [
                "psql",
                source,
                "-v",
                "ON_ERROR_STOP=1",
                "-q",
                "-v",
                "table=orders",
                "-v",
                "key=id",
                "-f",
                script,
            ],
            check=True,
            capture_output=True,
        )
    add_job(db, "orders", "postgres", mirror(deletes="hard"))
    assert asyncio.run(run_once(db, "orders")).status == "success"
    checked = one(db, "SELECT state->>'keys_checked_at' FROM syncworker.integrations")
    execute(source, "DELETE FROM orders WHERE id <= 5")
    assert one(source, "SELECT count(*) FROM syncworker_tombstones WHERE relation = 'public.orders'") == 5
    assert asyncio.run(run_once(db, "orders")).status == "success"
    assert one(db, "SELECT count(*) FROM orders_copy") == 45
    # the deletes came from the tombstones: no key comparison ran
    assert one(db, "SELECT state->>'keys_checked_at' FROM syncworker.integrations") == checked


def test_install_trigger_errors_are_one_line(db: str, source: str) -> None:
    add_job(db, "ticks", "sql", {"statement": "select 1"})
    add_job(
        db,
        "ghost",
        "postgres",
        mirror(source={"dsn": {"env": "TEST_SOURCE_DSN"}, "table": "nope", "key": "id"}, realtime=False),
    )
    cases = {
        "ticks": "ticks is a sql job; this command works on postgres jobs",
        "ghost": "the source has no table public.nope",
        "missing": 'no integration named "missing"',
    }
    for name, message in cases.items():
        result = cli(db, source, "install-trigger", name)
        assert result.returncode == 1
        error = result.stderr.strip()
        assert "\n" not in error and error.startswith(f"syncworker: error: {message}; database "), error


def test_verify_reports_a_match_and_explains_a_mismatch(
    db: str, source: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_SOURCE_DSN", source)
    execute(source, "INSERT INTO orders (id, v) SELECT g, 'v' FROM generate_series(1, 500) g")
    add_job(db, "orders", "postgres", mirror())
    assert asyncio.run(run_once(db, "orders")).status == "success"
    result = cli(db, source, "verify", "orders")
    assert result.returncode == 0, result.stderr
    assert "orders: source orders: 500 rows" in result.stdout
    assert "match: same keys and updated_at values" in result.stdout

    execute(db, "DELETE FROM orders_copy WHERE id IN (7, 8)")
    execute(db, "INSERT INTO orders_copy (id) VALUES (9001)")
    execute(source, "UPDATE orders SET updated_at = updated_at + interval '1 second' WHERE id = 42")
    result = cli(db, source, "verify", "orders")
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert "orders: destination orders_copy: 499 rows" in lines[1]
    assert any(line.startswith("orders: MISMATCH in ") for line in lines)
    assert "orders: missing in the destination: 2 key(s): 7, 8" in lines
    assert "orders: not in the source (extra in the destination): 1 key(s): 9001" in lines
    assert "orders: different updated_at: 1 key(s): 42" in lines


def test_run_once_dry_run_prints_the_changes_and_writes_nothing(db: str, source: str) -> None:
    execute(source, "INSERT INTO orders (id, v) SELECT g, 'v' FROM generate_series(1, 3) g")
    add_job(db, "orders", "postgres", mirror())
    result = cli(db, source, "run-once", "orders", "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # 3 reads: the copy; the catch-up pass finds nothing written since its snapshot
    assert (
        lines[0] == "dry run of orders: would insert 3, update 0, delete 0 (3 records read, 0 failed);"
        " nothing was written"
    )
    assert lines[1] == "  keys that would be inserted (first 3): 1, 2, 3"
    assert lines[2].startswith('state after the run would be: {"phase": "incremental", "xmin": "')
    assert one(db, "SELECT to_regclass('public.orders_copy')") is None


def test_tools_read_a_job_with_an_after_success_hook_as_the_runner_does(
    db: str, source: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    hook = {"redis_invalidate": {"url": {"env": "CACHE_URL"}, "patterns": ["cache:orders:*"]}}
    add_job(db, "orders", "postgres", mirror(after_success=hook))
    result = cli(db, source, "install-trigger", "orders")
    assert result.returncode == 0, result.stderr
    assert notifications_per_transaction(source) == ["public.orders"]
    monkeypatch.setenv("TEST_SOURCE_DSN", source)
    assert asyncio.run(run_once(db, "orders", local_check=False)).status == "success"
    result = cli(db, source, "verify", "orders")
    assert result.returncode == 0, result.stderr
    assert "match: same keys and updated_at values" in result.stdout
