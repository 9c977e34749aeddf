"""Pure schedule and retry math: when does a job run next, and what happens after a run."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from worker.run.cron import CronError, CronSpec, next_after
from worker.run.cron import parse as parse_cron

# Retry delays never exceed this, whatever retry_backoff_seconds and the attempt are.
DEFAULT_MAX_BACKOFF = 6 * 3600.0
# Each delay is spread over [1 - JITTER, 1 + JITTER] of its nominal value so that
# jobs failing together (one upstream outage) do not retry in lockstep.
JITTER = 0.2


class ScheduleError(ValueError):
    """A row's schedule cannot be used (bad timezone or cron expression)."""


@dataclass(frozen=True)
class Schedule:
    interval_seconds: int | None
    cron: CronSpec | None
    tz: ZoneInfo

    @classmethod
    def from_row(cls, interval_seconds: int | None, cron_expr: str | None, timezone: str) -> Schedule:
        if interval_seconds is not None and cron_expr is not None:
            raise ScheduleError("set interval_seconds or cron, not both")
        if interval_seconds is not None and interval_seconds <= 0:
            raise ScheduleError(f"interval_seconds must be positive, got {interval_seconds}")
        try:
            tz = ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ScheduleError(f'unknown timezone "{timezone}"') from exc
        try:
            spec = parse_cron(cron_expr) if cron_expr is not None else None
        except CronError as exc:
            raise ScheduleError(str(exc)) from exc
        return cls(interval_seconds, spec, tz)

    def next_slot_or_none(self, anchor: datetime | None, now: datetime) -> datetime | None:
        """`next_slot`, or None when the schedule has no next slot (a cron that no longer fires)."""
        try:
            return self.next_slot(anchor, now)
        except CronError:
            return None

    @property
    def manual_only(self) -> bool:
        return self.interval_seconds is None and self.cron is None

    def next_slot(self, anchor: datetime | None, now: datetime) -> datetime | None:
        """The first slot strictly after `now`, or `anchor` itself if it is still ahead.

        Interval slots are `anchor + k * interval`: they stay on the grid the
        schedule started on, however long runs take, and after downtime the
        next slot is the next one on the grid (one catch-up run, not one per
        missed slot).  Cron slots follow the row's timezone.
        """
        if self.interval_seconds is not None:
            step = timedelta(seconds=self.interval_seconds)
            if anchor is None:
                return now + step
            if anchor > now:
                return anchor
            return anchor + ((now - anchor) // step + 1) * step
        if self.cron is not None:
            return next_after(self.cron, now, self.tz)
        return None

    def period_seconds(self, now: datetime) -> float | None:
        """The usual gap between runs: the interval, or the gap between cron's next two slots."""
        if self.interval_seconds is not None:
            return float(self.interval_seconds)
        if self.cron is not None:
            first = next_after(self.cron, now, self.tz)
            return (next_after(self.cron, first, self.tz) - first).total_seconds()
        return None


def retry_delay(
    failures: int, base_seconds: float, rand: float, cap_seconds: float = DEFAULT_MAX_BACKOFF
) -> float:
    """Seconds before the next attempt after `failures` failures in a row (>= 1).

    `base_seconds` doubles per failure, is jittered by `rand` in [0, 1), and
    never exceeds `cap_seconds`.
    """
    nominal = base_seconds * 2 ** min(max(failures, 1) - 1, 62)
    jittered = nominal * (1 - JITTER + 2 * JITTER * rand)
    return max(0.0, min(float(jittered), cap_seconds))


@dataclass(frozen=True)
class Plan:
    """What to write to the integration row when a run ends."""

    next_sync_at: datetime | None
    slot: datetime | None  # the schedule's own next slot
    scheduled_sync_at: datetime | None  # the slot kept aside while a retry moves next_sync_at
    retry_count: int
    disabled_reason: str | None = None


def after_success(schedule: Schedule, anchor: datetime | None, now: datetime) -> Plan:
    slot = schedule.next_slot(anchor, now)
    return Plan(next_sync_at=slot, slot=slot, scheduled_sync_at=None, retry_count=0)


def after_failure(
    schedule: Schedule,
    anchor: datetime | None,
    now: datetime,
    *,
    retry_count: int,
    max_retries: int,
    backoff_seconds: float,
    rand: float,
    error: str,
    max_backoff: float = DEFAULT_MAX_BACKOFF,
) -> Plan:
    failures = retry_count + 1
    slot = schedule.next_slot(anchor, now)
    if failures > max_retries:  # max_retries counts the retries after the first failure
        times = "1 failure" if failures == 1 else f"{failures} failures in a row"
        reason = f"disabled after {times}; last error: {error}"
        return Plan(
            next_sync_at=slot,
            slot=slot,
            scheduled_sync_at=None,
            retry_count=failures,
            disabled_reason=reason[:1000],
        )
    delay = retry_delay(failures, backoff_seconds, rand, max_backoff)
    return Plan(
        next_sync_at=now + timedelta(seconds=delay),
        slot=slot,
        scheduled_sync_at=slot,
        retry_count=failures,
    )


def after_invalid_config(slot: datetime | None, retry_count: int, problem: str) -> Plan:
    return Plan(
        next_sync_at=slot,
        slot=slot,
        scheduled_sync_at=None,
        retry_count=retry_count,
        disabled_reason=f"invalid configuration: {problem}"[:1000],
    )
