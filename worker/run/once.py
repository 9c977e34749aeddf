"""`syncworker run-once NAME [--dry-run]`: one run of one job in the foreground."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import dict_row

from worker import db
from worker.connectors import sql
from worker.connectors.base import ConfigError, RunResult
from worker.daemon import settings
from worker.db import environment
from worker.db.queries import Q
from worker.run.outcome import classify
from worker.run.rowcheck import Problem, problems
from worker.run.runner import Job, Runner


class OneShotError(Exception):
    """The job cannot be run now (unknown name, already running)."""


@dataclass(frozen=True)
class OneShot:
    status: str | None  # the run's final status; None for a dry run or a run given up
    run_id: int | None
    result: RunResult | None = None  # dry runs: what would have been written
    state: dict[str, Any] | None = None
    failed_records: int = 0


async def run_once(
    url: str,
    name: str,
    *,
    dry_run: bool = False,
    local_check: bool = True,
    allow_superuser_jobs: bool | None = None,
) -> OneShot:
    """One run of `name` now, recorded like any other (a dry run records nothing).

    With `local_check` (the command line), a job this process cannot run for reasons of its
    own environment (a module not on its path, a secret it cannot read) is not run at all:
    OneShotError, and the job is left as it is.  Without it, such a job fails and is
    disabled as it would on a worker whose environment lacks them. `allow_superuser_jobs`
    (default: SYNCWORKER_ALLOW_SUPERUSER_JOBS) is the worker's --allow-superuser-jobs.
    """
    allow = settings.allow_superuser_jobs(allow_superuser_jobs)
    runner = Runner(allow_superuser_jobs=allow)
    # The worker's session settings: a timeout the database or role sets by default must not
    # cut this run short any more than a worker's.
    runner.settings_statement = db.settings_statement()
    async with await environment.connect_own(url, "syncworker run-once") as conn:
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(Q["integration_by_name"], {"name": name})
        row = await cur.fetchone()
        if row is None:
            raise OneShotError(f'no integration named "{name}"')
        # A module or secret this shell lacks says nothing of the job: never record it as
        # the job's failure (the worker, whose environment it is, may run it fine).
        problem = problems(row, resolve_secrets=True) if local_check else None
        if local_check and problem is None:
            problem = await _session_problem(conn, row, allow)
        if problem is not None and problem.local:
            raise OneShotError(
                f"{name}: this shell cannot run it ({problem.message}); the job was left as it is. "
                f"Run it where the worker runs, or ask a worker: syncworker trigger {name}"
            )
        if dry_run:
            return await _dry_run(runner, conn, row)
        claimed = await _claim(conn, row)
        # From here on the runner releases the lock, after the run's final commit.
        job = Job.from_row(claimed)
        status = await runner.run_on(conn, job)
        return OneShot(status, job.run_id)


async def _session_problem(
    conn: psycopg.AsyncConnection[Any], row: dict[str, Any], allow: bool
) -> Problem | None:
    """A `sql` job this session may not run as it stands (a superuser's session, a run_as role
    it is not a member of): the worker's own session may well be another."""
    found = sql.on_control_session(row["kind"], json.loads(row["config"]))
    if found is None:
        return None
    (run_as,) = found
    reason = sql.refusal(run_as, await sql.check_session(conn, run_as), allow_superuser=allow)
    return None if reason is None else Problem(f"run_as: {reason}", local=True)


async def _dry_run(runner: Runner, conn: psycopg.AsyncConnection[Any], row: dict[str, Any]) -> OneShot:
    """The run, rolled back: what it would have written."""
    name = row["name"]
    job = Job.from_row(
        {**row, "run_id": 0, "trigger": "manual", "attempt": row["retry_count"] + 1}
        | {"scheduled_for": None, "locked_at": None}
    )
    try:
        result, ctx = await runner.preview(conn, job)
    except ConfigError:
        raise
    except Exception as exc:
        # an unset secret, an open circuit breaker, an unreachable source: one line
        failure = classify(exc, timed_out=isinstance(exc, TimeoutError))
        message = failure.message.removeprefix(f"{type(exc).__name__}: ")
        raise OneShotError(f"dry run of {name} failed: {failure.error_type}: {message}") from None
    state = ctx.state if result.state is None else result.state
    return OneShot(None, None, result, state, ctx.failed_records)


async def _claim(conn: psycopg.AsyncConnection[Any], row: dict[str, Any]) -> dict[str, Any]:
    """Take the job's lock on this session and open a manual run of it, unless a worker has it."""
    name = row["name"]
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(Q["try_lock_integration"], {"integration_id": row["id"]})
    locked = await cur.fetchone()
    if not locked or not locked["locked"]:
        raise OneShotError(f"{name} is running on a worker right now; try again when it finishes")
    try:
        await cur.execute(Q["claim_by_name"], {"name": name})
        claimed = await cur.fetchone()
    except psycopg.errors.LockNotAvailable:
        claimed = None
    if claimed is None:
        await conn.execute(Q["unlock_integration"], {"integration_id": row["id"]})
        raise OneShotError(f"{name} is being started by a worker right now")
    return claimed
