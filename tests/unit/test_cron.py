"""Cron parsing and next fire times, including both DST transitions in two zones."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from worker.run.cron import CronError, next_after, parse

NY = ZoneInfo("America/New_York")
BERLIN = ZoneInfo("Europe/Berlin")


UTC_ZONE = ZoneInfo("UTC")


def fires(expr: str, start: datetime, count: int, tz: ZoneInfo = UTC_ZONE) -> list[datetime]:
    spec, out, at = parse(expr), [], start
    for _ in range(count):
        at = next_after(spec, at, tz)
        out.append(at)
    return out


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.mark.parametrize(
    "expr",
    [
        "* * * * *",
        "*/15 * * * *",
        "0 3 * * *",
        "10-50/20 * * * *",
        "5/15 * * * *",
        "0 9 * * mon-fri",
        "0 0 1 jan,jul *",
        "0 0 * * 7",
        "@daily",
        "@HOURLY",
        "  0   3 * * *  ",
        "59 23 31 12 sat",
    ],
)
def test_valid_expressions_parse(expr: str) -> None:
    parse(expr)


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("", "expected 5 fields"),
        ("* * * *", "expected 5 fields (minute hour day-of-month month day-of-week), got 4"),
        ("* * * * * *", "got 6"),
        ("61 * * * *", 'minute field "61" is out of range 0-59'),
        ("* 24 * * *", 'hour field "24" is out of range 0-23'),
        ("* * 0 * *", 'day-of-month field "0" is out of range 1-31'),
        ("* * * 13 *", 'month field "13" is out of range 1-12'),
        ("* * * * 8", 'day-of-week field "8" is out of range 0-7'),
        ("5-1 * * * *", 'minute field "5-1" has a reversed range 5-1'),
        ("*/0 * * * *", "has step '0', expected a positive number"),
        ("1,,2 * * * *", "has an empty list item"),
        ("* * * * funday", "day-of-week field \"funday\" has 'funday', expected a number or a name"),
        ("x * * * *", "minute field \"x\" has 'x', expected a number"),
        ("* * * mon *", "month field \"mon\" has 'mon'"),
        ("@reboot", "expected 5 fields"),
    ],
)
def test_invalid_expressions_name_the_field(expr: str, message: str) -> None:
    with pytest.raises(CronError) as err:
        parse(expr)
    assert message in str(err.value)


def test_every_five_minutes() -> None:
    assert fires("*/5 * * * *", utc(2026, 1, 1, 10, 3), 3) == [
        utc(2026, 1, 1, 10, 5),
        utc(2026, 1, 1, 10, 10),
        utc(2026, 1, 1, 10, 15),
    ]


def test_strictly_after() -> None:
    assert fires("0 3 * * *", utc(2026, 1, 1, 3, 0), 1) == [utc(2026, 1, 2, 3, 0)]


def test_weekdays_skip_the_weekend() -> None:
    # 2026-01-02 is a Friday.
    assert fires("0 9 * * mon-fri", utc(2026, 1, 2, 10), 2) == [utc(2026, 1, 5, 9), utc(2026, 1, 6, 9)]


def test_month_and_year_rollover() -> None:
    assert fires("59 23 * * *", utc(2026, 12, 31, 23, 59), 1) == [utc(2027, 1, 1, 23, 59)]
    assert fires("0 0 1 * *", utc(2026, 1, 31, 12), 2) == [utc(2026, 2, 1), utc(2026, 3, 1)]


def test_leap_day() -> None:
    assert fires("0 0 29 2 *", utc(2026, 3, 1), 1) == [utc(2028, 2, 29)]


def test_impossible_dates_are_an_error() -> None:
    with pytest.raises(CronError, match="never fires"):
        fires("0 0 30 2 *", utc(2026, 1, 1), 1)


def test_day_of_month_or_day_of_week_when_both_are_restricted() -> None:
    # The 13th, or any Friday: 2026-02-06 (Fri), 2026-02-13 (Fri and 13th), 2026-02-20 (Fri).
    assert fires("0 0 13 * fri", utc(2026, 2, 1), 3) == [utc(2026, 2, 6), utc(2026, 2, 13), utc(2026, 2, 20)]
    # With a star, both must match: the 13th only when it is a Friday (next: 2026-03-13).
    assert fires("0 0 13 * *", utc(2026, 2, 14), 1) == [utc(2026, 3, 13)]


@pytest.mark.parametrize(
    ("tz", "spring", "fall"),
    [
        (NY, (2026, 3, 8), (2026, 11, 1)),
        (BERLIN, (2026, 3, 29), (2026, 10, 25)),
    ],
)
def test_daily_job_in_the_skipped_and_repeated_hour_runs_exactly_once(
    tz: ZoneInfo, spring: tuple[int, int, int], fall: tuple[int, int, int]
) -> None:
    # 02:30 does not exist on the spring day: it runs once, at 03:00 local (the end of the gap).
    runs = fires("30 2 * * *", datetime(*spring, tzinfo=tz).replace(hour=0), 2, tz)
    assert [r.astimezone(tz).strftime("%d %H:%M") for r in runs] == [
        f"{spring[2]:02d} 03:00",
        f"{spring[2] + 1:02d} 02:30",
    ]
    # 02:30 (Berlin) or 01:30 (New York) happens twice on the fall day: it runs once, the first time.
    hour = 2 if tz is BERLIN else 1
    runs = fires(f"30 {hour} * * *", datetime(*fall, tzinfo=tz).replace(hour=0), 2, tz)
    first = runs[0].astimezone(tz)
    assert (first.day, first.hour, first.minute, first.fold) == (fall[2], hour, 30, 0)
    assert runs[1].astimezone(tz).day == fall[2] + 1


def test_hourly_through_spring_forward_new_york() -> None:
    runs = fires("0 * * * *", utc(2026, 3, 8, 5, 30), 4, NY)  # 00:30 EST
    assert runs == [utc(2026, 3, 8, 6), utc(2026, 3, 8, 7), utc(2026, 3, 8, 8), utc(2026, 3, 8, 9)]
    assert [r.astimezone(NY).strftime("%H:%M %Z") for r in runs] == [
        "01:00 EST",
        "03:00 EDT",
        "04:00 EDT",
        "05:00 EDT",
    ]


def test_hourly_through_fall_back_new_york_fires_each_wall_time_once() -> None:
    runs = fires("0 * * * *", utc(2026, 11, 1, 4, 30), 4, NY)  # 00:30 EDT
    # 01:00 EDT, then the repeated 01:00 (EST) is not fired again, then 02:00 EST.
    assert runs == [utc(2026, 11, 1, 5), utc(2026, 11, 1, 7), utc(2026, 11, 1, 8), utc(2026, 11, 1, 9)]
    assert len(set(runs)) == len(runs)


def test_half_hourly_across_the_berlin_gap() -> None:
    runs = fires("*/30 * * * *", utc(2026, 3, 29, 0, 15), 4, BERLIN)  # 01:15 CET
    assert [r.astimezone(BERLIN).strftime("%H:%M") for r in runs] == ["01:30", "03:00", "03:30", "04:00"]
    assert runs[1] == utc(2026, 3, 29, 1, 0)
