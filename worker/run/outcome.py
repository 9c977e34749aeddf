"""What a run's end means, decided without I/O: the run's status, its error, the job's next
slot (retry, schedule or disabled), the rows and parameters the runner then writes.

The runner executes and commits; everything it decides comes from here, so that each branch
(success, partial, failure, retry, disable, timeout, a row that cannot be read, a fence, a
shutdown) is a plain function call a unit test can make.
"""

from __future__ import annotations

import asyncio
import json
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from worker import db
from worker.connectors.base import ConfigError, FencedError, RecordError, RunResult, SyncError
from worker.errors import ErrorType
from worker.run import schedule
from worker.run.cron import CronError
from worker.secrets import SecretError, redact, redact_value

MAX_ERROR_TEXT = 2000


@dataclass(frozen=True)
class Job:
    """A claimed integration row together with the run opened for it."""

    id: int
    name: str
    kind: str
    config: dict[str, Any]
    state: dict[str, Any]
    interval_seconds: int | None
    cron: str | None
    timezone: str
    max_retries: int
    retry_backoff_seconds: int
    timeout_seconds: int
    retry_count: int
    run_id: int
    trigger: str
    attempt: int
    scheduled_for: datetime | None
    # When the run's session took the integration lock (database clock); None while
    # the run still waits for its session to take it (`begin_run`).
    locked_at: datetime | None
    # Why the row's config or state could not be read, if it could not (see db.read_json).
    unreadable: str | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Job:
        values = {name: row[name] for name in _ROW_FIELDS}
        values["unreadable"] = db.read_json(values, "config", "state")
        return cls(**values)


_ROW_FIELDS = tuple(name for name in Job.__dataclass_fields__ if name != "unreadable")


@dataclass(frozen=True)
class Failure:
    error_type: str
    message: str
    detail: str | None


@dataclass(frozen=True)
class Ending:
    """How a run ends: its status, why it failed (if it did) and the job's next slot."""

    status: str  # success | partial | failed
    failure: Failure | None
    plan: schedule.Plan


def classify(exc: BaseException, timed_out: bool) -> Failure:
    """The stable error_type and a one-line message for an exception raised by a run."""
    if timed_out:
        return Failure(ErrorType.TIMEOUT, "the run exceeded timeout_seconds and was cancelled", None)
    detail = redact("".join(traceback.format_exception(exc)))[-8000:]
    if isinstance(exc, ConfigError):
        return Failure(ErrorType.CONFIG_INVALID, redact(str(exc)), None)
    if isinstance(exc, SyncError):
        error_type = exc.error_type
    elif isinstance(exc, SecretError):
        error_type = ErrorType.SECRET_UNAVAILABLE
    elif server_timeout(exc) is not None:
        error_type = ErrorType.SERVER_TIMEOUT
    elif isinstance(exc, psycopg.OperationalError):
        error_type = ErrorType.CONNECTION
    elif isinstance(exc, psycopg.Error):
        error_type = ErrorType.SQL_ERROR
    elif isinstance(exc, OSError | ConnectionError):
        error_type = ErrorType.CONNECTION
    else:
        error_type = ErrorType.EXCEPTION
    message = redact(f"{type(exc).__name__}: {exc}".strip().rstrip(":"))
    return Failure(error_type, message[:MAX_ERROR_TEXT], detail)


# A session the server ended for sitting idle (in a transaction or not): its own limit, not the job's.
_SESSION_ENDED = ("25P03", "57P05")  # idle_in_transaction_session_timeout, idle_session_timeout
# A statement the server cancelled on a limit of its own (not on a request: the worker's timeout).
_STATEMENT_CUT = {"57014": "statement timeout", "55P03": "lock timeout"}


