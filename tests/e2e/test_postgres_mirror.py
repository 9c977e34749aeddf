"""A `postgres` mirror under real workers: SIGKILL mid-copy loses and duplicates nothing; real time."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import (
    ROOT,
    WorkerProcess,
    add_job,
    create_database,
    drop_database,
    execute,
    one,
    rows,
    wait_for,
    worker_env,
)

pytestmark = pytest.mark.e2e

TABLE = """
CREATE TABLE public.events (
  id bigint PRIMARY KEY, account int NOT NULL, payload text, updated_at timestamptz NOT NULL DEFAULT now()
)
"""
FINGERPRINT = "SELECT count(*) AS n, md5(string_agg(e::text, ',' ORDER BY id)) AS digest FROM {} e"


@pytest.fixture
def source() -> Iterator[str]:
    name, url = create_database()
    try:
        execute(url, TABLE)
        yield url
    finally:
        drop_database(name)


def config(**extra: Any) -> dict[str, Any]:
    return {
        "source": {
            "dsn": {"env": "MIRROR_SOURCE_DSN"},
            "table": "public.events",
            "key": ["id"],
            "updated_at": "updated_at",
        },
        "destination": {"table": "public.events", "key": ["id"], "create_table": True, "batch_size": 2000},
        "deletes": "hard",
        **extra,
    }


def identical(source: str, db: str) -> bool:
    return rows(source, FINGERPRINT.format("public.events")) == rows(db, FINGERPRINT.format("public.events"))


def successes(db: str) -> int:
    return int(one(db, "SELECT count(*) FROM syncworker.sync_runs WHERE status = 'success'"))


def test_sigkill_during_a_large_copy_then_rerun_leaves_an_exact_mirror(
    db: str, source: str, tmp_path: Path
) -> None:
    execute(
        source,
        """
        INSERT INTO events (id, account, payload, updated_at)
        SELECT g, g % 97, repeat(md5(g::text), 3), '2024-01-01'::timestamptz + g * interval '1 second'
          FROM generate_series(1, 600000) g
    """,
    )
    add_job(db, "events", "postgres", config(), interval_seconds=3600)
    env = worker_env(db, MIRROR_SOURCE_DSN=source)
    first = WorkerProcess(db, tmp_path / "first.log", env=env)
    try:
        # Kill it once some batches are committed, long before the copy is done.
        wait_for(
            lambda: (
                one(db, "SELECT count(*) FROM public.events")
                if one(db, "SELECT to_regclass('public.events')")
                else 0
            ),
            timeout=30,
            what="first batches",
        )
        first.kill()
    finally:
        first.stop()
    copied = one(db, "SELECT count(*) FROM public.events")
    # (the copy commits every half second: enough rows that the kill lands before its end)
    assert 0 < copied < 600000, "the kill should land in the middle of the copy"
    assert one(db, "SELECT state->>'phase' FROM syncworker.integrations") == "full"

    # Meanwhile the source changes: updates, deletes, inserts.
    execute(source, "UPDATE events SET payload = 'changed', updated_at = now() WHERE id % 1000 = 0")
    execute(source, "DELETE FROM events WHERE id % 777 = 0")
    execute(source, "INSERT INTO events (id, account) SELECT g, 1 FROM generate_series(600001, 600100) g")

    second = WorkerProcess(db, tmp_path / "second.log", env=env)
    try:
        wait_for(lambda: successes(db) >= 1, timeout=120, what="the rerun to finish")
        assert identical(source, db), second.output()
        state = one(db, "SELECT state FROM syncworker.integrations")
        assert state["phase"] == "incremental"
        # the cursor: no transaction older than it was running when the last snapshot was taken
        assert int(state["xmin"]) <= int(one(source, "SELECT pg_snapshot_xmin(pg_current_snapshot())::text"))
        statuses = [r["status"] for r in rows(db, "SELECT status FROM syncworker.sync_runs ORDER BY id")]
        assert statuses == ["abandoned", "success"]

        # And it keeps up: the next (manual) run catches a change made after the copy.
        execute(source, "UPDATE events SET payload = 'later', updated_at = now() WHERE id = 5")
        execute(db, "SELECT syncworker.trigger_sync('events')")
        wait_for(lambda: successes(db) >= 2, timeout=30, what="the follow-up run")
        assert identical(source, db)
    finally:
        second.stop()
    result = subprocess.run(
        [sys.executable, "-m", "worker", "verify", "events"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and "match" in result.stdout, result.stdout + result.stderr


def test_changes_reach_the_mirror_in_real_time(db: str, source: str, tmp_path: Path) -> None:
    execute(source, "INSERT INTO events (id, account) SELECT g, 1 FROM generate_series(1, 10) g")
    add_job(db, "events", "postgres", config(realtime=True, deletes="none"), interval_seconds=3600)
    env = worker_env(db, MIRROR_SOURCE_DSN=source)
    install = subprocess.run(
        [sys.executable, "-m", "worker", "install-trigger", "events"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stderr
    worker = WorkerProcess(db, tmp_path / "worker.log", env=env)
    try:
        wait_for(lambda: successes(db) >= 1, timeout=30, what="the first copy")
        runs_before = successes(db)
        execute(source, "INSERT INTO events (id, account) VALUES (11, 2)")
        wait_for(
            lambda: one(db, "SELECT count(*) FROM public.events WHERE id = 11"),
            timeout=10,
            what="the new row in the mirror",
        )
        execute(source, "UPDATE events SET account = 3 WHERE id <= 5")
        wait_for(
            lambda: one(db, "SELECT count(*) FROM public.events WHERE account = 3") == 5,
            timeout=10,
            what="the update in the mirror",
        )
        triggers = [
            r["trigger"]
            for r in rows(
                db,
                "SELECT trigger FROM syncworker.sync_runs WHERE status = 'success' AND id > %s ORDER BY id",
                (runs_before,),
            )
        ]
        assert triggers and set(triggers) == {"realtime"}
        assert identical(source, db)
    finally:
        worker.stop()


def test_a_realtime_job_added_while_the_worker_runs_is_listened_for_at_once(
    db: str, source: str, tmp_path: Path
) -> None:
    execute(source, "INSERT INTO events (id, account) SELECT g, 1 FROM generate_series(1, 10) g")
    env = worker_env(db, MIRROR_SOURCE_DSN=source)
    worker = WorkerProcess(db, tmp_path / "worker.log", env=env)
    try:
        wait_for(lambda: "now the leader" in worker.output(), timeout=60, what="the worker to lead")
        add_job(db, "events", "postgres", config(realtime=True, deletes="none"), interval_seconds=3600)
        install = subprocess.run(
            [sys.executable, "-m", "worker", "install-trigger", "events"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert install.returncode == 0, install.stderr
        wait_for(lambda: successes(db) >= 1, timeout=30, what="the first copy")
        wait_for(lambda: "listening for changes" in worker.output(), timeout=5, what="the source listener")
        execute(source, "INSERT INTO events (id, account) VALUES (11, 2)")
        # Well inside the 30 s reload that used to be the only way a new job was noticed.
        wait_for(
            lambda: one(db, "SELECT count(*) FROM public.events WHERE id = 11"),
            timeout=5,
            what="the new row in the mirror",
        )
    finally:
        worker.stop()
        print(worker.output()[-4000:])
