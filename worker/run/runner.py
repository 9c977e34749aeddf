"""One run of one job: lock, execute the connector with a timeout, commit the fenced result, reschedule."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb

from worker import connectors, logs
from worker.connectors.base import ConfigError, FencedError, RecordError, RunContext, RunResult, is_fence
from worker.db import Pool
from worker.db.message import PREPARED, bind, send
from worker.db.queries import Q
from worker.errors import ErrorType
from worker.run import hooks, outcome, schedule
from worker.run.census import Census
from worker.run.outcome import Ending, Failure, Job, classify
from worker.secrets import redact

__all__ = ["Job", "PooledRunner", "Runner"]

log = logging.getLogger("syncworker.run")

# The most due jobs a run session claims in one statement, and how short its last run must
# have been for it to claim more than one (see _Session).
MAX_BATCH = 8
QUICK_RUN = 0.1


class Runner:
    """Executes a claimed job on a session the caller holds (`run_on`, `preview`): lock, run
    the connector under its timeout, commit the fenced result and the next slot.

    `PooledRunner` is the worker's: it takes the sessions from its pools and chains runs.
    """

    # Called when a run ends with its job scheduled again (the worker tells its replicas).
    on_scheduled: Callable[[], None] | None = None

    def __init__(
        self,
        *,
        max_backoff: float = schedule.DEFAULT_MAX_BACKOFF,
        rand: Callable[[], float] = random.random,
        census: Census | None = None,
        allow_superuser_jobs: bool = False,
    ) -> None:
        self.allow_superuser_jobs = allow_superuser_jobs
        self.max_backoff = max_backoff
        self.rand = rand
        self.census = census or Census()
        # Where a pooler keeps startup options from the server, RESET ALL returns to the
        # database's and role's defaults: this statement sets the worker's settings again.
        self.settings_statement: bytes | None = None

    async def run_on(self, conn: AsyncConnection[TupleRow], job: Job) -> str | None:
        """Run `job` on a session of the caller's (`run-once`), which holds its lock."""
        return await self._run_on(conn, job)

    async def _run_on(
        self, conn: AsyncConnection[TupleRow], job: Job, following: _NextClaim | None = None
    ) -> str | None:
        # Run sessions are in autocommit mode: the lock and locked_at are taken and
        # committed first; the run's own work then happens in one explicit transaction
        # (already open for a job this session claimed itself), opened in the same message.
        try:
            locked_at = job.locked_at
            idle = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            if locked_at is None:
                begin = PREPARED["begin_run"].text(conn, {"run_id": job.run_id, "integration_id": job.id})
                row = await (await send(conn, [begin, "COMMIT", "BEGIN"] if idle else [begin])).fetchone()
                locked_at = row["db_now"] if row is not None else None
            elif idle:
                await conn.execute(b"BEGIN")
        except psycopg.Error as exc:
            # A pooled session the server ended while it sat idle (idle_session_timeout) raises
            # no OperationalError, but it is as gone.
            if not (isinstance(exc, psycopg.OperationalError) or conn.broken):
                raise
            if job.locked_at is not None:
                raise psycopg.OperationalError(str(exc)) from exc  # the run is lost with its lock
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
        """What the connector gets; its checkpoints commit on this session, fenced (not in a dry run)."""
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
            allow_superuser_jobs=self.allow_superuser_jobs,
            commit_state=None if dry_run else functools.partial(self._checkpoint, conn, job),
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
            ending = outcome.bad_row(job, sched, clock.now(), exc)
            log.error("invalid configuration: %s", ending.failure and ending.failure.message)
            return await self._finish(lock, job, ending, RunResult(), [], 0, following)

        ctx = self._context(conn, job, config)
        ctx.period_seconds = period
        durable = not connector.contained(config) or bool(after_success)  # hooks act outside
        deadline = asyncio.timeout(job.timeout_seconds)
        try:
            async with deadline:
                result = await connector.run(ctx)
        except BaseException as exc:
            interrupted = outcome.interruption(exc)
            if interrupted is None and not isinstance(exc, Exception):
                raise
            if interrupted is None and conn.broken:
                raise psycopg.OperationalError(str(exc)) from exc
            await conn.rollback()
            if interrupted == "shutdown":  # hand the job back for an immediate rerun
                self.census.finishing(job.run_id)
                reason = "the worker shut down before the run finished"
                await conn.execute(
                    Q["abandon_run"], {"run_id": job.run_id, "reason": reason, "counted": False}
                )
                log.warning("run abandoned: the worker is shutting down")
                raise
            if interrupted == "fenced":
                log.warning("run fenced off, nothing committed: %s", exc)
                return None
            failure = classify(exc, timed_out=deadline.expired())
            log.error("run failed (%s): %s", failure.error_type, failure.message)
            ending = self._failed(job, sched, clock.now(), failure)
            return await self._finish(
                lock, job, ending, RunResult(), ctx.errors, ctx.failed_records, following, durable=durable
            )

        ending = outcome.succeeded(job, sched, clock.now(), ctx.failed_records)
        # Hooks run after the commit on this session: the next claim waits for them.
        chained = None if after_success else following
        final = await self._finish(
            lock, job, ending, result, ctx.errors, ctx.failed_records, chained, durable=durable
        )
        if after_success and final in ("success", "partial"):
            await self._after_success(conn, job, after_success)
        return final

    def _failed(self, job: Job, sched: schedule.Schedule | None, now: datetime, failure: Failure) -> Ending:
        """How a failed run ends for its job, with this runner's jitter and backoff cap."""
        return outcome.failed(job, sched, now, failure, rand=self.rand(), max_backoff=self.max_backoff)

    @staticmethod
    async def _checkpoint(conn: AsyncConnection[TupleRow], job: Job, state: dict[str, Any]) -> None:
        """A connector's checkpoint: its work so far and `state` commit together, fenced."""
        cur = await conn.execute(
            Q["save_state"], {"state": Jsonb(state), "integration_id": job.id, "run_id": job.run_id}
        )
        if await cur.fetchone() is None:
            raise FencedError(f"run {job.run_id} is no longer the live run of {job.name}")
        await conn.execute(b"SET LOCAL synchronous_commit = on")
        await conn.commit()
        await conn.execute(b"BEGIN")

    async def _after_success(self, conn: AsyncConnection[TupleRow], job: Job, todo: list[hooks.Hook]) -> None:
        """Post-success hooks, once the run's data is committed; failures are recorded, not fatal."""
        for message in await hooks.run_all(todo):
            await conn.execute(
                Q["record_error"],
                {**outcome.run_error(job, ErrorType.HOOK_FAILED, message), "context": Jsonb({})},
            )

    async def _finish(
        self,
        lock: _Lock,
        job: Job,
        ending: Ending,
        result: RunResult,
        record_errors: list[RecordError],
        failed_records: int,
        following: _NextClaim | None,
        *,
        durable: bool = True,
    ) -> str:
        """Record the run's end, its errors and the job's next slot in one fenced transaction,
        and claim the session's next job (`following`) in the same round trip.

        If that transaction fails (a job left its transaction read-only, or set a timeout
        that cancels the bookkeeping, or...), the run's work is rolled back, any lock the
        failed claim took is released, and the run is recorded as failed instead.
        """
        try:
            return await self._commit_finish(
                lock, job, ending, result, record_errors, failed_records, following, durable=durable
            )
        except psycopg.OperationalError:
            raise
        except psycopg.Error as exc:
            conn = lock.conn
            if conn.broken:
                raise psycopg.OperationalError(str(exc)) from exc
            await conn.rollback()
            await conn.execute(Q["release_stray_locks"], {"keep": job.id})
            failure = outcome.not_recorded(classify(exc, timed_out=False))
            log.error("%s", failure.message)
            clock = await _DbClock.read(conn)
            ending = self._failed(job, None, clock.now(), failure)
            return await self._commit_finish(lock, job, ending, RunResult(), [], 0, None)

    async def _commit_finish(
        self,
        lock: _Lock,
        job: Job,
        ending: Ending,
        result: RunResult,
        record_errors: list[RecordError],
        failed_records: int,
        following: _NextClaim | None,
        *,
        durable: bool = True,
    ) -> str:
        rows = [
            {**row, "context": Jsonb(row["context"])}
            for row in outcome.error_rows(job, ending, record_errors, failed_records)
        ]
        params = outcome.finish_params(job, ending, result, failed_records)
        if params["state"] is not None:
            params["state"] = Jsonb(params["state"])
        conn = lock.conn
        self.census.finishing(job.run_id)
        # One message and one round trip: the session's reset (whatever the job SET, a
        # timeout, a role, a search_path, ends with the job, and so do its temporary tables:
        # the next run on this session may make its own), the errors, the fenced finish (which
        # makes the commit durable and releases the run's lock), the alert, what this session
        # runs next, COMMIT.  If finish_run finds the run fenced it raises, and the rest is
        # skipped (the lock stays held until the run's session lets it go).
        parts = ["RESET ALL", "RESET ROLE", "DISCARD TEMP"]
        if conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
            parts.insert(0, "BEGIN")  # after a rollback of the run's own work
        if self.settings_statement is not None:
            parts.append(self.settings_statement.decode())
        parts += [bind(Q["record_error"], row) for row in rows]
        parts.append(PREPARED["finish_run"].text(conn, {**params, "unlock": lock.held, "durable": durable}))
        if ending.plan.disabled_reason:
            parts.append(bind(Q["disable_after_run"], outcome.disable_params(job, ending)))
        if following is not None:
            parts.append(following.statement())  # commits with the run
        # (COMMIT AND CHAIN: the next run's transaction opens at once.)
        parts.append("COMMIT" if following is None else "COMMIT AND CHAIN")
        try:
            cur = await send(conn, parts)
            lock.held = False
            if following is not None:
                for _ in range(len(parts) - 2):  # one result per statement: to the next-to-last
                    cur.nextset()
                self.census.claimed(await following.collect(cur), replacing=True)
        except psycopg.Error as exc:
            if not is_fence(exc):
                raise
            log.warning("run fenced off at commit, nothing committed: %s", exc.diag.message_primary)
            return "abandoned"
        self._ended(ending, result, failed_records)
        return ending.status

    def _ended(self, ending: Ending, result: RunResult, failed_records: int) -> None:
        """Log how the run ended; say so if its job is scheduled again."""
        if ending.plan.next_sync_at is not None and self.on_scheduled is not None:
            self.on_scheduled()
        done = f"run finished: {ending.status}, {result.records_processed} records, {failed_records} failed"
        if ending.plan.disabled_reason:
            log.error("job disabled: %s", ending.plan.disabled_reason)
            log.info("%s", done)
        else:
            log.info("%s, next at %s", done, ending.plan.next_sync_at)


