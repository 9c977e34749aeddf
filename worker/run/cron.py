"""Five-field cron expressions: parsing, and the next fire time in a timezone, DST included."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
MONTH_NAMES = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
MONTHS = {m: i for i, m in enumerate(MONTH_NAMES, 1)}
DAYS = {d: i for i, d in enumerate(["sun", "mon", "tue", "wed", "thu", "fri", "sat"])}
# (name, lowest, highest, names allowed)
FIELDS: tuple[tuple[str, int, int, dict[str, int]], ...] = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day-of-month", 1, 31, {}),
    ("month", 1, 12, MONTHS),
    ("day-of-week", 0, 7, DAYS),
)
# The most days each month can have (February: in leap years).
MONTH_DAYS = {1: 31, 2: 29, 3: 31, 4: 30, 5: 31, 6: 30, 7: 31, 8: 31, 9: 30, 10: 31, 11: 30, 12: 31}
# A schedule that matches nothing within this many days never matches ("0 0 30 2 *").
SEARCH_DAYS = 366 * 5


class CronError(ValueError):
    """A cron expression that does not parse; the message names the field."""


@dataclass(frozen=True)
class CronSpec:
    minutes: frozenset[int]
    hours: frozenset[int]
    days_of_month: frozenset[int]
    months: frozenset[int]
    days_of_week: frozenset[int]  # 0 = Sunday
    dom_restricted: bool
    dow_restricted: bool

    def matches_day(self, day: date) -> bool:
        if day.month not in self.months:
            return False
        dom = day.day in self.days_of_month
        dow = day.isoweekday() % 7 in self.days_of_week
        # Vixie cron: when both day fields are restricted, either one may match.
        if self.dom_restricted and self.dow_restricted:
            return dom or dow
        return dom and dow


def parse(expr: str) -> CronSpec:
    """Parse a 5-field expression (or an @macro); CronError says what is wrong."""
    text = expr.strip()
    fields = MACROS.get(text.lower(), text).split()
    if len(fields) != 5:
        raise CronError(
            f'cron "{expr}": expected 5 fields (minute hour day-of-month month day-of-week), '
            f"got {len(fields)}"
        )
    values = [_field(expr, raw, *spec) for raw, spec in zip(fields, FIELDS, strict=True)]
    dows = frozenset(0 if d == 7 else d for d in values[4])
    dom_restricted = not fields[2].startswith("*")
    dow_restricted = not fields[4].startswith("*")
    # Either day field may match when both are restricted; otherwise the day of month
    # must exist in one of the months (February has a 29th in leap years).
    if not (dom_restricted and dow_restricted) and not any(
        day <= MONTH_DAYS[month] for month in values[3] for day in values[2]
    ):
        raise CronError(f'cron "{expr}" never fires: none of its months has the day of month it asks for')
    return CronSpec(
        minutes=frozenset(values[0]),
        hours=frozenset(values[1]),
        days_of_month=frozenset(values[2]),
        months=frozenset(values[3]),
        days_of_week=dows,
        dom_restricted=dom_restricted,
        dow_restricted=dow_restricted,
    )


def _field(expr: str, raw: str, name: str, low: int, high: int, names: dict[str, int]) -> set[int]:
    def fail(problem: str) -> CronError:
        return CronError(f'cron "{expr}": {name} field "{raw}" {problem}')

    def number(token: str) -> int:
        if token.isdigit():
            value = int(token)
        elif token.lower() in names:
            value = names[token.lower()]
        else:
            return _raise(fail(f"has {token!r}, expected a number{' or a name' if names else ''}"))
        if not low <= value <= high:
            raise fail(f"is out of range {low}-{high}")
        return value

    found: set[int] = set()
    for item in raw.split(","):
        if not item:
            raise fail("has an empty list item")
        base, slash, step_text = item.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or int(step_text) == 0:
                raise fail(f"has step {step_text!r}, expected a positive number")
            step = int(step_text)
        if base == "*":
            start, end = low, high
        elif "-" in base:
            first, _, last = base.partition("-")
            start, end = number(first), number(last)
            if start > end:
                raise fail(f"has a reversed range {base}")
        else:
            start = number(base)
            end = high if slash else start
        found.update(range(start, end + 1, step))
    return found


def _raise(exc: Exception) -> int:
    raise exc


def next_after(spec: CronSpec, after: datetime, tz: ZoneInfo) -> datetime:
    """The first fire time strictly after `after`, as an aware UTC datetime.

    Fire times are wall-clock times in `tz`.  On a spring-forward day a time that
    does not exist (02:30 when clocks jump from 02:00 to 03:00) fires once, at the
    first instant after the gap; on a fall-back day a time that occurs twice fires
    once, at its first occurrence.
    """
    after = after.astimezone(UTC)
    local = after.astimezone(tz).replace(tzinfo=None)
    hours = sorted(spec.hours)
    minutes = sorted(spec.minutes)
    for offset in range(SEARCH_DAYS):
        day = local.date() + timedelta(days=offset)
        if not spec.matches_day(day):
            continue
        for hour in hours:
            # Hours well before `after` on its own day cannot be later than it.
            if offset == 0 and hour < local.hour - 3:
                continue
            for minute in minutes:
                instant = _to_utc(datetime.combine(day, time(hour, minute)), tz)
                if instant > after:
                    return instant
    raise CronError(f"cron expression never fires within {SEARCH_DAYS // 366} years")


def _to_utc(wall: datetime, tz: ZoneInfo) -> datetime:
    """The instant of a local wall-clock time: first occurrence, or the end of a DST gap."""
    first = wall.replace(tzinfo=tz, fold=0).astimezone(UTC)
    if first.astimezone(tz).replace(tzinfo=None) == wall:
        return first
    # `wall` falls in a gap.  fold=1 reads it with the offset after the transition,
    # which gives an instant before the gap; `first` lies after it.  The transition
    # is the first instant whose wall time is past `wall`.
    low = wall.replace(tzinfo=tz, fold=1).astimezone(UTC)
    high = first
    while high - low > timedelta(seconds=1):
        middle = low + (high - low) / 2
        if middle.astimezone(tz).replace(tzinfo=None) > wall:
            high = middle
        else:
            low = middle
    return high.replace(microsecond=0)
