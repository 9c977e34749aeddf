"""An `http` sync under real workers: SIGKILL in the middle of a long sync loses and duplicates nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import WorkerProcess, add_job, one, rows, wait_for
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
