"""The `redis` connector: sorted sets and hashes into a table, and the cache-invalidation hook."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from helpers import REDIS_URL, ROOT, TESTS, add_job, create_database, drop_database, one, rows
from worker.connectors import get
from worker.connectors.base import ConfigError
from worker.run.once import run_once


@pytest.fixture
def r(redis_prefix: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[redis.Redis]:
    monkeypatch.setenv("TEST_REDIS_URL", REDIS_URL)
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    yield client
    client.close()


def leaderboards(prefix: str, **extra: Any) -> dict[str, Any]:
    return {
        "url": {"env": "TEST_REDIS_URL"},
        "source": {"type": "zset", "columns": {n: f"{prefix}lb:{n}" for n in ("daily", "weekly", "monthly")}},
        "key_column": "player_id",
        "destination": {
            "table": "public.leaderboard",
            "key": ["player_id"],
            "create_table": True,
            "batch_size": 500,
        },
        **extra,
    }


def run(db: str, name: str = "lb") -> str | None:
    return asyncio.run(run_once(db, name)).status


def last_run(db: str) -> dict[str, Any]:
    return rows(db, "SELECT * FROM syncworker.sync_runs ORDER BY id DESC LIMIT 1")[0]


def board(db: str) -> dict[str, tuple[Any, ...]]:
    found = rows(db, "SELECT player_id, daily, weekly, monthly FROM leaderboard")
    return {x["player_id"]: (x["daily"], x["weekly"], x["monthly"]) for x in found}


def test_sorted_sets_join_into_columns_and_follow_changes(db: str, r: redis.Redis, redis_prefix: str) -> None:
    p = redis_prefix
    r.zadd(f"{p}lb:daily", {f"p{i}": i for i in range(3000)})
    r.zadd(f"{p}lb:weekly", {f"p{i}": 10 * i for i in range(0, 3000, 2)})
    r.zadd(f"{p}lb:monthly", {"latecomer": 1.5})
    add_job(db, "lb", "redis", leaderboards(p), interval_seconds=3600)
    assert run(db) == "success"
    got = board(db)
    assert len(got) == 3001
    assert got["p2"] == (2.0, 20.0, None) and got["p3"] == (3.0, None, None)
    assert got["latecomer"] == (None, None, 1.5)
    assert last_run(db)["records_inserted"] == 3001

    r.zadd(f"{p}lb:daily", {"p1": 100, "newbie": 7})  # one changed, one new
    r.zrem(f"{p}lb:daily", "p3")  # p3 now in no set: deleted
    r.delete(f"{p}lb:monthly")
    assert run(db) == "success"
    got = board(db)
    assert got["p1"] == (100.0, None, None) and got["newbie"] == (7.0, None, None)
    assert "p3" not in got and "latecomer" not in got
    run_row = last_run(db)
    assert (run_row["records_inserted"], run_row["records_updated"], run_row["records_deleted"]) == (1, 1, 2)
    assert run_row["records_processed"] == 3000


def test_sets_by_pattern_and_hashes(db: str, r: redis.Redis, redis_prefix: str) -> None:
    p = redis_prefix
    r.zadd(f"{p}game:a", {"x": 1, "y": 2})
    r.zadd(f"{p}game:b", {"x": 3})
    r.set(f"{p}game:not-a-set", "skipped")
    add_job(
        db,
        "scores",
        "redis",
        {
            "url": {"env": "TEST_REDIS_URL"},
            "source": {"type": "zset", "pattern": f"{p}game:*", "set_column": "game"},
            "destination": {"table": "scores", "key": ["game", "member"], "create_table": True},
        },
    )
    assert run(db, "scores") == "success"
    assert rows(db, "SELECT game, member, score FROM scores ORDER BY game, member") == [
        {"game": f"{p}game:a", "member": "x", "score": 1.0},
        {"game": f"{p}game:a", "member": "y", "score": 2.0},
        {"game": f"{p}game:b", "member": "x", "score": 3.0},
    ]

    for i in range(1500):
        r.hset(f"{p}user:{i}", mapping={"name": f"u{i}", "plan": "pro" if i % 2 else "free", "junk": "x"})
    add_job(
        db,
        "users",
        "redis",
        {
            "url": {"env": "TEST_REDIS_URL"},
            "source": {
                "type": "hash",
                "pattern": f"{p}user:*",
                "fields": {"name": "name", "plan": "plan", "tier": "tier"},
            },
            "key_column": "user_id",
            "destination": {"table": "users", "key": "user_id", "create_table": True},
        },
    )
    assert run(db, "users") == "success"
    assert one(db, "SELECT count(*) FROM users") == 1500
    assert rows(db, "SELECT user_id, name, plan, tier FROM users WHERE user_id = '7'") == [
        {"user_id": "7", "name": "u7", "plan": "pro", "tier": None}
    ]


def test_dry_run_writes_nothing(db: str, r: redis.Redis, redis_prefix: str) -> None:
    r.zadd(f"{redis_prefix}lb:daily", {"a": 1, "b": 2})
    add_job(db, "lb", "redis", leaderboards(redis_prefix))
    outcome = asyncio.run(run_once(db, "lb", dry_run=True))
    assert outcome.result is not None and outcome.result.inserted == 2
    assert outcome.result.preview is not None and sorted(outcome.result.preview["insert"]) == ["a", "b"]
    assert one(db, "SELECT to_regclass('public.leaderboard')") is None


def test_another_database_as_destination(
    db: str, r: redis.Redis, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    name, other = create_database()
    try:
        monkeypatch.setenv("TEST_DEST_DSN", other)
        r.zadd(f"{redis_prefix}lb:weekly", {"a": 1})
        config = leaderboards(redis_prefix)
        config["destination"]["dsn"] = {"env": "TEST_DEST_DSN"}
        add_job(db, "lb", "redis", config)
        assert run(db) == "success"
        assert one(other, "SELECT weekly FROM leaderboard WHERE player_id = 'a'") == 1.0
    finally:
        drop_database(name)


def test_source_problems_fail_the_run_clearly(
    db: str, r: redis.Redis, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    r.set(f"{redis_prefix}lb:daily", "oops")
    add_job(db, "lb", "redis", leaderboards(redis_prefix))
    assert run(db) == "failed"
    run_row = last_run(db)
    assert run_row["error_type"] == "source_invalid"
    assert f'redis key "{redis_prefix}lb:daily" is a string, not a zset' in run_row["error"]

    monkeypatch.setenv("TEST_REDIS_URL", "redis://:sekrit-pass@127.0.0.1:1/0")
    assert run(db) == "failed"
    run_row = last_run(db)
    assert run_row["error_type"] == "connection"
    assert "sekrit-pass" not in str(rows(db, "SELECT * FROM syncworker.sync_errors"))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"url": "redis://localhost"}, "url"),
        ({"source": {"type": "list"}}, "source.type"),
        ({"source": {"type": "zset", "columns": {}}}, "source.columns"),
        ({"source": {"type": "zset", "columns": {"daily": ""}}}, "source.columns.daily"),
        ({"source": {"type": "zset", "columns": {"bad name": "k"}}}, "source.columns"),
        ({"source": {"type": "zset"}}, "source.pattern"),
        ({"source": {"type": "hash", "pattern": "u:*"}}, "source.fields"),
        ({"source": {"type": "zset", "columns": {"a": "k"}, "pattern": "x"}}, "source.pattern"),
        ({"key_column": "daily"}, "key_column"),
        ({"destination": {"table": "t", "key": "nope"}}, "destination.key"),
    ],
)
def test_config_errors_name_the_field(change: dict[str, Any], field: str) -> None:
    config = {**leaderboards("p:"), **change}
    with pytest.raises(ConfigError) as info:
        get("redis").validate(config)
    assert info.value.field == field


# -- the post-success hook ------------------------------------------------------------------


def cache_hook(prefix: str, url: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "redis_invalidate": {"url": url or {"env": "TEST_REDIS_URL"}, "patterns": [f"{prefix}cache:orders:*"]}
    }


def test_invalidation_runs_after_the_commit_and_removes_only_matching_keys(
    db: str, r: redis.Redis, redis_prefix: str
) -> None:
    p = redis_prefix
    for i in range(2500):
        r.set(f"{p}cache:orders:{i}", "stale")
    r.set(f"{p}cache:users:1", "keep")
    add_job(db, "refresh", "sql", {"statement": "CREATE TABLE done (x int)", "after_success": cache_hook(p)})
    assert run(db, "refresh") == "success"
    assert list(r.scan_iter(match=f"{p}cache:orders:*")) == []
    assert r.get(f"{p}cache:users:1") == "keep"
    assert one(db, "SELECT count(*) FROM syncworker.sync_errors") == 0


def test_a_failing_hook_is_recorded_and_the_run_stays_a_success(
    db: str, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CACHE_URL", "redis://:cache-secret@127.0.0.1:1/0")
    add_job(
        db,
        "refresh",
        "sql",
        {"statement": "SELECT 1", "after_success": cache_hook(redis_prefix, {"env": "CACHE_URL"})},
    )
    assert run(db, "refresh") == "success"
    errors = rows(db, "SELECT error_type, message, run_id FROM syncworker.sync_errors")
    assert len(errors) == 1 and errors[0]["error_type"] == "hook_failed" and errors[0]["run_id"] == 1
    assert "cache-secret" not in errors[0]["message"]
    assert one(db, "SELECT last_status FROM syncworker.integrations") == "success"


def test_a_failed_run_does_not_invalidate(db: str, r: redis.Redis, redis_prefix: str) -> None:
    r.set(f"{redis_prefix}cache:orders:1", "still valid")
    add_job(db, "refresh", "sql", {"statement": "SELECT 1/0", "after_success": cache_hook(redis_prefix)})
    assert run(db, "refresh") == "failed"
    assert r.get(f"{redis_prefix}cache:orders:1") == "still valid"


def test_an_invalid_hook_fails_the_run_and_check_lists_it(db: str) -> None:
    add_job(
        db,
        "refresh",
        "sql",
        {
            "statement": "SELECT 1",
            "after_success": {"redis_invalidate": {"url": {"env": "X"}, "patterns": ["*"]}},
        },
    )
    assert run(db, "refresh") == "failed"
    run_row = last_run(db)
    assert run_row["error_type"] == "config_invalid"
    assert 'after_success.redis_invalidate.patterns: a pattern of only "*"' in run_row["error"]
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCWORKER_")}
    env.update({"SYNCWORKER_DATABASE_URL": db, "PYTHONPATH": str(TESTS)})
    check = subprocess.run(
        [sys.executable, "-m", "worker", "check"], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert check.returncode == 1 and "after_success.redis_invalidate.patterns" in check.stdout
