"""One run of one job: lock, execute the connector with a timeout, commit the fenced result, reschedule."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import TupleRow, dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from worker import connectors, db, hooks, logs, schedule
from worker.connectors.base import ConfigError, FencedError, RunContext, RunResult, SyncError
from worker.cron import CronError
from worker.maintenance import Census
from worker.queries import Q
from worker.secrets import SecretError, redact, redact_value

log = logging.getLogger("syncworker.run")

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
        values = dict(row)
        values["unreadable"] = db.read_json(values, "config", "state")
        return cls(**{name: values[name] for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class Failure:
    error_type: str
    message: str
    detail: str | None


def classify(exc: BaseException, timed_out: bool) -> Failure:
    """The stable error_type and a one-line message for an exception raised by a run."""
    if timed_out:
        return Failure("timeout", "the run exceeded timeout_seconds and was cancelled", None)
    detail = redact("".join(traceback.format_exception(exc)))[-8000:]
    if isinstance(exc, ConfigError):
        return Failure("config_invalid", redact(str(exc)), None)
    if isinstance(exc, SyncError):
        error_type = exc.error_type
    elif isinstance(exc, SecretError):
        error_type = "secret_unavailable"
    elif isinstance(exc, psycopg.OperationalError):
        error_type = "connection"
    elif isinstance(exc, psycopg.Error):
        error_type = "sql_error"
    elif isinstance(exc, OSError | ConnectionError):
        error_type = "connection"
    else:
        error_type = "exception"
    message = redact(f"{type(exc).__name__}: {exc}".strip().rstrip(":"))
    return Failure(error_type, message[:MAX_ERROR_TEXT], detail)


def alert(job: Job, failure: Failure | None, plan: schedule.Plan) -> str:
    """The JSON payload of `NOTIFY syncworker_alerts` when a job is disabled (always well
    under NOTIFY's 8000 bytes, whatever the name and the reason)."""
    return json.dumps(
        {
            "integration": job.name[:200],
            "integration_id": job.id,
            "run_id": job.run_id,
            "error_type": failure and failure.error_type[:100],
            "reason": plan.disabled_reason and plan.disabled_reason[:1000],
        }
    )


def config_problem(exc: BaseException) -> str:
    """Why a job's row cannot be used, for `disabled_reason` (secrets masked).

    ConfigError and ScheduleError name the field; anything else a connector's `validate`
    raised is still a problem of that job's config, never of the worker.
    """
    if isinstance(exc, ConfigError | schedule.ScheduleError | CronError):
        return redact(str(exc))
    return redact(f"could not be read ({type(exc).__name__}: {exc})")[:MAX_ERROR_TEXT]


class Runner:
    """Executes claimed jobs.  Each run uses a session of its own from `run_pool`."""

    def __init__(
        self,
        run_pool: AsyncConnectionPool[AsyncConnection[TupleRow]] | None,
        pool: AsyncConnectionPool[AsyncConnection[TupleRow]] | None,
        *,
        max_backoff: float = schedule.DEFAULT_MAX_BACKOFF,
        rand: Callable[[], float] = random.random,
        census: Census | None = None,
    ) -> None:
        self.run_pool = run_pool
        self.pool = pool
        self.max_backoff = max_backoff
        self.rand = rand
        self.census = census or Census()

    async def run(self, job: Job, worker_id: int, more: Callable[[], bool]) -> None:
        """Run `job` on a session of its own; then, for as long as `more()` allows, the
        due jobs that session claims, each in the same round trip as the previous
        run's final commit."""
        assert self.run_pool is not None
        for _ in range(3):
            try:
                async with self.run_pool.connection() as conn:
                    await self._serve(conn, job, worker_id, more)
                return
            except _StaleSession:
                continue  # a pooled session died while idle (e.g. a server restart): take another
        await self._abandon(job, "no working database session for the run")

    async def _serve(
        self, conn: AsyncConnection[TupleRow], job: Job, worker_id: int, more: Callable[[], bool]
    ) -> None:
        current: Job | None = job
        while current is not None:
            logs.bind(current.name, current.run_id)
            log.info("run started (trigger=%s, attempt=%s)", current.trigger, current.attempt)
            following = _NextClaim(conn, worker_id) if more() else None
            try:
                await self._run_on(conn, current, following)
                if following is not None and not following.done and more():
                    announce = self.census.quiet()
                    await following.claim(announce=announce)
                    if following.job is not None:
                        self.census.claimed([following.job.run_id], announced=announce)
            except psycopg.OperationalError as exc:
                # The session (and with it the lock) is gone: nothing of this run may commit.
                log.warning("run session lost: %s", redact(str(exc)))
                await self._abandon(current, f"the run lost its database session: {redact(str(exc))[:300]}")
                # A claim may have committed without its reply reaching us: its run is
                # the rescuer's now, so make sure the leader is looking.
                self.census.announce()
                return
            except _StaleSession:
                raise  # nothing happened yet: `run` takes another session
            except Exception as exc:
                # Nothing should get here; if something does, it is this run's failure, never
                # a loop: the session (and whatever it holds) is closed, and the run is
                # finished as failed from another session, fenced on being the live run.
                log.error("run failed inside the worker", exc_info=exc)
                await conn.close()
                await self._fail_elsewhere(current, classify(exc, timed_out=False))
                return
            current = following.job if following is not None else None

    async def run_on(self, conn: AsyncConnection[TupleRow], job: Job) -> str | None:
        """Run `job` on a session of the caller's (`run-once`), which holds its lock."""
        return await self._run_on(conn, job)

    async def _run_on(
        self, conn: AsyncConnection[TupleRow], job: Job, following: _NextClaim | None = None
    ) -> str | None:
        # Run sessions are in autocommit mode: the lock and locked_at are taken and
        # committed first; the run's own work then happens in one explicit transaction
        # (already open for a job this session claimed itself).
        try:
            locked_at = job.locked_at
            if locked_at is None:
                cur = await conn.execute(Q["begin_run"], {"run_id": job.run_id, "integration_id": job.id})
                row = await cur.fetchone()
                locked_at = row[0] if row is not None else None
            if locked_at is not None and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
                await conn.execute(b"BEGIN")
        except psycopg.OperationalError as exc:
            if job.locked_at is not None:
                raise  # this session took the lock already: the run is lost with it
            raise _StaleSession from exc
        lock = _Lock(conn, job.id)
        try:
            if locked_at is None:
                log.info("run was abandoned before it started; dropping it")
                return None
            return await self._execute(lock, job, _DbClock(locked_at), following)
        finally:
            self.census.finishing(job.run_id)
            if not conn.broken:
                if following is None or following.job is None:
                    await conn.rollback()
                if lock.held:
                    await lock.release()

    def _context(
        self, conn: AsyncConnection[TupleRow], job: Job, config: Any, *, dry_run: bool = False
    ) -> RunContext:
        return RunContext(
            integration_id=job.id,
            name=job.name,
            kind=job.kind,
            run_id=job.run_id,
            config=config,
            state=dict(job.state),
            conn=conn,
            log=logging.getLogger(f"syncworker.connector.{job.kind}"),
            trigger=job.trigger,
            dry_run=dry_run,
        )

    async def preview(self, conn: AsyncConnection[TupleRow], job: Job) -> tuple[RunResult, RunContext]:
        """Run the connector in dry-run mode and roll everything back (`run-once --dry-run`)."""
        if job.unreadable:
            raise ConfigError("", job.unreadable)
        connector = connectors.get(job.kind)
        body, _ = hooks.split(job.config)  # hooks do not run in a dry run
        ctx = self._context(conn, job, connector.validate(body), dry_run=True)
        await conn.execute(b"BEGIN")
        try:
            async with asyncio.timeout(job.timeout_seconds):
                return await connector.run(ctx), ctx
        finally:
            await conn.rollback()

    async def _execute(
        self, lock: _Lock, job: Job, clock: _DbClock, following: _NextClaim | None
    ) -> str | None:
        conn = lock.conn
        sched: schedule.Schedule | None = None
        try:
            if job.unreadable:
                raise ConfigError("", job.unreadable)
            sched = schedule.Schedule.from_row(job.interval_seconds, job.cron, job.timezone)
            connector = connectors.get(job.kind)
            body, after_success = hooks.split(job.config)
            config = connector.validate(body)
            period = sched.period_seconds(clock.now())
        except Exception as exc:
            problem = config_problem(exc)
            slot = sched.next_slot_or_none(job.scheduled_for, clock.now()) if sched else None
            plan = schedule.after_invalid_config(slot, job.retry_count, problem)
            failure = Failure("config_invalid", problem, None)
            log.error("invalid configuration: %s", failure.message)
            return await self._finish(lock, job, "failed", RunResult(), plan, failure, [], following)

        ctx = self._context(conn, job, config)
        ctx.period_seconds = period

        async def checkpoint(state: dict[str, Any]) -> None:
            cur = await conn.execute(
                Q["save_state"], {"state": Jsonb(state), "integration_id": job.id, "run_id": job.run_id}
            )
            if await cur.fetchone() is None:
                raise FencedError(f"run {job.run_id} is no longer the live run of {job.name}")
            await conn.execute(b"SET LOCAL synchronous_commit = on")
            await conn.commit()
            await conn.execute(b"BEGIN")

        ctx._checkpoint = checkpoint
        deadline = asyncio.timeout(job.timeout_seconds)
        try:
            async with deadline:
                result = await connector.run(ctx)
        except asyncio.CancelledError:
            # The worker is shutting down: hand the job back for an immediate rerun.
            self.census.finishing(job.run_id)
            await conn.rollback()
            await conn.execute(
                Q["abandon_run"],
                {"run_id": job.run_id, "reason": "the worker shut down before the run finished"},
            )
            log.warning("run abandoned: the worker is shutting down")
            raise
        except FencedError as exc:
            await conn.rollback()
            log.warning("run fenced off, nothing committed: %s", exc)
            return None
        except Exception as exc:
            if conn.broken:
                raise psycopg.OperationalError(str(exc)) from exc
            await conn.rollback()
            failure = classify(exc, timed_out=deadline.expired())
            log.error("run failed (%s): %s", failure.error_type, failure.message)
            plan = self._plan_failure(job, sched, clock, failure)
            return await self._finish(
                lock,
                job,
                "failed",
                RunResult(),
                plan,
                failure,
                ctx.errors,
                following,
                failed_records=ctx.failed_records,
            )

        status = "partial" if ctx.failed_records else "success"
        try:
            plan = schedule.after_success(sched, job.scheduled_for, clock.now())
        except CronError as exc:  # a cron that stopped firing: the data stays, the job stops
            plan = schedule.after_invalid_config(None, 0, config_problem(exc))
        # Hooks run after the commit on this session: the next claim waits for them.
        final = await self._finish(
            lock,
            job,
            status,
            result,
            plan,
            None,
            ctx.errors,
            None if after_success else following,
            failed_records=ctx.failed_records,
        )
        if after_success and final in ("success", "partial"):
            await self._after_success(conn, job, after_success)
        return final

    def _plan_failure(
        self, job: Job, sched: schedule.Schedule | None, clock: _DbClock, failure: Failure
    ) -> schedule.Plan:
        """What a failed run means for its job: a retry later, or disabled."""
        slot_or_none = sched.next_slot_or_none(job.scheduled_for, clock.now()) if sched else None
        if failure.error_type == "config_invalid":
            return schedule.after_invalid_config(slot_or_none, job.retry_count, failure.message)
        try:
            if sched is None:
                sched = schedule.Schedule.from_row(job.interval_seconds, job.cron, job.timezone)
            return schedule.after_failure(
                sched,
                job.scheduled_for,
                clock.now(),
                retry_count=job.retry_count,
                max_retries=job.max_retries,
                backoff_seconds=job.retry_backoff_seconds,
                rand=self.rand(),
                error=failure.message,
                max_backoff=self.max_backoff,
            )
        except (schedule.ScheduleError, CronError) as exc:
            return schedule.after_invalid_config(None, job.retry_count, config_problem(exc))

    async def _after_success(self, conn: AsyncConnection[TupleRow], job: Job, todo: list[hooks.Hook]) -> None:
        """Post-success hooks, once the run's data is committed; failures are recorded, not fatal."""
        for message in await hooks.run_all(todo):
            await conn.execute(
                Q["record_error"],
                {
                    "integration_id": job.id,
                    "run_id": job.run_id,
                    "error_type": "hook_failed",
                    "message": message[:MAX_ERROR_TEXT],
                    "detail": None,
                    "record_key": None,
                    "context": Jsonb({}),
                },
            )

    async def _finish(
        self,
        lock: _Lock,
        job: Job,
        status: str,
        result: RunResult,
        plan: schedule.Plan,
        failure: Failure | None,
        record_errors: list[Any],
        following: _NextClaim | None,
        failed_records: int = 0,
    ) -> str:
        """Record the run's end, its errors and the job's next slot in one fenced transaction,
        and claim the session's next job (`following`) in the same round trip.

        If that transaction fails (a job left its transaction read-only, or set a timeout
        that cancels the bookkeeping, or...), the run's work is rolled back, any lock the
        failed claim took is released, and the run is recorded as failed instead.
        """
        try:
            return await self._commit_finish(
                lock, job, status, result, plan, failure, record_errors, following, failed_records
            )
        except (psycopg.OperationalError, psycopg.errors.SerializationFailure):
            raise
        except psycopg.Error as exc:
            conn = lock.conn
            if conn.broken:
                raise psycopg.OperationalError(str(exc)) from exc
            await conn.rollback()
            await conn.execute(Q["release_stray_locks"], {"keep": job.id})
            problem = classify(exc, timed_out=False)
            failure = Failure(
                problem.error_type, f"the run could not be recorded: {problem.message}"[:MAX_ERROR_TEXT], None
            )
            log.error("%s", failure.message)
            plan = self._plan_failure(job, None, await _DbClock.read(conn), failure)
            return await self._commit_finish(lock, job, "failed", RunResult(), plan, failure, [], None)

    async def _commit_finish(
        self,
        lock: _Lock,
        job: Job,
        status: str,
        result: RunResult,
        plan: schedule.Plan,
        failure: Failure | None,
        record_errors: list[Any],
        following: _NextClaim | None,
        failed_records: int = 0,
    ) -> str:
        base = {"integration_id": job.id, "run_id": job.run_id, "context": Jsonb({})}
        rows = [
            {
                **base,
                "error_type": _text(e.error_type, 100),
                "message": _text(e.message),
                "detail": e.detail and _text(e.detail, 8000),
                "record_key": e.record_key and _text(e.record_key),
                "context": Jsonb(redact_value(e.context)),
            }
            for e in record_errors
        ]
        if failed_records > len(record_errors):
            rows.append(
                {
                    **base,
                    "error_type": "record_invalid",
                    "record_key": None,
                    "detail": None,
                    "message": f"{failed_records - len(record_errors)} more failed records not kept",
                }
            )
        if failure is not None:
            rows.append(
                {
                    **base,
                    "error_type": failure.error_type,
                    "message": failure.message,
                    "detail": failure.detail,
                    "record_key": None,
                }
            )
        params = {
            "run_id": job.run_id,
            "status": status,
            "records_processed": result.records_processed,
            "records_failed": failed_records,
            "records_inserted": result.inserted,
            "records_updated": result.updated,
            "records_deleted": result.deleted,
            "error_type": failure and failure.error_type,
            "error": failure and failure.message,
            "state": None if result.state is None else Jsonb(result.state),
            "retry_count": plan.retry_count,
            "disabled_reason": plan.disabled_reason,
            "next_sync_at": plan.next_sync_at,
            "slot": plan.slot,
            "scheduled_sync_at": plan.scheduled_sync_at,
        }
        conn = lock.conn
        self.census.finishing(job.run_id)
        try:
            # One round trip: errors, the fenced final statement (which makes the commit
            # durable), the alert, the next claim, COMMIT, and the lock's release only
            # after the commit.  If finish_run finds the run fenced it raises, and the
            # rest of the pipeline is skipped.
            async with conn.pipeline(), conn.cursor() as cur:
                if conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
                    await cur.execute(b"BEGIN")  # after a rollback of the run's own work
                # Whatever the job SET (a timeout, a role, a search_path) ends with the job.
                await cur.execute(b"RESET ALL")
                await cur.execute(b"RESET ROLE")
                if rows:
                    await cur.executemany(Q["record_error"], rows)
                await cur.execute(Q["finish_run"], params)
                if plan.disabled_reason:
                    await cur.execute(Q["send_alert"], {"payload": alert(job, failure, plan)})
                if following is None:
                    await cur.execute(b"COMMIT")
                else:
                    await following.queue()  # commits with the run; the next run's transaction opens
                    await cur.execute(b"COMMIT AND CHAIN")
                if lock.held:
                    await cur.execute(Q["unlock_integration"], {"integration_id": job.id})
            lock.held = False
            if following is not None:
                await following.collect()
                if following.job is not None:
                    self.census.claimed([following.job.run_id], replacing=True)
        except psycopg.errors.SerializationFailure as exc:
            log.warning("run fenced off at commit, nothing committed: %s", exc.diag.message_primary)
            return "abandoned"
        if plan.disabled_reason:
            log.error("job disabled: %s", plan.disabled_reason)
            log.info(
                "run finished: %s, %s records, %s failed", status, result.records_processed, failed_records
            )
        else:
            log.info(
                "run finished: %s, %s records, %s failed, next at %s",
                status,
                result.records_processed,
                failed_records,
                plan.next_sync_at,
            )
        return status

    async def _fail_elsewhere(self, job: Job, failure: Failure) -> None:
        """Finish `job`'s run as failed from a control session (its own session is closed);
        fenced like every finish.  If even that fails, the run is left to the rescuer."""
        assert self.pool is not None
        self.census.finishing(job.run_id)
        try:
            async with self.pool.connection() as conn:
                plan = self._plan_failure(job, None, await _DbClock.read(conn), failure)
                lock = _Lock(conn, job.id, held=False)
                await self._commit_finish(lock, job, "failed", RunResult(), plan, failure, [], None)
        except Exception:
            log.exception("could not record the failed run; the rescuer will hand the job back")

    async def _abandon(self, job: Job, reason: str) -> None:
        """Hand the job back through another session, retrying while the database is away."""
        assert self.pool is not None
        self.census.finishing(job.run_id)
        delay = 0.2
        while True:
            try:
                async with self.pool.connection() as conn:
                    await conn.execute(Q["abandon_run"], {"run_id": job.run_id, "reason": reason})
                return
            except psycopg.OperationalError:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)


