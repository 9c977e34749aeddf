"""Validation of a whole integration row, as `syncworker check` and the runner see it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from worker import connectors, db, secrets
from worker.connectors.base import EnvironmentProblem
from worker.run import hooks, schedule
from worker.run.outcome import config_problem


@dataclass(frozen=True)
class Problem:
    """What is wrong with a row.  `local`: the row may be fine, but this process cannot use
    it (a module not on its path, a secret it cannot read), so it says nothing of the row."""

    message: str
    local: bool = False


def problems(row: Mapping[str, Any], *, resolve_secrets: bool = False) -> Problem | None:
    """None if the row can run here; else what is wrong with it, in one line.

    Parsed exactly as the runner parses it (schedule, after_success, the connector's
    config).  With `resolve_secrets`, every secret reference in the config is also read.
    """
    if isinstance(row["config"], str):  # as the queries send it
        row = dict(row)
        if unreadable := db.read_json(row, "config"):
            return Problem(unreadable)
    try:
        schedule.Schedule.from_row(row["interval_seconds"], row["cron"], row["timezone"])
        body, _ = hooks.split(row["config"])
        connectors.get(row["kind"]).validate(body)
    except EnvironmentProblem as exc:
        return Problem(secrets.redact(str(exc)), local=True)
    except Exception as exc:
        return Problem(config_problem(exc))
    if resolve_secrets:
        for field, reference in references(row["config"]):
            try:
                secrets.resolve(reference, field)
            except secrets.SecretError as exc:
                return Problem(secrets.redact(str(exc)), local=True)
    return None


def references(value: Any, field: str = "") -> list[tuple[str, Any]]:
    """Every secret reference in a config, with the dotted path of the field holding it."""
    if secrets.is_reference(value):
        return [(field, value)]
    if isinstance(value, Mapping):
        return [
            found for key, item in value.items() for found in references(item, f"{field}.{key}".lstrip("."))
        ]
    if isinstance(value, list):
        return [found for i, item in enumerate(value) for found in references(item, f"{field}[{i}]")]
    return []
