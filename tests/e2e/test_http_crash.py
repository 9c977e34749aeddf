"""`http` syncs under real workers: SIGKILL mid-sync loses nothing; the rate limit holds across replicas."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import WorkerProcess, add_job, one, rows, wait_for, workers
from httpapi import Api, make_records

pytestmark = pytest.mark.e2e

COLUMNS = {"id": "bigint", "name": "text", "score": "numeric", "updated_at": "timestamptz", "tags": "jsonb"}


@pytest.fixture
def api() -> Iterator[Api]:
    server = Api(delay=0.01)
    server.set_records(make_records(30_000))
    yield server
    server.close()


def config(api: Api) -> dict[str, Any]:
    return {
        "url": api.url + "/page",
        "records_path": "data",
        "pagination": {"type": "page", "size_param": "per_page", "size": 100, "total_path": "total"},
        "incremental": {"cursor_field": "updated_at", "param": "updated_since", "lookback": 5},
        "destination": {"table": "public.items", "key": ["id"], "create_table": True, "columns": COLUMNS},
    }


def destination(db: str) -> list[tuple[Any, ...]]:
    found = rows(db, "SELECT id, name, score::float8 AS score, tags FROM items ORDER BY id")
    return [(r["id"], r["name"], r["score"], r["tags"]) for r in found]


def source(api: Api) -> list[tuple[Any, ...]]:
    return [(r["id"], r["name"], r["score"], r["tags"]) for r in sorted(api.records, key=lambda r: r["id"])]


def test_sigkill_mid_sync_then_rerun_gives_exact_data_and_cursor(db: str, api: Api, tmp_path: Path) -> None:
    add_job(db, "items", "http", config(api), interval_seconds=3600)
    first = WorkerProcess(db, tmp_path / "first.log")
    try:
        wait_for(lambda: len(api.requests) >= 60, timeout=60, what="the sync to be well under way")
        first.kill()
    finally:
        first.stop()
    assert len(api.requests) < 300, "the kill should land in the middle of the sync"
    # The killed run committed nothing: no half-loaded table, no cursor ahead of the data.
    if one(db, "SELECT to_regclass('public.items')") is not None:
        assert one(db, "SELECT count(*) FROM items") == 0
    assert one(db, "SELECT state FROM syncworker.integrations") == {}

    # The API changes before the rerun: an update and a new record at the newest time.
    newest = api.records[-1]["updated_at"]
    api.upsert({**api.records[0], "name": "changed", "updated_at": newest})
    api.upsert({"id": 99_999, "name": "late", "score": 1.0, "updated_at": newest, "tags": []})

    second = WorkerProcess(db, tmp_path / "second.log")
    try:
        wait_for(
            lambda: one(db, "SELECT count(*) FROM syncworker.sync_runs WHERE status = 'success'"),
            timeout=120,
            what="the rerun to finish",
        )
        assert destination(db) == source(api), second.output()
        assert one(db, "SELECT state->>'cursor' FROM syncworker.integrations") == newest
        statuses = [r["status"] for r in rows(db, "SELECT status FROM syncworker.sync_runs ORDER BY id")]
        assert statuses == ["abandoned", "success"]
        run = rows(db, "SELECT * FROM syncworker.sync_runs WHERE status = 'success'")[0]
        assert run["records_inserted"] == 30_001 and run["records_updated"] == 0
    finally:
        second.stop()


def test_two_replicas_share_one_rate_limit_for_a_host(db: str, tmp_path: Path) -> None:
    api = Api()
    api.set_records(make_records(200))
    try:
        for name in ("a", "b"):
            job = {
                "url": api.url + "/page",
                "records_path": "data",
                "pagination": {"type": "page", "size_param": "per_page", "size": 10},
                "rate_limit": {"requests": 10, "per_seconds": 1},
                "destination": {
                    "table": f"public.items_{name}",
                    "key": ["id"],
                    "create_table": True,
                    "columns": COLUMNS,
                },
            }
            add_job(db, name, "http", job, interval_seconds=3600)
        with workers(db, tmp_path, 2, "--concurrency", "1"):
            wait_for(
                lambda: one(db, "SELECT count(*) FROM syncworker.sync_runs WHERE status = 'success'") == 2,
                timeout=60,
                what="both syncs",
            )
        assert one(db, "SELECT count(DISTINCT worker_id) FROM syncworker.sync_runs") == 2  # one per replica
        assert one(db, "SELECT count(*) FROM items_a") == one(db, "SELECT count(*) FROM items_b") == 200
        times = sorted(r.at for r in api.requests)
        assert len(times) == 42  # 20 pages and the empty page that ends each sync
        # 10 per second across both replicas: never more than that in any one-second window
        assert max(sum(1 for t in times if s <= t < s + 1.0) for s in times) <= 11
        assert times[-1] - times[0] >= 3.9
    finally:
        api.close()
