"""What a run's end means for its job, decided without a database: alert payloads, config problems."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from worker import schedule
from worker.connectors.base import ConfigError
from worker.runner import Failure, Job, alert, config_problem

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def job(name: str) -> Job:
    return Job(
        id=1,
        name=name,
        kind="garbage",
        config={},
        state={},
        interval_seconds=5,
        cron=None,
        timezone="UTC",
        max_retries=3,
        retry_backoff_seconds=60,
        timeout_seconds=3600,
        retry_count=0,
        run_id=7,
        trigger="schedule",
        attempt=1,
        scheduled_for=None,
        locked_at=NOW,
    )


def test_the_alert_payload_fits_notify_whatever_the_name_and_reason() -> None:
    plan = schedule.after_invalid_config(None, 0, "é" * 20_000)
    payload = alert(job("ü" * 9000), Failure("config_invalid", "x" * 9000, None), plan)
    assert len(payload.encode()) < 8000
    body = json.loads(payload)
    assert body["integration"] == "ü" * 200 and body["run_id"] == 7
    assert body["reason"].startswith("invalid configuration: éé")


def test_config_problems_name_the_field_or_say_what_could_not_be_read() -> None:
    assert config_problem(ConfigError("statement", "expected a string, got null")) == (
        "statement: expected a string, got null"
    )
    assert config_problem(schedule.ScheduleError('unknown timezone "Mars/Olympus"')) == (
        'unknown timezone "Mars/Olympus"'
    )
    message = config_problem(TypeError("'NoneType' object is not iterable"))
    assert message == "could not be read (TypeError: 'NoneType' object is not iterable)"