def _text(value: str, limit: int = MAX_ERROR_TEXT) -> str:
    """An error text as stored: secrets masked, capped, and without NUL (text cannot hold it)."""
    return redact(str(value)).replace("\x00", "\\0")[:limit]


class _NextClaim:
    """A run session's next job, claimed by that session (`claim` with its lock and run row).

    `queue()` adds the claim to an open pipeline, inside the finishing run's transaction:
    the claim commits with the run's result, and COMMIT AND CHAIN opens the next run's
    transaction at once.  `collect()` reads what was claimed once the pipeline is done.
    `claim()` does it all in a round trip of its own.
    """

    def __init__(self, conn: AsyncConnection[TupleRow], worker_id: int) -> None:
        self.conn = conn
        self.worker_id = worker_id
        self._claimed: psycopg.AsyncCursor[dict[str, Any]] | None = None
        self.done = False
        self.job: Job | None = None

    async def queue(self, *, announce: bool = False) -> None:
        self._claimed = self.conn.cursor(row_factory=dict_row)
        await self._claimed.execute(
            Q["claim"], {"limit": 1, "lock": True, "worker_id": self.worker_id, "announce": announce}
        )

    async def collect(self) -> None:
        assert self._claimed is not None
        row = await self._claimed.fetchone()
        self.done = True
        if row is None:
            await self.conn.rollback()  # nothing was due: close the transaction opened for it
        else:
            self.job = Job.from_row(row)

    async def claim(self, *, announce: bool) -> None:
        async with self.conn.pipeline(), self.conn.cursor() as cur:
            await cur.execute(b"BEGIN")
            await self.queue(announce=announce)
            await cur.execute(b"COMMIT AND CHAIN")
        await self.collect()


class _Lock:
    """The integration's advisory lock, held by the run's session."""

    def __init__(self, conn: AsyncConnection[TupleRow], integration_id: int, *, held: bool = True) -> None:
        self.conn = conn
        self.integration_id = integration_id
        self.held = held

    async def release(self) -> None:
        await self.conn.execute(Q["unlock_integration"], {"integration_id": self.integration_id})
        self.held = False


class _StaleSession(Exception):
    """The session failed before the run took its lock: nothing happened yet, retry elsewhere."""


class _DbClock:
    """The database's clock, read once at the start of a run and advanced locally."""

    def __init__(self, db_now: datetime) -> None:
        self._start = db_now
        self._mono = time.monotonic()

    @classmethod
    async def read(cls, conn: AsyncConnection[TupleRow]) -> _DbClock:
        row = await (await conn.execute(b"SELECT clock_timestamp()")).fetchone()
        assert row is not None
        return cls(row[0])

    def now(self) -> datetime:
        return self._start + timedelta(seconds=time.monotonic() - self._mono)
