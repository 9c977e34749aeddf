"""deploy/: the Prometheus rules pass promtool, the Grafana dashboard uses only metrics the
code exports, the README documents every metric, and the image has a health check."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from worker.ops.metrics import Metrics, Snapshot, render

ROOT = Path(__file__).resolve().parent.parent.parent
DEPLOY = ROOT / "deploy"
METRIC = re.compile(r"\bsyncworker_[a-z_]+\b")


def exported() -> tuple[set[str], set[str]]:
    """(family names, sample names) the worker's /metrics can carry."""
    metrics = Metrics(4)
    metrics.run_started("sql")
    metrics.run_finished("sql", "success", 0.2)
    metrics.alerts_sent.labels(channel="webhook", event="open").inc()
    metrics.alerts_failed.labels(channel="webhook").inc()
    metrics.http_requests.labels(path="/metrics", code="200").inc()
    job = {
        "name": "j",
        "kind": "sql",
        "enabled": True,
        "health": "ok",
        "last_success_epoch": 1.0,
        "last_duration_ms": 5,
        "retry_count": 0,
        "next_sync_epoch": 2.0,
        "running": True,
        "running_since_epoch": 1.0,
    }
    snapshot = Snapshot(
        jobs=[job], errors={"timeout": 1}, workers=[{"alive": True, "leader": True}], db_now=3.0, taken=1.0
    )
    # What /metrics serves: the replica's registry, then the fleet's series as rendered text.
    body = generate_latest(metrics.registry) + render(snapshot)
    families, samples = set(), set()
    for family in text_string_to_metric_families(body.decode()):
        families.add(family.name)
        samples.update(sample.name for sample in family.samples)
    return families, samples


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if shutil.which("apt-get") is None:
            pytest.skip(
                "promtool is not installed and apt-get is not available to install it (Debian: prometheus)"
            )
        pytest.fail("promtool is missing: bash .ci/setup installs it (apt-get install prometheus)")
    return found


def test_alert_rules_pass_promtool() -> None:
    tool = promtool()
    rules = DEPLOY / "prometheus"
    check = subprocess.run([tool, "check", "rules", "alerts.yml"], cwd=rules, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run(
        [tool, "test", "rules", "alerts_test.yml"], cwd=rules, capture_output=True, text=True
    )
    assert test.returncode == 0, test.stdout + test.stderr


def test_alert_rules_cover_the_incidents_and_use_exported_metrics() -> None:
    text = (DEPLOY / "prometheus" / "alerts.yml").read_text()
    names = set(re.findall(r"alert: (\w+)", text))
    assert names == {
        "SyncJobFailure",
        "SyncJobDuration",
        "SyncDataStale",
        "SyncJobDisabled",
        "SyncJobStale",
        "SyncJobOverrunning",
        "SyncWorkerDown",
        "SyncNoLeader",
    }
    _, samples = exported()
    assert set(METRIC.findall(text)) <= samples


def test_grafana_dashboard_is_json_over_exported_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "syncworker.json").read_text())
    assert dashboard["title"] == "syncworker" and dashboard["panels"]
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for expr in exprs for name in METRIC.findall(expr)}
    _, samples = exported()
    assert used and used <= samples, used - samples
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_every_metric_is_documented_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    families, _ = exported()
    # Counters are documented under their sample name (..._total).
    missing = [f for f in families if f not in readme and f + "_total" not in readme]
    assert not missing, missing


def test_the_image_checks_its_health() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^EXPOSE 9650$", dockerfile, re.M)
    assert re.search(r'^HEALTHCHECK .*CMD \["syncworker", "healthcheck"\]$', dockerfile, re.M)
    assert "ENV SYNCWORKER_HTTP=127.0.0.1:9650" in dockerfile
