"""SYNCWORKER_PYTHON_MODULES: a python job may only call a module the worker's operator allowed
(or one a plugin registers), checked before the module is imported."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import ROOT, add_job, one, rows, wait_for, worker_env, workers
from worker import connectors
from worker.connectors.python import within
from worker.daemon.settings import Settings, SettingsError, python_modules
from worker.run.once import OneShotError, run_once

# A module that leaves a mark when it is imported (importing runs code).
MARKING_MODULE = """
import pathlib
pathlib.Path(__file__).with_suffix(".imported").touch()

def run(ctx):
    return {"records_processed": 1}
"""


@pytest.fixture
def marking_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """`sw_marking:run` on this process's path; the returned file exists once it was imported."""
    (tmp_path / "sw_marking.py").write_text(MARKING_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path / "sw_marking.imported"
    sys.modules.pop("sw_marking", None)


def cli(url: str, *args: str, modules: str | None = "jobs") -> subprocess.CompletedProcess[str]:
    """`syncworker ARGS` as the worker's environment has it, with SYNCWORKER_PYTHON_MODULES=`modules`."""
    env = {**worker_env(url)}
    if modules is None:
        del env["SYNCWORKER_PYTHON_MODULES"]
    else:
        env["SYNCWORKER_PYTHON_MODULES"] = modules
    return subprocess.run(
        [sys.executable, "-m", "worker", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def run(url: str, name: str) -> str | None:
    # As a worker judges it: a module its environment does not allow is a problem of the job.
    return asyncio.run(run_once(url, name, local_check=False)).status


def job(url: str, name: str) -> dict[str, object]:
    return rows(url, "SELECT * FROM syncworker.integrations WHERE name = %s", (name,))[0]


def test_a_module_outside_the_allowlist_is_disabled_without_being_imported(
    db: str, marking_module: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SYNCWORKER_PYTHON_MODULES", "myapp.sync, reports")
    add_job(db, "outside", "python", {"callable": "sw_marking:run"}, interval_seconds=60)
    assert run(db, "outside") == "failed"
    row = job(db, "outside")
    assert not row["enabled"]
    fix = "set SYNCWORKER_PYTHON_MODULES=myapp.sync,reports,sw_marking"
    assert fix in row["disabled_reason"]
    err = rows(db, "SELECT error_type, message FROM syncworker.sync_errors")[0]
    assert err["error_type"] == "config_invalid" and fix in err["message"]
    assert not marking_module.exists()


def test_without_an_allowlist_no_python_job_runs(
    db: str, marking_module: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SYNCWORKER_PYTHON_MODULES")
    add_job(db, "any", "python", {"callable": "sw_marking:run", "isolation": "process"})
    assert run(db, "any") == "failed"
    reason = job(db, "any")["disabled_reason"]
    assert "SYNCWORKER_PYTHON_MODULES, which is not set" in reason
    assert "set SYNCWORKER_PYTHON_MODULES=sw_marking" in reason
    assert not marking_module.exists()


def test_an_allowed_module_runs(db: str, marking_module: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNCWORKER_PYTHON_MODULES", "reports,sw_marking")
    add_job(db, "inside", "python", {"callable": "sw_marking:run"})
    assert run(db, "inside") == "success"
    assert marking_module.exists()


@pytest.mark.parametrize(
    ("module", "prefixes", "allowed"),
    [
        ("reports", ["reports"], True),
        ("reports.daily", ["reports"], True),
        ("reports.daily.v2", ["reports"], True),
        ("reportsx", ["reports"], False),
        ("reports", ["reports.daily"], False),
        ("myapp.sync", ["other", "myapp.sync"], True),
        ("myapp.syncer", ["myapp.sync"], False),
        ("myapp", ["myapp.sync"], False),
        ("jobs", [], False),
    ],
)
def test_a_prefix_allows_the_module_and_its_submodules(
    module: str, prefixes: list[str], allowed: bool
) -> None:
    assert within(module, prefixes) is allowed


def test_the_setting_is_a_list_of_module_names() -> None:
    assert python_modules({"SYNCWORKER_PYTHON_MODULES": " myapp.sync , reports,, "}) == [
        "myapp.sync",
        "reports",
    ]
    assert python_modules({}) == []
    assert Settings.load({"python_modules": "a.b,c"}, env={}).python_modules == "a.b,c"
    with pytest.raises(SettingsError, match="--python-modules: expected comma-separated module names"):
        Settings.load({"python_modules": "myapp/sync"}, env={})
    with pytest.raises(SettingsError, match="SYNCWORKER_PYTHON_MODULES: expected"):
        Settings.load({}, env={"SYNCWORKER_PYTHON_MODULES": "reports;rm -rf"})


def test_the_worker_disables_a_job_outside_its_allowlist_and_its_flag_wins(
    jobdb: str, tmp_path: Path
) -> None:
    add_job(jobdb, "counter", "python", {"callable": "jobs:count_up"}, interval_seconds=3600)
    env = worker_env(jobdb, SYNCWORKER_PYTHON_MODULES="reports")
    with workers(jobdb, tmp_path, 1, env=env):
        wait_for(lambda: not job(jobdb, "counter")["enabled"], timeout=20, what="the job to be disabled")
    row = job(jobdb, "counter")
    assert "set SYNCWORKER_PYTHON_MODULES=reports,jobs" in row["disabled_reason"]
    assert one(jobdb, "SELECT error_type FROM syncworker.sync_runs") == "config_invalid"
    one(jobdb, "SELECT syncworker.enable_job('counter'), syncworker.trigger_sync('counter')")
    (tmp_path / "flag").mkdir()
    with workers(jobdb, tmp_path / "flag", 1, "--python-modules", "reports,jobs", env=env):
        wait_for(lambda: job(jobdb, "counter")["last_status"] == "success", timeout=20, what="a success")


def test_check_and_run_once_follow_the_allowlist_of_their_environment(jobdb: str) -> None:
    add_job(jobdb, "counter", "python", {"callable": "jobs:count_up"}, interval_seconds=3600)
    result = cli(jobdb, "check", modules=None)
    assert "warning: counter: cannot be checked from this shell" in result.stderr
    assert "set SYNCWORKER_PYTHON_MODULES=jobs" in result.stderr
    result = cli(jobdb, "run-once", "counter", modules=None)
    assert result.returncode == 1 and "set SYNCWORKER_PYTHON_MODULES=jobs" in result.stderr
    assert job(jobdb, "counter")["enabled"]  # an operator's shell says nothing of the worker's
    assert one(jobdb, "SELECT count(*) FROM syncworker.sync_runs") == 0
    assert cli(jobdb, "check").returncode == 0
    assert cli(jobdb, "run-once", "counter").returncode == 0


PLUGIN = """
from worker.connectors.base import Connector, RunResult


class Tally(Connector):
    kind = "tally"

    def validate(self, config):
        return config

    async def run(self, ctx):
        return RunResult()


def nightly(ctx):
    return {"records_processed": 7}
"""


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A distribution whose entry point registers `sw_tally:Tally`, as pip would install it."""
    (tmp_path / "sw_tally.py").write_text(PLUGIN)
    info = tmp_path / "sw_tally-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sw_tally\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[syncworker.connectors]\ntally = sw_tally:Tally\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    connectors.REGISTRY.forget()
    yield
    connectors.REGISTRY.forget()
    sys.modules.pop("sw_tally", None)


def test_a_plugins_module_is_allowed_without_the_setting(
    db: str, plugin: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SYNCWORKER_PYTHON_MODULES")
    add_job(db, "plugin-job", "python", {"callable": "sw_tally:nightly"})
    assert run(db, "plugin-job") == "success"
    assert one(db, "SELECT records_processed FROM syncworker.sync_runs") == 7


def test_run_once_from_a_shell_refuses_rather_than_disable(db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SYNCWORKER_PYTHON_MODULES")
    add_job(db, "counter", "python", {"callable": "jobs:count_up"})
    with pytest.raises(OneShotError, match="this shell cannot run it"):
        asyncio.run(run_once(db, "counter"))
    assert job(db, "counter")["enabled"]
