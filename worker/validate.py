"""Validation of a whole integration row, as `syncworker check` and the runner see it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from worker import connectors, hooks, schedule
from worker.connectors.base import ConfigError
from worker.secrets import redact


def problems(row: Mapping[str, Any]) -> str | None:
    """None if the row can run; else one line saying what is wrong with it."""
    try:
        schedule.Schedule.from_row(row["interval_seconds"], row["cron"], row["timezone"])
        body, _ = hooks.split(row["config"])
        connectors.get(row["kind"]).validate(body)
    except (ConfigError, schedule.ScheduleError) as exc:
        return redact(str(exc))
    return None
