"""What the commands share: one-line errors, the session on the control database, and the
shapes of their reports (tables, ages, durations, JSON values)."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import psycopg
from psycopg.rows import dict_row

from worker import db
from worker.db.queries import Q


class CliError(Exception):
    """An expected failure: printed as one line, exit status 1.

    The database and how it was chosen are added to the message unless it names them already.
    """

    def __init__(self, message: str, *, names_database: bool = False) -> None:
        super().__init__(message)
        self.names_database = names_database


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def connect(target: db.Target, *, schema: bool = True) -> psycopg.Connection[dict[str, Any]]:
    """A session on the control database; with `schema`, one that has the syncworker schema."""
    conn = psycopg.connect(
        target.url, autocommit=True, row_factory=dict_row, **db.connect_kwargs("syncworker cli")
    )
    if schema:
        from worker.db.migrate import require_head

        try:
            # SchemaMismatch unless the schema is at the revision this code knows.
            require_head(conn, target.describe(), missing=db.no_schema(target))
        except BaseException:
            conn.close()
            raise
    return conn


def say_database(target: db.Target) -> None:
    """Which database a report comes from, on stderr so that stdout stays the report itself."""
    print(f"syncworker: database {target.describe()}", file=sys.stderr)


# Worst first: the order `syncworker status` lists health words in. A word this list does not
# know yet ranks with the problems, before `pending` and `ok`.
HEALTH_ORDER = ("disabled", "paused", "failing", "stale", "overrunning", "late", "degraded", "pending", "ok")


def health_rank(health: str | None) -> float:
    if health in HEALTH_ORDER:
        return HEALTH_ORDER.index(health)
    return HEALTH_ORDER.index("pending") - 0.5


def json_default(value: Any) -> Any:
    """numeric columns as JSON numbers, times as ISO 8601 strings."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    return str(value)


def integration_row(conn: psycopg.Connection[dict[str, Any]], name: str) -> dict[str, Any]:
    row = conn.execute(Q["integration_by_name"], {"name": name}).fetchone()
    if row is None:
        raise CliError(f'no integration named "{name}"')
    problem = db.read_json(row, "config", "state")
    if problem:
        raise CliError(f"{name}: {problem}")
    return row


def integration_id(conn: psycopg.Connection[dict[str, Any]], name: str) -> int:
    """A job's id by name, reading no more than an operator may (not its config or state)."""
    row = conn.execute(Q["integration_id_by_name"], {"name": name}).fetchone()
    if row is None:
        raise CliError(f'no integration named "{name}"')
    return int(row["id"])


def job_problems(
    conn: psycopg.Connection[dict[str, Any]], rows: list[dict[str, Any]], allow_superuser: bool
) -> list[tuple[str, Any]]:
    """(name, rowcheck.Problem) of each job `check` reports: a row that cannot run, or a `sql`
    job that a worker connecting as this session does would refuse (a superuser's session
    without run_as, a run_as role this login is not a member of: a warning, since the worker
    may connect as another login)."""
    from worker.connectors import sql
    from worker.run.rowcheck import Problem, problems

    def refused(row: dict[str, Any]) -> Problem | None:
        found = sql.on_control_session(row["kind"], json.loads(row["config"]))
        if found is None:
            return None
        (run_as,) = found
        reason = sql.refusal(run_as, sql.check_session_sync(conn, run_as), allow_superuser=allow_superuser)
        return None if reason is None else Problem(f"run_as: {reason}", local=True)

    return [
        (row["name"], problem)
        for row in rows
        if (problem := problems(row, resolve_secrets=True) or refused(row))
    ]


def postgres_job(target: db.Target, name: str) -> Any:
    from worker.connectors.postgres.tools import postgres_config

    with connect(target) as conn:
        job = integration_row(conn, name)
    return postgres_config(job["kind"], job["config"], name)


def render_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(str(cell).ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in [header, *rows]
    ]
    return "\n".join(lines)


def format_duration(seconds: float) -> str:
    seconds = abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def ago(when: datetime | None, now: datetime) -> str:
    return "-" if when is None else f"{format_duration((now - when).total_seconds())} ago"


def format_ms(ms: Any) -> str:
    if ms is None:
        return "-"
    ms = float(ms)
    return f"{ms:.0f}ms" if ms < 10_000 else format_duration(ms / 1000)


def shorten(text: str | None, width: int = 60) -> str:
    if not text:
        return "-"
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
