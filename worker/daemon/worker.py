"""`syncworker run`: the worker process — its main loop, start-up and shutdown."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import TupleRow, dict_row
from psycopg_pool import AsyncConnectionPool

from worker import connectors, db
from worker.daemon.alarm import Alarm
from worker.daemon.settings import Settings
from worker.daemon.systemd import Notifier, watchdog_interval
from worker.db.queries import Q
from worker.ops.metrics import MeasuredRunner, Metrics
from worker.run.census import Census
from worker.run.runner import Job
from worker.services.announcer import DueAnnouncer
from worker.services.backoff import Backoff
from worker.services.base import supervise
from worker.services.heartbeat import Heartbeat
from worker.services.leadership import Leadership
from worker.services.listener import Listener
from worker.services.pruner import PruneLoop, Pruner
from worker.services.realtime import Realtime
from worker.services.rescuer import RescueLoop, Rescuer

if TYPE_CHECKING:
    from worker.ops.alerts import AlertLoop, LeaderWatch

log = logging.getLogger("syncworker.worker")

# Rows that are due but could not be claimed (another replica is claiming them right
# now, or someone holds a row lock on them): look again after MIN_RECHECK, then less
# and less often while it lasts, up to MAX_RECHECK.
MIN_RECHECK = 0.01
MAX_RECHECK = 2.0


# Claims, heartbeats and lock bookkeeping need not wait for a WAL flush: if the server
# crashes before flushing them, the rescuer hands the jobs back anyway.  A run's final
# commit turns synchronous_commit back on for itself (finish_run).  This worker wakes the
# leader itself when it starts running (Census): its claims need not NOTIFY one by one.
BOOKKEEPING = {"synchronous_commit": "off", "syncworker.announces_runs": "on"}


CLEAN_SESSION = b"SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL; RESET ROLE; DISCARD TEMP"
"""A run session going back to the pool: nothing a job did to it may outlive the job.

