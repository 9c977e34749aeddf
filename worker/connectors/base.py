"""The connector interface: what a sync kind implements and what a run gives it."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import TupleRow

from worker.connectors.config import (
    ConfigError,
    EnvironmentProblem,
    check_secret,
    expect,
    identifier,
    reject_unknown,
    require,
)
from worker.errors import ErrorType

# The config helpers live in worker.connectors.config; plugins may import them from here too.
__all__ = [
    "FENCED_SQLSTATE",
    "MAX_RECORD_ERRORS_KEPT",
    "ConfigError",
    "Connector",
    "EnvironmentProblem",
    "FencedError",
    "RealtimeSource",
    "RecordError",
    "RunContext",
    "RunResult",
    "SyncError",
    "check_secret",
    "expect",
    "identifier",
    "is_fence",
    "reject_unknown",
    "require",
]

# Per-record errors kept in full for one run; beyond this only the count grows,
# so a source that rejects millions of records cannot exhaust memory.
MAX_RECORD_ERRORS_KEPT = 10_000


class SyncError(Exception):
    """A failure from the outside world; `error_type` is the stable code stored with it."""

    error_type: str = ErrorType.SYNC_FAILED

    def __init__(self, message: str, *, error_type: str | None = None) -> None:
        super().__init__(message)
        if error_type is not None:
            self.error_type = error_type


class FencedError(Exception):
    """This run is no longer the live run of its integration: it must not commit anything."""


# The SQLSTATE `syncworker.fenced()` raises: the one place a database error becomes a fence.
FENCED_SQLSTATE = "SWF01"


def is_fence(exc: BaseException) -> bool:
    """Is `exc` the database saying that the run is fenced off (`syncworker.fenced()`)?"""
    return isinstance(exc, FencedError) or getattr(exc, "sqlstate", None) == FENCED_SQLSTATE


@dataclass
class RunResult:
    """What a connector reports when it finishes.

    `state=None` leaves the stored state as it is.  Failed records are the ones
    reported with `RunContext.record_error`; they make the run `partial`.
    """

    state: dict[str, Any] | None = None
    records_processed: int = 0
    inserted: int = 0
    updated: int = 0
    deleted: int = 0
    # dry runs: some keys that would be inserted / updated / deleted
    preview: dict[str, list[str]] | None = None


@dataclass
class RecordError:
    error_type: str
    message: str
    record_key: str | None
    detail: str | None
    context: dict[str, Any]


@dataclass
class RunContext:
    """Everything a connector may use during one run.

    `conn` is the run's own session on the control database.  It holds the
    integration lock and is in a transaction that commits together with the
    run's result: writes made through it land exactly once.  Connectors must not
    call `conn.commit()`; `checkpoint()` commits data and state together.
    """

    integration_id: int
    name: str
    kind: str
    run_id: int
    config: Any
    state: dict[str, Any]
    conn: AsyncConnection[TupleRow]
    log: logging.Logger | logging.LoggerAdapter[logging.Logger]
    trigger: str = "schedule"
    dry_run: bool = False
    # --allow-superuser-jobs: a sql job without run_as may run on a superuser's session
    allow_superuser_jobs: bool = False
    # the job's usual gap between runs (interval, or cron's next gap); None for manual-only jobs
    period_seconds: float | None = None
    # How `checkpoint` commits (the runner's, fenced on the run); None in a dry run: nothing commits.
    commit_state: Callable[[dict[str, Any]], Awaitable[None]] | None = None
    errors: list[RecordError] = field(default_factory=list)
    failed_records: int = 0
    _reported: set[tuple[str, str, str]] = field(default_factory=set)

    def record_error(
        self,
        record_key: object,
        message: str,
        *,
        error_type: str = "record_invalid",
        detail: str | None = None,
        context: Mapping[str, Any] | None = None,
    ) -> None:
        """Report one record that could not be synced; the rest of the run goes on.

        A record reported again with the same key and message (read twice in one
        run) counts once.
        """
        key = None if record_key is None else str(record_key)
        if key is not None:
            seen = (error_type, key, message)
            if seen in self._reported:
                return
            if len(self._reported) < MAX_RECORD_ERRORS_KEPT:
                self._reported.add(seen)
        self.failed_records += 1
        if len(self.errors) < MAX_RECORD_ERRORS_KEPT:
            self.errors.append(RecordError(error_type, message, key, detail, dict(context or {})))

    async def checkpoint(self, state: dict[str, Any]) -> None:
        """Commit the work done so far together with `state` (fenced on this run being live)."""
        if self.commit_state is not None:
            await self.commit_state(state)
        self.state = state


@dataclass(frozen=True)
class RealtimeSource:
    """Where a job hears about changes: NOTIFY `payload` on `channel` in the database `dsn`.

    `dsn` is a secret reference; the worker's leader LISTENs there and requests a
    `realtime` run of the job for each burst of notifications.
    """

    dsn: Any
    channel: str
    payload: str


class Connector(ABC):
    """A sync kind.  Subclass it, give it a `kind`, and register it (built-in or entry point)."""

    kind: str = ""

    @abstractmethod
    def validate(self, config: Mapping[str, Any]) -> Any:
        """Check `config` and return the parsed form handed to `run` as `ctx.config`.

        Raise ConfigError naming the field and what was expected.  Must not do I/O.
        """

    @abstractmethod
    async def run(self, ctx: RunContext) -> RunResult:
        """Do one sync.  Raise SyncError (or any exception) to fail the run."""

    def contained(self, config: Any) -> bool:
        """Whether every effect of a run is in the run's own transaction on the control
        database (`config` as `validate` returned it).  Such a run's final commit need not
        wait for the WAL flush: a server crash that loses it loses the run's effects with it,
        and the job runs again.  Any run that reaches outside (an API, another database,
        Redis, a child process) commits durably, so that what it did outside and its state
        cannot part."""
        return False

    def realtime_source(self, config: Any) -> RealtimeSource | None:
        """For jobs that want runs on change: where to LISTEN (`config` as `validate` returned it)."""
        return None

    def close(self) -> None:  # noqa: B027 - most connectors hold nothing between runs
        """Release what the connector keeps between runs (the process is stopping)."""