class PooledRunner(Runner):
    """The worker's runner: each run on a session of its own from `run_pool`, chained with
    the next due job that session claims; `pool` (the control pool) hands back or fails a
    run whose own session is gone."""

    def __init__(self, run_pool: Pool, pool: Pool, **options: Any) -> None:
        super().__init__(**options)
        self.run_pool = run_pool
        self.pool = pool

    async def run(self, job: Job, worker_id: int, more: Callable[[], bool]) -> None:
        """Run `job` on a session of its own; then, for as long as `more()` allows, the
        due jobs that session claims, each settled in the same round trip as the previous
        run's final commit."""
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
        session = _Session(conn, worker_id, self.census)
        current: Job | None = job
        try:
            while current is not None:
                logs.bind(current.name, current.run_id)
                log.info("run started (trigger=%s, attempt=%s)", current.trigger, current.attempt)
                session.started = time.monotonic()
                following = _NextClaim(session) if more() else None
                try:
                    if not await self._serve_one(conn, current, following, more):
                        return
                except _StaleSession:
                    if current is job:
                        raise  # nothing happened yet: `run` takes another session
                    session.queued.appendleft(current)  # never started: handed back below
                    return
                current = following.job if following is not None else None
        finally:
            if session.queued:
                await self._hand_back(session.queued)

    async def _serve_one(
        self,
        conn: AsyncConnection[TupleRow],
        current: Job,
        following: _NextClaim | None,
        more: Callable[[], bool],
    ) -> bool:
        """Run `current` on `conn`, settling what follows it; False: the session is done for."""
        try:
            await self._run_on(conn, current, following)
            if following is not None and not following.done and more():
                announce = self.census.quiet()
                self.census.claimed(await following.claim(announce=announce), announced=announce)
        except psycopg.OperationalError as exc:
            # The session (and with it the lock) is gone: nothing of this run may commit.
            log.warning("run session lost: %s", redact(str(exc)))
            if outcome.server_timeout(exc) is not None:
                await self._ended_by_server(current, exc)
            else:
                reason = f"the run lost its database session: {redact(str(exc))[:300]}"
                await self._abandon(current, reason)
            # A claim may have committed without its reply reaching us: its run is
            # the rescuer's now, so make sure the leader is looking.
            self.census.announce()
            return False
        except _StaleSession:
            raise
        except Exception as exc:
            # Nothing should get here; if something does, it is this run's failure, never
            # a loop: the session (and whatever it holds) is closed, and the run is
            # finished as failed from another session, fenced on being the live run.
            log.error("run failed inside the worker", exc_info=exc)
            await conn.close()
            await self._fail_elsewhere(current, classify(exc, timed_out=False))
            return False
        return True

    async def _hand_back(self, queued: deque[Job]) -> None:
        """Runs this session claimed and did not start (the worker stops claiming, or the
        session is gone), given back as if never claimed: due again at once, elsewhere."""
        run_ids = [job.run_id for job in queued]
        queued.clear()
        for run_id in run_ids:
            self.census.finishing(run_id)
        try:
            async with self.pool.connection() as conn:
                await conn.execute(Q["release_unstarted"], {"run_ids": run_ids})
        except psycopg.OperationalError:
            log.warning("could not give back %s claimed runs; the rescuer will", len(run_ids))

    async def _fail_elsewhere(self, job: Job, failure: Failure) -> str | None:
        """Finish `job`'s run as failed from a control session (its own session is closed);
        fenced like every finish (`abandoned`: another run is live).  If even that fails, the
        run is left to the rescuer (None)."""
        self.census.finishing(job.run_id)
        try:
            async with self.pool.connection() as conn:
                clock = await _DbClock.read(conn)
                ending = self._failed(job, None, clock.now(), failure)
                return await self._commit_finish(
                    _Lock(conn, job.id, held=False), job, ending, RunResult(), [], 0, None
                )
        except Exception:
            log.exception("could not record the failed run; the rescuer will hand the job back")
            return None

    async def _ended_by_server(self, job: Job, exc: BaseException) -> None:
        """The server ended the run's session on a timeout of its own: the run failed, and the
        failure counts toward max_retries like any other (rerunning at once would meet the
        same limit).  If a rescuer handed the run back first, the error is still recorded."""
        failure = classify(exc, timed_out=False)
        if await self._fail_elsewhere(job, failure) == "abandoned":
            try:
                async with self.pool.connection() as conn:
                    row = outcome.run_error(job, failure.error_type, failure.message, failure.detail)
                    await conn.execute(Q["record_error"], {**row, "context": Jsonb({})})
            except psycopg.Error:
                log.exception("could not record why the run's session ended")

    async def _abandon(self, job: Job, reason: str) -> None:
        """Hand the job back through another session, retrying while the database is away."""
        self.census.finishing(job.run_id)
        delay = 0.2
        while True:
            try:
                async with self.pool.connection() as conn:
                    await conn.execute(
                        Q["abandon_run"], {"run_id": job.run_id, "reason": reason, "counted": True}
                    )
                return
            except psycopg.OperationalError:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)


