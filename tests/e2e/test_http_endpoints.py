"""`syncworker run --http`: a real worker process serving health, readiness, metrics and status."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import ROOT, add_job, wait_for, worker_env, workers

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, str, dict[str, str]]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), dict(exc.headers)
    except OSError:
        return 0, "", {}


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(
    found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float | None:
    return found.get((name, frozenset(labels.items())))


def serving(port: int) -> bool:
    return get(port, "/healthz")[0] == 200


def test_endpoints_of_a_running_worker(jobdb: str, tmp_path: Path) -> None:
    add_job(
        jobdb, "ticks", "sql", {"statement": "INSERT INTO public.ticks DEFAULT VALUES"}, interval_seconds=60
    )
    add_job(jobdb, "broken", "sql", {"statement": "SELECT 1/0"}, interval_seconds=60)
    port = free_port()
    with workers(jobdb, tmp_path, 1, "--http", str(port)) as (proc,):
        wait_for(lambda: serving(port), timeout=30, what="/healthz")
        code, body, _ = get(port, "/healthz")
        assert (code, body) == (200, "ok\n")

        def ready() -> str | None:
            code, body, _ = get(port, "/readyz")
            return body if code == 200 else None

        body = wait_for(ready, timeout=30, what="/readyz")
        assert "database: ok" in body and "schema: ok: revision" in body and "listener: ok" in body

        def scraped() -> dict[Any, float] | None:
            found = samples(get(port, "/metrics")[1])
            finished = value(found, "syncworker_runs_finished_total", kind="sql", status="failed")
            return found if finished and value(found, "syncworker_leader") == 1 else None

        found = wait_for(scraped, timeout=30, what="metrics of finished runs")
        assert value(found, "syncworker_runs_started_total", kind="sql") == 2
        assert value(found, "syncworker_runs_finished_total", kind="sql", status="success") == 1
        assert value(found, "syncworker_run_duration_seconds_count", kind="sql") == 2
        assert value(found, "syncworker_runs_running") == 0
        assert value(found, "syncworker_concurrency") == 4
        assert value(found, "syncworker_listener_connected") == 1

        # The fleet, from the tables (cached for a few seconds).
        def fleet() -> dict[Any, float] | None:
            found = samples(get(port, "/metrics")[1])
            failing = value(
                found, "syncworker_integration_health", integration="broken", kind="sql", health="failing"
            )
            return found if failing == 1 else None

        found = wait_for(fleet, timeout=30, what="the fleet's health in the metrics")
        assert value(found, "syncworker_fleet_up") == 1
        assert (
            value(found, "syncworker_integration_health", integration="ticks", kind="sql", health="ok") == 1
        )
        assert value(found, "syncworker_integration_enabled", integration="ticks", kind="sql") == 1
        assert (
            value(found, "syncworker_integration_consecutive_failures", integration="broken", kind="sql") == 1
        )
        assert value(
            found, "syncworker_integration_last_success_timestamp_seconds", integration="ticks", kind="sql"
        )
        assert (
            value(found, "syncworker_integration_last_duration_seconds", integration="ticks", kind="sql")
            is not None
        )
        assert value(
            found, "syncworker_integration_next_due_timestamp_seconds", integration="broken", kind="sql"
        )
        assert value(found, "syncworker_unresolved_errors", error_type="sql_error") == 1
        assert value(found, "syncworker_workers_alive") == 1
        assert value(found, "syncworker_leaders") == 1

        code, body, headers = get(port, "/health")
        report = json.loads(body)
        assert code == 503 and headers["Content-Type"].startswith("application/json")
        assert report["status"] == "failing" and report["reasons"] == ["1 job(s) failing"]
        assert report["jobs_by_health"]["failing"] == 1 and report["jobs_by_health"]["ok"] == 1
        assert report["success_rate_24h"] == 0.5 and report["runs_24h"] == 2
        assert isinstance(report["mean_duration_ms_24h"], int) and report["last_success_at"]
        assert report["replica"]["role"] == "leader" and report["workers_alive"] == 1

        code, body, _ = get(port, "/api/status")
        status = json.loads(body)
        assert code == 200 and [j["name"] for j in status["jobs"]] == ["broken", "ticks"]
        assert "config" not in status["jobs"][0]
        assert get(port, "/nowhere")[0] == 404

        assert proc.terminate() == 0
    assert not serving(port)


def test_a_token_guards_everything_but_healthz(jobdb: str, tmp_path: Path) -> None:
    port = free_port()
    env = worker_env(jobdb, SYNCWORKER_HTTP=f"127.0.0.1:{port}", SYNCWORKER_HTTP_TOKEN="s3cret-token")
    with workers(jobdb, tmp_path, 1, env=env):
        wait_for(lambda: serving(port), timeout=30, what="/healthz")
        for path in ("/metrics", "/health", "/readyz", "/api/status", "/"):
            code, _, headers = get(port, path)
            assert code == 401, path
            assert headers["WWW-Authenticate"].startswith("Basic" if path == "/" else "Bearer")
        assert get(port, "/metrics", {"Authorization": "Bearer wrong"})[0] == 401
        code, body, _ = get(port, "/metrics", {"Authorization": "Bearer s3cret-token"})
        assert code == 200 and "syncworker_leader" in body
        basic = base64.b64encode(b"anyone:s3cret-token").decode()
        assert get(port, "/", {"Authorization": f"Basic {basic}"})[0] == 200
        assert get(port, "/", {"Authorization": "Basic !!!"})[0] == 401


def run_briefly(url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", "run", *args],
        env=worker_env(url, **env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def one_line_error(result: subprocess.CompletedProcess[str], text: str) -> None:
    assert result.returncode != 0
    # (the worker logs which database it uses before it starts)
    lines = [line for line in result.stderr.splitlines() if line.startswith("syncworker: error:")]
    assert "Traceback" not in result.stderr
    assert len(lines) == 1 and text in lines[0], result.stderr


@pytest.mark.parametrize(
    ("address", "text"),
    [
        ("nonsense", "--http: expected PORT, HOST:PORT or [IPv6]:PORT, got 'nonsense'"),
        ("127.0.0.1:99999", "the port must be a number from 1 to 65535"),
        (":8080", "no host in ':8080'"),
    ],
)
def test_bad_addresses_are_one_line(jobdb: str, address: str, text: str) -> None:
    one_line_error(run_briefly(jobdb, "--http", address), text)


def test_a_port_in_use_is_one_line(jobdb: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_briefly(jobdb, "--http", f"127.0.0.1:{port}")
    one_line_error(result, f"--http 127.0.0.1:{port}: cannot listen: address already in use")


def test_no_wide_address_without_a_token(jobdb: str) -> None:
    result = run_briefly(jobdb, SYNCWORKER_HTTP="0.0.0.0:1")
    one_line_error(result, "not a loopback address and SYNCWORKER_HTTP_TOKEN is not set")
    assert "--http-insecure" in result.stderr


def test_http_insecure_allows_a_wide_address(jobdb: str, tmp_path: Path) -> None:
    port = free_port()
    with workers(jobdb, tmp_path, 1, "--http", f"0.0.0.0:{port}", "--http-insecure") as (proc,):
        wait_for(lambda: serving(port), timeout=30, what="/healthz on 0.0.0.0")
        assert get(port, "/metrics")[0] == 200  # no token: anyone who reaches it may read
        assert proc.terminate() == 0
