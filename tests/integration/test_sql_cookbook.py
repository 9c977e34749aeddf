"""Every file in sql/ runs as written against a migrated database."""

from __future__ import annotations

import subprocess

import pytest

from helpers import ROOT, execute, one

FILES = sorted((ROOT / "sql").glob("*.sql"))


def test_there_is_a_cookbook() -> None:
    names = {f.name for f in FILES}
    assert {
        "status.sql",
        "failing.sql",
        "late.sql",
        "durations.sql",
        "errors_by_type.sql",
        "reenable.sql",
    } <= names
    assert {f"add_{kind}_job.sql" for kind in ("sql", "python", "http", "postgres", "redis")} <= names


@pytest.mark.parametrize("path", FILES, ids=[f.name for f in FILES])
def test_file_runs(db: str, path: object) -> None:
    # The examples refer to these tables of an imaginary application.
    execute(db, "CREATE TABLE public.orders (id bigint PRIMARY KEY, updated_at timestamptz)")
    for example in sorted((ROOT / "sql").glob("add_*.sql")):
        if example != path:
            subprocess.run(
                ["psql", db, "-v", "ON_ERROR_STOP=1", "-q", "-f", str(example)],
                check=True,
                capture_output=True,
            )
    result = subprocess.run(
        ["psql", db, "-v", "ON_ERROR_STOP=1", "-q", "-f", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_examples_add_one_job_of_each_kind(db: str) -> None:
    for example in sorted((ROOT / "sql").glob("add_*.sql")):
        subprocess.run(["psql", db, "-v", "ON_ERROR_STOP=1", "-q", "-f", str(example)], check=True)
    kinds = one(db, "SELECT array_agg(DISTINCT kind ORDER BY kind) FROM syncworker.integrations")
    assert kinds == ["http", "postgres", "python", "redis", "sql"]