class _Session:
    """A run session's own chain: the jobs it claimed and has not started yet (each still
    without its lock), and how many to claim at once.

    A claim that finds as many due jobs as it asked for doubles the next one (up to
    MAX_BATCH): under a backlog a session claims several jobs in one statement and starts
    each in the round trip that ends the previous run.  One that finds fewer asks for one
    again, and so does a session whose last run was not quick (QUICK_RUN): the jobs it would
    claim ahead would wait behind runs like it.  A job waiting here holds no lock and has no
    locked_at, so nothing times it out while it waits; a rescuer hands it back (uncounted)
    only once its worker is gone, or after a minute.
    """

    def __init__(self, conn: AsyncConnection[TupleRow], worker_id: int, census: Census) -> None:
        self.conn = conn
        self.worker_id = worker_id
        self.census = census
        self.queued: deque[Job] = deque()
        self.batch = 1
        self.started = time.monotonic()  # of the session's current run

    def claim_size(self) -> int:
        """How many due jobs to claim now, the current run ending."""
        return self.batch if time.monotonic() - self.started < QUICK_RUN else 1

    def claimed(self, jobs: list[Job], asked: int) -> None:
        """A claim of `asked` found `jobs` (the first runs now, the others wait here)."""
        self.batch = min(asked * 2, MAX_BATCH) if len(jobs) >= asked else 1
        self.queued.extend(jobs[1:])