Jobs run their own statements on it (`SET ROLE`, `SET statement_timeout`, `LISTEN`, `DECLARE
... WITH HOLD`, `CREATE TEMP TABLE`, ...): RESET returns to the startup options (or, where a
pooler kept them from the server, the worker sets its settings again), cursors close, the
session stops listening (a listening session idle in the pool would keep the server's
notification queue from being cleaned), temporary objects go.  No integration lock may stay
with a session that runs nothing: every advisory lock it holds is released (one round trip;
pg_locks is not read, which would stall every session taking a lock meanwhile).  Each run also
ends with RESET ALL, RESET ROLE and DISCARD TEMP (the runner's finish).
"""


def _drop_notification(_: psycopg.Notify) -> None:
    """Notifications on a run session are a job's: nobody reads them."""


class StartupError(Exception):
    """The worker cannot start (database unreachable, schema missing)."""


class Worker:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.url = settings.database_url
        self.alarm = Alarm()
        self.stopping = False
        self.active: set[asyncio.Task[Any]] = set()
        self.more_due = False
        self.unclaimable = Backoff(initial=MIN_RECHECK, maximum=MAX_RECHECK)
        self.notifier = Notifier()
        self.leadership = Leadership(self.url, self._on_leadership)
        self._leader_tasks: list[asyncio.Task[None]] = []
        self._services: list[asyncio.Task[None]] = []
        self.realtime: Realtime | None = None
        self.heartbeat: Heartbeat | None = None
        self.alerting: AlertLoop | None = None  # the leader delivers alerts (SYNCWORKER_ALERT_*)
        # Session options name the worker once it is registered (`_start`).
        self.pool: AsyncConnectionPool[AsyncConnection[TupleRow]] = AsyncConnectionPool(
            self.url, min_size=1, max_size=2, open=False, name="control", configure=self._configure_session
        )
        # Whether the server gets the sessions' settings by SET (a pooler keeps startup
        # options from it): decided at start-up by the environment probe.
        self.by_set = False
        self.exit_code = 0
        self.run_pool: AsyncConnectionPool[AsyncConnection[TupleRow]] = AsyncConnectionPool(
            self.url,
            min_size=1,
            max_size=settings.concurrency,
            open=False,
            name="runs",
            configure=self._configure_run_session,
            reset=self._clean_session,
        )
        self.census = Census(self._announce_runs)
        self.rescue = RescueLoop(Rescuer(self.pool), settings.rescue_interval)
        self.announcer = DueAnnouncer(self.pool)
        self._announcing: set[asyncio.Task[None]] = set()
        self.metrics = Metrics(settings.concurrency)
        self.runner = MeasuredRunner(
            self.run_pool,
            self.pool,
            max_backoff=settings.max_backoff,
            census=self.census,
            metrics=self.metrics,
            allow_superuser_jobs=settings.allow_superuser_jobs,
        )
        self.runner.on_scheduled = self.announcer.ask
        self.listener = Listener(
            self.url,
            self.alarm,
            mode=settings.mode,
            concurrency=settings.concurrency,
            on_runs_started=self._on_runs_started,
            on_realtime_jobs=self._on_realtime_jobs,
        )

    # -- the main loop ---------------------------------------------------------------

    async def run(self) -> int:
        """Run until asked to stop; returns the process exit code."""
        await self._start()
        backoff = Backoff(initial=0.2, maximum=5.0)
        while True:
            recheck = await self.alarm.sleep()
            if self.stopping:
                break
            try:
                await self._dispatch(recheck)
                backoff.reset()
            except psycopg.OperationalError as exc:
                delay = backoff.next()
                log.warning("database unavailable (%s); retrying in %.1fs", exc, delay)
                self.alarm.ring_in(delay)
        return await self._shutdown()

    async def _dispatch(self, recheck: bool = False) -> None:
        """Claim what is due up to free capacity, start it, and set the next wake-up.

        A `recheck` (the poll cap, with nothing known to be due) first only looks.
        """
        poll = self.settings.poll_interval
        free = self.settings.concurrency - len(self.active)
        if free <= 0 or not self._may_claim():
            self.alarm.ring_in(poll, recheck=True)
            return
        async with self.pool.connection() as conn:
            due_in = await self._due_in(conn) if recheck else 0.0
            if due_in <= 0:
                self.more_due = await self._claim(conn, free) == free
                if self.more_due:  # every free slot is taken: a finishing run rings the alarm
                    self.alarm.ring_in(poll, recheck=True)
                    return
                due_in = await self._due_in(conn)
        if due_in <= 0:
            self.alarm.ring_in(self.unclaimable.next())
            return
        self.unclaimable.reset()
        if due_in >= poll:
            self.alarm.ring_in(poll, recheck=True)
        else:
            self.alarm.ring_in(max(due_in, MIN_RECHECK))

    async def _claim(self, conn: AsyncConnection[TupleRow], limit: int) -> int:
        """Claim up to `limit` due jobs and start a run for each; returns how many."""
        cur = conn.cursor(row_factory=dict_row)
        announce = self.census.quiet()
        await cur.execute(
            Q["claim"],
            {"limit": limit, "locks": 0, "worker_id": self.listener.worker_id, "announce": announce},
        )
        jobs = [Job.from_row(row) for row in await cur.fetchall()]
        self.census.claimed([job.run_id for job in jobs], announced=announce)
        if jobs:
            self.unclaimable.reset()
        for job in jobs:
            self._start_run(job)
        return len(jobs)

    async def _due_in(self, conn: AsyncConnection[TupleRow]) -> float:
        """Seconds until the earliest idle job is due (negative: overdue; inf: none)."""
        row = await (await conn.execute(Q["next_due_in"])).fetchone()
        return float(str(row[0])) if row is not None and row[0] is not None else math.inf

    def _may_claim(self) -> bool:
        return self.settings.mode == "active" or self.leadership.is_leader

    def _may_continue(self) -> bool:
        """May a run session that is finishing a run claim the next due job itself?"""
        return not self.stopping and self._may_claim()

    def _start_run(self, job: Job) -> None:
        assert self.listener.worker_id is not None
        task = asyncio.create_task(
            self.runner.run(job, self.listener.worker_id, self._may_continue),
            name=f"runs from {job.run_id} {job.name}",
        )
        self.active.add(task)
        task.add_done_callback(self._run_done)

    def _run_done(self, task: asyncio.Task[Any]) -> None:
        self.active.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # The runner turns every failure into the run's own result; this is a last resort.
            log.error("%s: the runner failed", task.get_name(), exc_info=task.exception())
        if self.more_due and not self.stopping:
            self.alarm.ring_now()

    # -- events from the services -------------------------------------------------------

    def _on_runs_started(self) -> None:
        self.rescue.wake()

    def _on_realtime_jobs(self) -> None:
        if self.realtime is not None:
            self.realtime.reload_soon()

    def _announce_runs(self) -> None:
        """This worker started running while none of its runs ran: wake the leader."""
        self._on_runs_started()
        task = asyncio.create_task(self._send_announcement(), name="announce runs")
        self._announcing.add(task)
        task.add_done_callback(self._announcing.discard)

    async def _send_announcement(self) -> None:
        backoff = Backoff(initial=0.2, maximum=2.0)
        for _ in range(5):
            try:
                async with self.pool.connection() as conn:
                    await conn.execute(Q["announce_runs"])
                return
            except psycopg.OperationalError as exc:
                log.warning("could not tell the leader that runs started: %s", exc)
                await asyncio.sleep(backoff.next())

    def _on_leadership(self, leader: bool) -> None:
        if leader and not self.stopping:
            pruning = PruneLoop(Pruner(self.pool, self.settings.retention_days))
            self.realtime = Realtime(self.pool)
            self._leader_tasks = [
                self._service(pruning.run, "pruner"),
                self._service(self.realtime.run, "realtime sources"),
            ]
            if self.alerting is not None:
                self._leader_tasks.append(self._service(self.alerting.run, "alerts"))
        elif not leader:
            for task in self._leader_tasks:
                task.cancel()
            self._leader_tasks, self.realtime = [], None
        if self.heartbeat is not None:
            self.heartbeat.beat_soon()
        self.alarm.ring_now()

    def _service(self, run: Callable[[], Coroutine[Any, Any, None]], name: str) -> asyncio.Task[None]:
        """Start a background service, supervised: a failure is logged and the service started
        again with backoff; the worker goes on."""
        task = asyncio.create_task(supervise(run, name), name=name)
        self._services.append(task)
        return task

    # -- start and stop ---------------------------------------------------------------

    async def _start(self) -> None:
        # First of all: a stop asked for while starting (systemd, Ctrl-C) is a graceful one.
        # SIGHUP (a closed terminal, a reload) stops gracefully too rather than killing runs.
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self._on_signal, sig)
        await self._start_http()
        await self._check_environment()
        first = await self._connect_first()
        worker_id = self.listener.worker_id
        assert worker_id is not None
        # Every session names its worker, so that a replica found lost can be cut off.
        by_set = self.by_set
        self.pool.kwargs = {
            "autocommit": True,
            **db.session_kwargs(self.url, f"syncworker w{worker_id}", by_set=by_set, **BOOKKEEPING),
        }
        self.run_pool.kwargs = {
            "autocommit": True,
            **db.session_kwargs(self.url, f"syncworker run w{worker_id}", by_set=by_set, **BOOKKEEPING),
        }
        self.leadership.application_name = f"syncworker leader w{worker_id}"
        await self.pool.open()
        await self.run_pool.open()
        self.listener.adopt(first)
        self.listener.on_reconnect = self._recheck_environment
        self._service(self.listener.run, "listener")
        self.heartbeat = Heartbeat(
            self.pool,
            worker_id,
            self.settings.heartbeat_interval,
            running=lambda: len(self.active),
            leader=lambda: self.leadership.is_leader,
        )
        self._service(self.heartbeat.run, "heartbeat")
        self._service(self.leadership.run, "leadership")
        self._service(self.rescue.run, "rescuer")
        self._service(self.announcer.run, "due announcer")
        if self.alerting is not None:
            self._service(self._leader_watch().run, "leader watch")
        interval = watchdog_interval()
        if interval:
            self._service(lambda: self._watchdog(interval), "watchdog")
        log.info(
            "worker %s started (mode=%s, concurrency=%s) on %s",
            self.listener.worker_id,
            self.settings.mode,
            self.settings.concurrency,
            db.describe_target(self.url),
        )
        if self.settings.http:
            self.metrics.fleet.warm(self.pool)
        self.notifier.ready(f"worker {self.listener.worker_id} running")

    def _leader_watch(self) -> LeaderWatch:
        """Every replica watches for a fleet without a leader: the leader, which delivers the
        other alerts, cannot raise that one."""
        from worker.ops.alerts import AlertLoop, LeaderWatch

        assert self.alerting is not None
        return LeaderWatch(AlertLoop(self.pool, self.alerting.config, self.metrics))

    async def _start_http(self) -> None:
        """--http: listen before anything else, so that a bad address or a port in use stops the
        start with one line; then serve, supervised, until shutdown cancels it.  The alert
        settings are read here too: malformed ones stop the start the same way."""
        from worker.ops.alerts import AlertConfig, AlertConfigError, AlertLoop

        try:
            alerts = AlertConfig.from_env()
        except AlertConfigError as exc:
            raise StartupError(str(exc)) from None
        if alerts.channels:
            self.alerting = AlertLoop(
                self.pool, alerts, self.metrics, retention_days=self.settings.retention_days
            )
        self.metrics.watch(
            leader=lambda: self.leadership.is_leader, listener_connected=self.listener.connected.is_set
        )
        if not self.settings.http:
            return
        from worker.ops.web import HttpError, HttpServer

        try:
            server = HttpServer(self, self.settings.http, insecure=self.settings.http_insecure)
            await server.bind()
        except HttpError as exc:
            raise StartupError(str(exc)) from None
        self._service(server.run, "http")

    async def _connect_first(self) -> psycopg.AsyncConnection[tuple[object, ...]]:
        target = db.describe_target(self.url)
        try:
            conn = await psycopg.AsyncConnection.connect(
                self.url, autocommit=True, **db.connect_kwargs("syncworker listener")
            )
        except psycopg.OperationalError as exc:
            raise StartupError(f"cannot connect to {target}: {db.connection_problem(exc)}") from None
        from worker.db.migrate import require_head_async

        try:
            # SchemaMismatch (exit status 78) unless the schema is at the revision this code knows.
            await require_head_async(conn, target)
        finally:
            await conn.close()
        return await self.listener.connect_once()

    async def _check_environment(self) -> None:
        """Refuse a server or connection the worker cannot keep its guarantees on (a standby, a
        server too old, a transaction pooler): one line, exit status 78.  Warnings are logged."""
        from worker.db import environment

        try:
            env = await environment.probe(self.url)
        except psycopg.OperationalError as exc:
            target = db.describe_target(self.url)
            raise StartupError(f"cannot connect to {target}: {db.connection_problem(exc)}") from None
        found = environment.findings(env)
        refusal = environment.refusal(found)
        if refusal is not None:
            raise environment.Unsuitable(f"cannot run on {db.describe_target(self.url)}: {refusal}")
        for finding in found:
            if finding.level in ("note", "warning"):
                log.log(
                    logging.WARNING if finding.level == "warning" else logging.INFO, "%s", finding.message
                )
        self.by_set = env.by_set
        self.listener.by_set = self.leadership.by_set = env.by_set
        if env.by_set:
            self.runner.settings_statement = db.settings_statement(**BOOKKEEPING)

    async def _recheck_environment(self) -> None:
        """The listener reconnected: the way to the server may have changed (a pooler put in
        between).  A refusal now stops the worker gracefully, with exit status 78."""
        from worker.db import environment

        env = await environment.probe(self.url)
        refusal = environment.refusal(environment.findings(env))
        if refusal is not None and not self.stopping:
            log.error("stopping: cannot run on %s: %s", db.describe_target(self.url), refusal)
            self.exit_code = environment.EXIT_UNSUITABLE
            self.request_stop()

    async def _configure_session(self, conn: AsyncConnection[TupleRow]) -> None:
        """A new pooled session: the worker's settings, if startup options cannot carry them."""
        if self.by_set:
            await conn.execute(db.settings_statement(**BOOKKEEPING))

    async def _configure_run_session(self, conn: AsyncConnection[TupleRow]) -> None:
        """A new run session: as any pooled session, and the notifications a job's LISTEN
        brings are dropped as they arrive (psycopg would keep them for ever).  psycopg
        prepares nothing on it: the run's own statements are prepared by the worker (see
        worker.db.message), and a job may deallocate whatever is prepared."""
        conn.add_notify_handler(_drop_notification)
        conn.prepare_threshold = None
        await self._configure_session(conn)

    async def _clean_session(self, conn: AsyncConnection[TupleRow]) -> None:
        again = b"; " + db.settings_statement(**BOOKKEEPING) if self.by_set else b""
        await conn.execute(CLEAN_SESSION + again)

    async def _watchdog(self, interval: float) -> None:
        # Pinged from the event loop itself: a stuck loop stops the pings and systemd restarts us.
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.stopping:
            log.warning("second %s: exiting now", sig.name)
            os._exit(1)
        log.info(
            "%s received: finishing running jobs (up to %ss), claiming no more",
            sig.name,
            self.settings.grace_period,
        )
        self.request_stop()

    def request_stop(self) -> None:
        self.stopping = True
        self.alarm.ring_now()

    async def _shutdown(self) -> int:
        self.notifier.stopping()
        if self.active:
            _, pending = await asyncio.wait(self.active, timeout=self.settings.grace_period)
            if pending:
                log.warning("grace period over: cancelling %s run(s); they will be rerun", len(pending))
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
        # A service may start another while it is being cancelled (leadership won
        # at the last moment): cancel until none is left.
        # A cancellation can also be swallowed by a library waiting inside the task (a pool
        # handing out a connection): cancel again until every one has ended.
        while running := [t for t in [*self._services, *self._announcing] if not t.done()]:
            for task in running:
                task.cancel()
            await asyncio.wait(running, timeout=1)
        try:
            async with self.pool.connection(timeout=5) as conn:
                await conn.execute(Q["stop_worker"], {"worker_id": self.listener.worker_id})
        except Exception as exc:
            log.warning("could not record the worker as stopped: %s", exc)
        connectors.REGISTRY.close()  # the child processes of isolated python jobs
        await self.run_pool.close()
        await self.pool.close()
        self.notifier.close()
        log.info("worker %s stopped", self.listener.worker_id)
        return self.exit_code
