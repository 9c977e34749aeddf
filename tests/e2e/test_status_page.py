"""The live status page, in headless Debian chromium against a real worker's --http server."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_http_endpoints import free_port, get, serving

from helpers import add_job, execute, wait_for, worker_env, workers

pytestmark = pytest.mark.e2e

SECRET = "hunter2-should-never-show"


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if shutil.which("apt-get") is None:
            pytest.skip("chromium is not installed and apt-get is not available to install it")
        pytest.fail("chromium is missing: bash .ci/setup installs it (apt-get install chromium)")
    return found


def render(browser: str, url: str, tmp_path: Path, width: int, budget_ms: int = 3000) -> str:
    """The page's DOM after `budget_ms` of (virtual) time in a window `width` pixels wide."""
    result = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-extensions",
            f"--user-data-dir={tmp_path / 'chrome'}",
            f"--window-size={width},900",
            f"--virtual-time-budget={budget_ms}",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_the_status_page_draws_the_fleet_on_a_phone_and_a_desk(jobdb: str, tmp_path: Path) -> None:
    browser = chromium()
    add_job(
        jobdb, "ticks", "sql", {"statement": "INSERT INTO public.ticks DEFAULT VALUES"}, interval_seconds=60
    )
    add_job(jobdb, "broken", "sql", {"statement": "SELECT 1/0"}, interval_seconds=60)
    add_job(
        jobdb,
        "elsewhere",
        "sql",
        {"statement": "select 1", "dsn": {"env": "SW_PAGE_DSN"}},
        interval_seconds=60,
    )
    add_job(jobdb, "resting", "sql", {"statement": "select 1"}, interval_seconds=60)
    execute(jobdb, "SELECT syncworker.pause_job('resting', 'maintenance window')")
    port = free_port()
    env = worker_env(jobdb, SW_PAGE_DSN=f"postgresql://someone:{SECRET}@127.0.0.1:1/nowhere")
    with workers(jobdb, tmp_path, 1, "--http", str(port), env=env):
        wait_for(lambda: serving(port), timeout=30, what="/healthz")

        def failed_runs() -> int:
            jobs = json.loads(get(port, "/api/status")[1] or "{}").get("jobs", [])
            return sum(1 for job in jobs if job["last_status"] == "failed")

        wait_for(lambda: failed_runs() == 2, timeout=30, what="the failed runs")
        url = f"http://127.0.0.1:{port}/"

        phone = render(browser, url, tmp_path, 390)
        assert 'data-loaded="true"' in phone and 'data-layout="cards"' in phone
        assert re.search(r'<p id="overall" class="badge" data-status="failing"', phone)
        rows = re.findall(r'<tr data-health="(\w+)"><td class="name">([^<]+)</td>', phone)
        # Worst first (paused ranks right after disabled), then by name.
        assert [name for _, name in rows] == [
            "resting (sql)",
            "broken (sql)",
            "elsewhere (sql)",
            "ticks (sql)",
        ]
        assert [health for health, _ in rows] == ["paused", "failing", "failing", "ok"]
        assert "paused: maintenance window" in phone and "division by zero" in phone
        assert SECRET not in phone and "SW_PAGE_DSN" not in phone
        assert re.search(r'<td class="name">w\d+</td>', phone)

        desk = render(browser, url, tmp_path, 1280, budget_ms=12000)
        assert 'data-layout="table"' in desk
        refreshes = re.search(r'data-refreshes="(\d+)"', desk)
        assert refreshes and int(refreshes.group(1)) >= 2, "the page did not refresh itself"

        code, body, headers = get(port, "/")
        assert code == 200 and "default-src 'none'" in headers["Content-Security-Policy"]
        assert '<script src="app.js" defer></script>' in body
        for asset in ("/app.js", "/app.css"):
            assert get(port, asset)[0] == 200
