"""`migrate --check`, and the worker and the CLI refusing a schema they were not built for."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys

import pytest

from helpers import ROOT, TESTS, execute, one
from worker.daemon.settings import Settings
from worker.daemon.worker import Worker
from worker.db import migrate
from worker.db.migrate import EXIT_SCHEMA, SchemaMismatch, evaluate, head_revision, known_revisions

VERSIONS = ROOT / "migrations" / "versions"


def cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("SYNCWORKER_", "PG")) and k != "DATABASE_URL"
    }
    env.update({"SYNCWORKER_DATABASE_URL": url, "PYTHONPATH": str(TESTS)})
    return subprocess.run(
        [sys.executable, "-m", "worker", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def recorded(url: str) -> str:
    return str(one(url, "SELECT version_num FROM syncworker_alembic_version"))


# -- the revisions this code knows ------------------------------------------------------------


def test_the_head_is_the_newest_file_and_alembic_agrees() -> None:
    from alembic.script import ScriptDirectory

    newest = sorted(VERSIONS.glob("[0-9]*.py"))[-1]
    assert re.search(rf'^revision = "{head_revision()}"$', newest.read_text(), re.M), newest.name
    script = ScriptDirectory.from_config(migrate._config(""))
    assert known_revisions() == tuple(reversed([s.revision for s in script.walk_revisions()]))
    assert known_revisions()[0] == "0001"


def test_the_version_table_is_the_one_alembic_writes() -> None:
    env_py = (ROOT / "migrations" / "env.py").read_text()
    assert f'VERSION_TABLE = "{migrate.VERSION_TABLE}"' in env_py


@pytest.mark.parametrize(
    ("has_tables", "found", "state"),
    [
        (False, [], "missing"),
        (True, [], "unversioned"),
        (True, ["HEAD"], "current"),
        (True, ["0001"], "behind"),
        (True, ["9999"], "ahead"),
        (True, ["0001", "9999"], "ahead"),
    ],
)
def test_evaluate(has_tables: bool, found: list[str], state: str) -> None:
    found = [head_revision() if rev == "HEAD" else rev for rev in found]
    status = evaluate(has_tables, found)
    assert status.state == state
    assert status.ok is (state == "current")
    assert status.head == head_revision()


# -- migrate --check --------------------------------------------------------------------------


def test_check_at_the_head(db: str) -> None:
    result = cli(db, "migrate", "--check")
    assert result.returncode == 0, result.stderr
    assert f"is at revision {head_revision()}, the newest this syncworker knows" in result.stdout


def test_check_without_a_schema_changes_nothing(empty_db: str) -> None:
    result = cli(empty_db, "migrate", "--check")
    assert result.returncode == EXIT_SCHEMA
    assert "no syncworker schema in" in one_line(result) and "run `syncworker migrate`" in result.stderr
    assert one(
        empty_db,
        "SELECT to_regnamespace('syncworker') IS NULL AND to_regclass('syncworker_alembic_version') IS NULL",
    )


def test_an_older_schema_needs_migrate(empty_db: str) -> None:
    older = known_revisions()[-2]
    migrate.upgrade(empty_db, older)
    for args in (["migrate", "--check"], ["status"], ["trigger", "x"], ["run"]):
        result = cli(empty_db, *args)
        assert result.returncode == EXIT_SCHEMA, (args, result.stderr)
        line = one_line(result)
        assert f"is at revision {older}, older than this syncworker needs ({head_revision()})" in line
        assert line.endswith("run `syncworker migrate`"), line
    assert recorded(empty_db) == older  # --check changed nothing
    assert cli(empty_db, "migrate").returncode == 0
    assert cli(empty_db, "migrate", "--check").returncode == 0


def test_a_newer_schema_is_refused_by_every_command(db: str) -> None:
    execute(db, "UPDATE syncworker_alembic_version SET version_num = '9001_from_the_future'")
    for args in (["migrate", "--check"], ["migrate"], ["status"], ["check"], ["run-once", "x"], ["run"]):
        result = cli(db, *args)
        assert result.returncode == EXIT_SCHEMA, (args, result.stderr)
        line = one_line(result)
        assert "is at revision 9001_from_the_future, newer than this syncworker" in line
        assert line.endswith("upgrade syncworker on this host"), line
    assert recorded(db) == "9001_from_the_future"  # migrate touched nothing


def test_a_schema_without_a_recorded_revision(db: str) -> None:
    execute(db, "DELETE FROM syncworker_alembic_version")
    result = cli(db, "migrate", "--check")
    assert result.returncode == EXIT_SCHEMA
    assert "has no recorded revision" in one_line(result)


# -- the worker's own check at start-up (the CLI checks first; the worker checks again) ----------


@pytest.mark.parametrize(("revision", "words"), [("older", "run `syncworker migrate`"), ("9999", "upgrade")])
def test_the_worker_checks_the_revision_itself(empty_db: str, revision: str, words: str) -> None:
    db = empty_db
    if revision == "older":
        migrate.upgrade(db, known_revisions()[-2])
    else:
        migrate.upgrade(db)
        execute(db, "UPDATE syncworker_alembic_version SET version_num = %s", [revision])
    worker = Worker(Settings.load({}, env={}, database_url=db))
    with pytest.raises(SchemaMismatch, match=re.escape(words)) as raised:
        asyncio.run(worker.run())
    assert raised.value.exit_code == EXIT_SCHEMA
    # Nothing was registered: the check comes before the worker's row.
    assert one(db, "SELECT count(*) FROM syncworker.workers") == 0
