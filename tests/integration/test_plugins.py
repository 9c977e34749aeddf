"""Connector plugins found through the `syncworker.connectors` entry-point group, working or broken."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import add_job, one, rows
from worker import connectors
from worker.run.once import run_once

PLUGIN = """
from worker.connectors.base import ConfigError, Connector, RunResult


class Doubler(Connector):
    kind = "doubler"

    def validate(self, config):
        if not isinstance(config.get("n"), int):
            raise ConfigError("n", "expected an integer")
        return config["n"]

    async def run(self, ctx):
        return RunResult(records_processed=ctx.config * 2, state={"last": ctx.config * 2})
"""


@pytest.fixture
def installed_plugins(tmp_path: Path) -> Iterator[None]:
    """Two distributions on sys.path, as pip would install them: one good, one broken."""
    (tmp_path / "sw_doubler.py").write_text(PLUGIN)
    for dist, entry in [
        ("sw_doubler", "doubler = sw_doubler:Doubler"),
        ("sw_broken", "broken = sw_missing_module:Nothing"),
    ]:
        info = tmp_path / f"{dist}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(f"[syncworker.connectors]\n{entry}\n")
    sys.path.insert(0, str(tmp_path))
    connectors.REGISTRY.forget()
    try:
        yield
    finally:
        sys.path.remove(str(tmp_path))
        connectors.REGISTRY.forget()
        sys.modules.pop("sw_doubler", None)


def test_plugins_are_listed_and_run(db: str, installed_plugins: None) -> None:
    assert {"doubler", "broken", "sql", "python"} <= set(connectors.known_kinds())
    add_job(db, "twice", "doubler", {"n": 21})
    assert asyncio.run(run_once(db, "twice")).status == "success"
    assert one(db, "SELECT state FROM syncworker.integrations") == {"last": 42}
    assert one(db, "SELECT records_processed FROM syncworker.sync_runs") == 42


def test_plugin_config_errors_and_broken_plugins_fail_only_their_job(
    db: str, installed_plugins: None
) -> None:
    add_job(db, "bad-config", "doubler", {"n": "many"})
    add_job(db, "broken-plugin", "broken", {})
    for name in ("bad-config", "broken-plugin"):
        assert asyncio.run(run_once(db, name)).status == "failed"
    reasons = {
        r["name"]: r["disabled_reason"]
        for r in rows(db, "SELECT name, disabled_reason FROM syncworker.integrations")
    }
    assert "n: expected an integer" in reasons["bad-config"]
    assert 'connector "broken" (sw_missing_module:Nothing) failed to load' in reasons["broken-plugin"]


def test_a_job_calling_sys_exit_fails_without_stopping_anything(db: str) -> None:
    add_job(db, "quitter", "python", {"callable": "jobs:exits"})
    assert asyncio.run(run_once(db, "quitter")).status == "failed"
    assert "raised SystemExit(3)" in one(db, "SELECT last_error FROM syncworker.integrations")
