"""What a run's end means for its job, decided without a database: alert payloads, config problems."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from worker import secrets
from worker.connectors.base import ConfigError, FencedError, RecordError, RunResult
from worker.run import outcome, schedule
from worker.run.cron import CronSpec
from worker.run.outcome import Ending, Failure, Job, alert, config_problem

NOW = datetime(2026, 1, 1, tzinfo=UTC)
UTC_ZONE = ZoneInfo("UTC")


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
    payload = alert(job("ü" * 9000), Ending("failed", Failure("config_invalid", "x" * 9000, None), plan))
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


EVERY_HOUR = schedule.Schedule.from_row(3600, None, "UTC")


def test_success_and_partial_go_back_to_the_schedule() -> None:
    ok = outcome.succeeded(job("j"), EVERY_HOUR, NOW, failed_records=0)
    assert ok.status == "success" and ok.failure is None
    assert ok.plan.retry_count == 0 and ok.plan.next_sync_at == NOW + timedelta(hours=1)
    assert outcome.succeeded(job("j"), EVERY_HOUR, NOW, failed_records=2).status == "partial"


def test_a_failure_is_retried_with_backoff_then_disables_the_job() -> None:
    boom = outcome.classify(RuntimeError("upstream said no"), timed_out=False)
    assert boom.error_type == "exception" and boom.message == "RuntimeError: upstream said no"
    retry = outcome.failed(job("j"), EVERY_HOUR, NOW, boom, rand=0.5)
    assert retry.status == "failed" and retry.plan.disabled_reason is None
    assert retry.plan.next_sync_at == NOW + timedelta(seconds=60)
    assert retry.plan.scheduled_sync_at == NOW + timedelta(hours=1)  # the slot kept aside
    last = outcome.failed(replace(job("j"), retry_count=3), EVERY_HOUR, NOW, boom, rand=0.5)
    assert (
        last.plan.disabled_reason
        == "disabled after 4 failures in a row; last error: RuntimeError: upstream said no"
    )


def test_a_timeout_is_its_own_error_type() -> None:
    failure = outcome.classify(TimeoutError(), timed_out=True)
    assert failure == outcome.Failure("timeout", "the run exceeded timeout_seconds and was cancelled", None)
    assert outcome.failed(job("j"), EVERY_HOUR, NOW, failure, rand=0.5).plan.retry_count == 1


def test_a_config_problem_disables_at_once_whatever_the_retries_left() -> None:
    ending = outcome.bad_row(job("j"), EVERY_HOUR, NOW, ConfigError("url", "expected a string, got null"))
    assert ending.failure == outcome.Failure("config_invalid", "url: expected a string, got null", None)
    assert ending.plan.disabled_reason == "invalid configuration: url: expected a string, got null"
    assert ending.plan.next_sync_at == NOW + timedelta(hours=1)  # where it resumes once fixed
    unreadable = outcome.bad_row(
        job("j"), None, NOW, ConfigError("", "config could not be read (RecursionError)")
    )
    assert (
        unreadable.plan.disabled_reason == "invalid configuration: config could not be read (RecursionError)"
    )
    raised = outcome.failed(
        job("j"), EVERY_HOUR, NOW, outcome.classify(ConfigError("x", "bad"), False), rand=0.5
    )
    assert raised.plan.disabled_reason == "invalid configuration: x: bad"


def test_a_cron_that_stops_firing_disables_the_job_but_keeps_the_run() -> None:
    never = schedule.Schedule(
        None,
        CronSpec(*([frozenset({0})] * 2), frozenset({30}), frozenset({2}), frozenset(range(7)), True, False),
        UTC_ZONE,
    )
    ending = outcome.succeeded(job("j"), never, NOW, failed_records=0)
    assert ending.status == "success" and "never fires" in (ending.plan.disabled_reason or "")


def test_a_fence_and_a_shutdown_are_interruptions_not_endings() -> None:
    assert outcome.interruption(asyncio.CancelledError()) == "shutdown"
    assert outcome.interruption(FencedError("run 7 is no longer live")) == "fenced"
    assert outcome.interruption(RuntimeError("x")) is None


def test_a_commit_that_fails_is_recorded_as_a_failure() -> None:
    failure = outcome.not_recorded(outcome.Failure("sql_error", "QueryCanceled: statement timeout", "tb"))
    assert failure == outcome.Failure(
        "sql_error", "the run could not be recorded: QueryCanceled: statement timeout", None
    )


def test_error_rows_keep_each_record_count_the_rest_and_add_the_runs_own() -> None:
    secrets.remember("hunter2-secret")
    kept = [
        RecordError("record_invalid", "bad value hunter2-secret\x00", "k1", None, {"v": "hunter2-secret"})
    ]
    failure = outcome.Failure("upstream_http", "HTTP 500", "traceback")
    ending = outcome.Ending("failed", failure, schedule.after_invalid_config(None, 0, "x"))
    found = outcome.error_rows(job("j"), ending, kept, failed_records=3)
    assert [r["error_type"] for r in found] == ["record_invalid", "record_invalid", "upstream_http"]
    assert found[0]["message"] == "bad value ***\\0" and found[0]["context"] == {"v": "***"}
    assert found[1]["message"] == "2 more failed records not kept"
    assert found[2] | {} == {
        "integration_id": 1,
        "run_id": 7,
        "error_type": "upstream_http",
        "message": "HTTP 500",
        "detail": "traceback",
        "record_key": None,
        "context": {},
    }
    params = outcome.finish_params(job("j"), ending, RunResult(state={"c": 1}, records_processed=5), 3)
    assert params["status"] == "failed" and params["records_failed"] == 3 and params["state"] == {"c": 1}
    assert params["error_type"] == "upstream_http" and params["disabled_reason"] == "invalid configuration: x"