def server_timeout(exc: BaseException) -> str | None:
    """The server's message if one of its timeouts (set for the server, the database or the
    role, or by the job) ended the session or cancelled a statement behind `exc`, else None."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, psycopg.Error):
            message = seen.diag.message_primary or str(seen)
            state = seen.sqlstate or ""
            if state in _SESSION_ENDED or (state in _STATEMENT_CUT and _STATEMENT_CUT[state] in message):
                return message
        seen = seen.__cause__
    return None


def interruption(exc: BaseException) -> str | None:
    """A run that ends without an ending of its own: `shutdown` (the worker is stopping: the
    job is handed back), `fenced` (another run is live: nothing may commit), else None."""
    if isinstance(exc, asyncio.CancelledError):
        return "shutdown"
    if isinstance(exc, FencedError):
        return "fenced"
    return None


def config_problem(exc: BaseException) -> str:
    """Why a job's row cannot be used, for `disabled_reason` (secrets masked).

    ConfigError and ScheduleError name the field; anything else a connector's `validate`
    raised is still a problem of that job's config, never of the worker.
    """
    if isinstance(exc, ConfigError | schedule.ScheduleError | CronError):
        return redact(str(exc))
    return redact(f"could not be read ({type(exc).__name__}: {exc})")[:MAX_ERROR_TEXT]


def bad_row(job: Job, sched: schedule.Schedule | None, now: datetime, exc: BaseException) -> Ending:
    """The row cannot be run at all (its config, kind or schedule): failed and disabled."""
    problem = config_problem(exc)
    slot = sched.next_slot_or_none(job.scheduled_for, now) if sched else None
    return Ending(
        "failed",
        Failure(ErrorType.CONFIG_INVALID, problem, None),
        schedule.after_invalid_config(slot, job.retry_count, problem),
    )


def succeeded(job: Job, sched: schedule.Schedule, now: datetime, failed_records: int) -> Ending:
    """The connector returned: `partial` if some records failed, else `success`; back on the
    schedule.  A cron that no longer fires disables the job (the data stays)."""
    status = "partial" if failed_records else "success"
    try:
        return Ending(status, None, schedule.after_success(sched, job.scheduled_for, now))
    except CronError as exc:
        return Ending(status, None, schedule.after_invalid_config(None, 0, config_problem(exc)))


def failed(
    job: Job,
    sched: schedule.Schedule | None,
    now: datetime,
    failure: Failure,
    *,
    rand: float,
    max_backoff: float = schedule.DEFAULT_MAX_BACKOFF,
) -> Ending:
    """The run failed: a retry after a backoff, or disabled once `max_retries` retries have
    failed too; a config problem disables at once."""
    if failure.error_type == ErrorType.CONFIG_INVALID:
        slot = sched.next_slot_or_none(job.scheduled_for, now) if sched else None
        return Ending(
            "failed", failure, schedule.after_invalid_config(slot, job.retry_count, failure.message)
        )
    try:
        sched = sched or schedule.Schedule.from_row(job.interval_seconds, job.cron, job.timezone)
        plan = schedule.after_failure(
            sched,
            job.scheduled_for,
            now,
            retry_count=job.retry_count,
            max_retries=job.max_retries,
            backoff_seconds=job.retry_backoff_seconds,
            rand=rand,
            error=failure.message,
            max_backoff=max_backoff,
        )
    except (schedule.ScheduleError, CronError) as exc:
        plan = schedule.after_invalid_config(None, job.retry_count, config_problem(exc))
    return Ending("failed", failure, plan)


def not_recorded(failure: Failure) -> Failure:
    """The run's final commit failed (the job left its transaction unusable): a failure."""
    return Failure(
        failure.error_type, f"the run could not be recorded: {failure.message}"[:MAX_ERROR_TEXT], None
    )


def disable_params(job: Job, ending: Ending) -> dict[str, Any]:
    """The parameters of `disable_after_run`: the job, why, and the alert's payload."""
    return {"integration_id": job.id, "reason": ending.plan.disabled_reason, "payload": alert(job, ending)}


def alert(job: Job, ending: Ending) -> str:
    """The JSON payload of `NOTIFY syncworker_alerts` when a job is disabled (always well
    under NOTIFY's 8000 bytes, whatever the name and the reason)."""
    return json.dumps(
        {
            "integration": job.name[:200],
            "integration_id": job.id,
            "run_id": job.run_id,
            "error_type": ending.failure and ending.failure.error_type[:100],
            "reason": ending.plan.disabled_reason and ending.plan.disabled_reason[:1000],
        }
    )


def text(value: str, limit: int = MAX_ERROR_TEXT) -> str:
    """An error text as stored: secrets masked, capped, and without NUL (text cannot hold it)."""
    return redact(str(value)).replace("\x00", "\\0")[:limit]


def error_rows(
    job: Job, ending: Ending, record_errors: list[RecordError], failed_records: int
) -> list[dict[str, Any]]:
    """The `sync_errors` rows of a run: each failed record kept, a count of those not kept,
    and the run's own failure (`context` is a plain value: the caller wraps it)."""
    base = {"integration_id": job.id, "run_id": job.run_id}
    rows = [
        {
            **base,
            "error_type": text(e.error_type, 100),
            "message": text(e.message),
            "detail": e.detail and text(e.detail, 8000),
            "record_key": e.record_key and text(e.record_key),
            "context": redact_value(e.context),
        }
        for e in record_errors
    ]
    if failed_records > len(record_errors):
        more = failed_records - len(record_errors)
        rows.append(run_error(job, ErrorType.RECORD_INVALID, f"{more} more failed records not kept"))
    if ending.failure is not None:
        failure = ending.failure
        rows.append(run_error(job, failure.error_type, failure.message, failure.detail))
    return rows


def run_error(job: Job, error_type: str, message: str, detail: str | None = None) -> dict[str, Any]:
    """One `sync_errors` row about the run itself, not a record (`context` is a plain value:
    the caller wraps it)."""
    return {
        "integration_id": job.id,
        "run_id": job.run_id,
        "error_type": error_type,
        "message": text(message),
        "detail": detail and text(detail, 8000),
        "record_key": None,
        "context": {},
    }


def finish_params(job: Job, ending: Ending, result: RunResult, failed_records: int) -> dict[str, Any]:
    """The parameters of `finish_run` (the state stays a plain value: the caller wraps it)."""
    failure, plan = ending.failure, ending.plan
    return {
        "run_id": job.run_id,
        "status": ending.status,
        "records_processed": result.records_processed,
        "records_failed": failed_records,
        "records_inserted": result.inserted,
        "records_updated": result.updated,
        "records_deleted": result.deleted,
        "error_type": failure and failure.error_type,
        "error": failure and failure.message,
        "state": result.state,
        "retry_count": plan.retry_count,
        "disabled_reason": plan.disabled_reason,
        "next_sync_at": plan.next_sync_at,
        "slot": plan.slot,
        "scheduled_sync_at": plan.scheduled_sync_at,
    }
