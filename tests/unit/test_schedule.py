"""Interval anchoring, catch-up after downtime, retry backoff and what a run's end writes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from worker.run import schedule
from worker.run.schedule import Schedule, ScheduleError, retry_delay

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def every(seconds: int) -> Schedule:
    return Schedule.from_row(seconds, None, "UTC")


def test_interval_slots_stay_on_the_grid_however_long_the_run_took() -> None:
    # A run for the 12:00 slot that finished at 12:00:47 is next due at 12:01, not 12:01:47.
    assert every(60).next_slot(T0, T0 + timedelta(seconds=47)) == T0 + timedelta(minutes=1)


def test_after_downtime_the_next_slot_is_the_next_on_the_grid_not_every_missed_one() -> None:
    now = T0 + timedelta(hours=5, seconds=30)
    assert every(3600).next_slot(T0, now) == T0 + timedelta(hours=6)


def test_a_slot_still_ahead_is_kept() -> None:
    ahead = T0 + timedelta(minutes=30)
    assert every(3600).next_slot(ahead, T0) == ahead


def test_a_run_ending_exactly_on_a_slot_moves_to_the_following_one() -> None:
    assert every(60).next_slot(T0, T0 + timedelta(minutes=2)) == T0 + timedelta(minutes=3)


def test_manual_only_jobs_have_no_next_slot() -> None:
    assert Schedule.from_row(None, None, "UTC").next_slot(T0, T0) is None


def test_cron_slots_follow_the_timezone() -> None:
    sched = Schedule.from_row(None, "0 3 * * *", "Europe/Berlin")
    assert sched.next_slot(None, T0) == datetime(2026, 3, 2, 2, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("interval", "cron", "tz", "message"),
    [
        (60, "* * * * *", "UTC", "not both"),
        (0, None, "UTC", "must be positive"),
        (None, "61 * * * *", "UTC", "minute"),
        (None, None, "Mars/Olympus", 'unknown timezone "Mars/Olympus"'),
    ],
)
def test_unusable_schedules_say_why(interval: int | None, cron: str | None, tz: str, message: str) -> None:
    with pytest.raises(ScheduleError, match=message):
        Schedule.from_row(interval, cron, tz)


def test_retry_delay_doubles_is_jittered_and_capped() -> None:
    assert retry_delay(1, 60, rand=0.5) == 60
    assert retry_delay(2, 60, rand=0.5) == 120
    assert retry_delay(3, 60, rand=0.5) == 240
    assert retry_delay(1, 60, rand=0.0) == pytest.approx(48)
    assert retry_delay(1, 60, rand=0.999999) == pytest.approx(72, abs=0.01)
    assert retry_delay(40, 60, rand=0.5, cap_seconds=3600) == 3600
    assert retry_delay(10_000, 60, rand=0.5) == schedule.DEFAULT_MAX_BACKOFF


def test_failure_keeps_the_schedule_slot_aside_while_retrying() -> None:
    plan = schedule.after_failure(
        every(3600),
        T0,
        T0 + timedelta(seconds=5),
        retry_count=0,
        max_retries=3,
        backoff_seconds=60,
        rand=0.5,
        error="boom",
    )
    assert plan.retry_count == 1 and plan.disabled_reason is None
    assert plan.next_sync_at == T0 + timedelta(seconds=65)
    assert plan.scheduled_sync_at == T0 + timedelta(hours=1)


def test_max_retries_counts_retries_after_the_first_failure() -> None:
    def fail(retry_count: int, max_retries: int) -> schedule.Plan:
        return schedule.after_failure(
            every(3600),
            T0,
            T0,
            retry_count=retry_count,
            max_retries=max_retries,
            backoff_seconds=60,
            rand=0.5,
            error="HTTP 503 from api.example",
        )

    # max_retries = 3: the first failure and three retries (after 1, 2 and 4 minutes), then disabled.
    delays = [fail(n, 3).next_sync_at for n in range(3)]
    assert delays == [T0 + timedelta(minutes=m) for m in (1, 2, 4)]
    assert [fail(n, 3).disabled_reason for n in range(3)] == [None, None, None]
    plan = fail(3, 3)
    assert plan.retry_count == 4
    assert plan.disabled_reason == "disabled after 4 failures in a row; last error: HTTP 503 from api.example"
    assert plan.next_sync_at == T0 + timedelta(hours=1)  # where the schedule resumes once re-enabled
    # max_retries = 0: never retried, and the reason reads as English.
    assert fail(0, 0).disabled_reason == "disabled after 1 failure; last error: HTTP 503 from api.example"
    assert fail(0, 1).disabled_reason is None


def test_success_resets_retries_and_returns_to_the_grid() -> None:
    plan = schedule.after_success(every(600), T0, T0 + timedelta(seconds=1))
    assert plan == schedule.Plan(T0 + timedelta(minutes=10), T0 + timedelta(minutes=10), None, 0)


def test_period_is_the_interval_or_the_gap_between_cron_slots() -> None:
    now = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
    assert Schedule.from_row(90, None, "UTC").period_seconds(now) == 90
    assert Schedule.from_row(None, "*/15 * * * *", "UTC").period_seconds(now) == 900
    assert Schedule.from_row(None, "0 3 * * *", "Europe/Berlin").period_seconds(now) == 86400
    assert Schedule.from_row(None, None, "UTC").period_seconds(now) is None