class _NextClaim:
    """What a run session runs next: the next job it claimed earlier, or a fresh claim.

    `statement()` is what the finishing run's message carries, inside its transaction:
    either the next waiting job's `begin_run` (its lock and locked_at) or a `claim` of up to
    the session's batch of due jobs (the first locked at once); either commits with the run's
    result, and COMMIT AND CHAIN opens the next run's transaction at once.  `collect()` reads
    the outcome once the message is answered; `claim()` does it all in a round trip of its own.
    """

    def __init__(self, session: _Session) -> None:
        self.session = session
        self.conn = session.conn
        self._asked = 0
        self.done = False
        self.job: Job | None = None

    def statement(self, *, announce: bool = False) -> str:
        if self.session.queued:
            waiting = self.session.queued[0]
            self._asked = 0
            params = {"run_id": waiting.run_id, "integration_id": waiting.id}
            return PREPARED["begin_run"].text(self.conn, params)
        self._asked = self.session.claim_size()
        claim = {"limit": self._asked, "locks": 1, "worker_id": self.session.worker_id, "announce": announce}
        return PREPARED["claim"].text(self.conn, claim)

    async def collect(self, cur: psycopg.AsyncCursor[dict[str, Any]]) -> list[int]:
        """The next job, if any, from the result `cur` is on; returns the run ids this claimed
        (for the census)."""
        rows = await cur.fetchall()
        self.done = True
        if self._asked == 0:  # begin_run of the next waiting job
            waiting = self.session.queued.popleft()
            if rows:
                self.job = dataclasses.replace(waiting, locked_at=rows[0]["db_now"])
                return []
            # abandoned while it waited (a rescuer): its lock is released, the transaction closed
            log.info("run %s of %s was handed back while it waited", waiting.run_id, waiting.name)
            self.session.census.finishing(waiting.run_id)
            await self.conn.commit()
            await _Lock(self.conn, waiting.id).release()
            self.done = False  # the caller takes the next one on its own
            return []
        jobs = sorted((Job.from_row(row) for row in rows), key=lambda j: (j.locked_at is None, j.run_id))
        if not jobs:
            await self.conn.commit()  # nothing was due: close the transaction opened for it
            self.session.claimed(jobs, self._asked)
            return []
        self.job = jobs[0]
        self.session.claimed(jobs, self._asked)
        return [job.run_id for job in jobs]

    async def claim(self, *, announce: bool) -> list[int]:
        """On a round trip of its own: the next waiting job (taking its lock when it starts), or
        a fresh claim.  Returns the run ids this claimed."""
        if self.session.queued:
            self.job = self.session.queued.popleft()
            self.done = True
            return []
        cur = await send(self.conn, ["BEGIN", self.statement(announce=announce), "COMMIT AND CHAIN"])
        cur.nextset()
        return await self.collect(cur)


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
