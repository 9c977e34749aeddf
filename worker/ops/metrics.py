"""Prometheus metrics: this replica's own counters, and the fleet as the tables tell it.

The replica's metrics are kept in memory (runs started and finished, durations, what runs
now, leadership, the listener).  The fleet's (every job's health, last success, failures in a
row, next due time; unresolved errors by type; live workers) come from one query whose result
is cached for FLEET_TTL seconds and refreshed in the background, so a scrape never waits on it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from psycopg import AsyncConnection
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

from worker.db.queries import Q
from worker.run.runner import Job, PooledRunner

log = logging.getLogger("syncworker.metrics")

FLEET_TTL = 5.0
# Health words in the order `syncworker status` ranks them, each a label value of
# syncworker_integration_health.
HEALTH_WORDS = ("disabled", "paused", "failing", "stale", "overrunning", "late", "degraded", "pending", "ok")
DURATION_BUCKETS = (0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, float("inf"))


class Metrics:
    """This replica's metrics, in a registry of its own."""

    def __init__(self, concurrency: int) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series
        self.registry = CollectorRegistry()
        self._children: dict[tuple[Any, ...], Any] = {}
        r = self.registry
        self.runs_started = Counter(
            "syncworker_runs_started", "Runs this replica started, by job kind", ["kind"], registry=r
        )
        self.runs_finished = Counter(
            "syncworker_runs_finished",
            "Runs this replica finished, by job kind and status "
            "(success, partial, failed, abandoned: handed back or lost)",
            ["kind", "status"],
            registry=r,
        )
        self.run_duration = Histogram(
            "syncworker_run_duration_seconds",
            "Duration of the runs this replica finished, by job kind",
            ["kind"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.running = Gauge("syncworker_runs_running", "Runs in progress on this replica", registry=r)
        self.concurrency = Gauge(
            "syncworker_concurrency", "Runs this replica may run at once (--concurrency)", registry=r
        )
        self.concurrency.set(concurrency)
        self.leader = Gauge("syncworker_leader", "1 while this replica is the leader", registry=r)
        self.listener_connected = Gauge(
            "syncworker_listener_connected", "1 while this replica's LISTEN session is connected", registry=r
        )
        self.alerts_sent = Counter(
            "syncworker_alerts_sent",
            "Alert notifications delivered by this replica, by channel and event",
            ["channel", "event"],
            registry=r,
        )
        self.alerts_failed = Counter(
            "syncworker_alerts_failed",
            "Alert deliveries that failed (each attempt), by channel",
            ["channel"],
            registry=r,
        )
        self.http_requests = Counter(
            "syncworker_http_requests",
            "Requests to this replica's HTTP server, by path and status code",
            ["path", "code"],
            registry=r,
        )
        self.fleet = Fleet()
        r.register(self.fleet)
        self.in_progress = 0

    def watch(self, *, leader: Callable[[], bool], listener_connected: Callable[[], bool]) -> None:
        self.leader.set_function(lambda: float(leader()))
        self.listener_connected.set_function(lambda: float(listener_connected()))

    def run_started(self, kind: str) -> None:
        self._child(self.runs_started, kind).inc()
        self.running.inc()
        self.in_progress += 1

    def run_finished(self, kind: str, status: str, seconds: float) -> None:
        self.running.dec()
        self.in_progress -= 1
        self._child(self.runs_finished, kind, status).inc()
        self._child(self.run_duration, kind).observe(seconds)

    def _child(self, family: Any, *labels: str) -> Any:
        """A labelled series, looked up once (a lookup per run costs more than the count)."""
        key = (id(family), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = family.labels(*labels)
        return child


class MeasuredRunner(PooledRunner):
    """The runner, counting each run it executes in `metrics`."""

    def __init__(self, *args: Any, metrics: Metrics, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.metrics = metrics

    async def _run_on(self, conn: AsyncConnection[TupleRow], job: Job, following: Any = None) -> str | None:
        kind = _label(job.kind)
        self.metrics.run_started(kind)
        started = time.monotonic()
        status: str | None = None
        try:
            status = await super()._run_on(conn, job, following)
            return status
        finally:
            self.metrics.run_finished(kind, status or "abandoned", time.monotonic() - started)


def _label(value: Any, limit: int = 100) -> str:
    return str(value)[:limit] if value is not None else ""


@dataclass
class Snapshot:
    """The fleet as one query saw it (`jobs`: rows of syncworker.status)."""

    jobs: list[dict[str, Any]] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    workers: list[dict[str, Any]] = field(default_factory=list)
    db_now: float = 0.0
    taken: float = 0.0  # time.monotonic() when read; 0: never

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Snapshot:
        def load(value: Any, default: Any) -> Any:
            if value is None:
                return default
            return json.loads(value) if isinstance(value, str | bytes) else value

        return cls(
            jobs=load(row["jobs"], []),
            errors={str(k): int(v) for k, v in load(row["errors"], {}).items()},
            workers=load(row["workers"], []),
            db_now=float(row["db_now"]),
            taken=time.monotonic(),
        )


class Fleet(Collector):
    """The fleet's metrics, from the latest snapshot of the tables.

    A scrape never waits on the tables once a first snapshot exists: it is served the latest
    one, and one older than the TTL is read again in the background (one read at a time).
    The per-job series (7 families x the number of jobs) are rendered once per snapshot, in
    a thread, and kept as text: at 10,000 jobs that is the costly part of a scrape.  Only
    `syncworker_fleet_up` and `syncworker_fleet_read_seconds` are live in the registry."""

    def __init__(self, ttl: float = FLEET_TTL) -> None:
        self.ttl = ttl
        self.snapshot = Snapshot()
        self.text = b""  # the snapshot's series in the text format
        self.error: str | None = None
        self.read_seconds = 0.0
        self._reading: asyncio.Task[None] | None = None

    def warm(self, pool: AsyncConnectionPool[AsyncConnection[TupleRow]]) -> None:
        """Start the first read (at start-up, so that the first scrape need not wait for it)."""
        if self._reading is None:
            self._reading = asyncio.create_task(self._read(pool), name="fleet read")

    async def refresh(self, pool: AsyncConnectionPool[AsyncConnection[TupleRow]]) -> Snapshot | None:
        """The latest snapshot, or None when the latest read failed.  Until there is a first
        snapshot, a call waits for a read; after that, a stale snapshot is read again in the
        background and the call returns at once."""
        stale = time.monotonic() - self.snapshot.taken >= self.ttl
        if stale and (self._reading is None or self._reading.done()):
            self._reading = asyncio.create_task(self._read(pool), name="fleet read")
        if not self.snapshot.taken and self._reading is not None:
            await asyncio.shield(self._reading)
        return None if self.error is not None else self.snapshot

    async def _read(self, pool: AsyncConnectionPool[AsyncConnection[TupleRow]]) -> None:
        """Read the tables, render the series; on failure keep the old snapshot and log why."""
        started = time.monotonic()
        try:
            async with pool.connection(timeout=5) as conn, conn.transaction():
                # A planner estimate over 10,000 jobs turns JIT on, which costs more than the read.
                await conn.execute("SET LOCAL statement_timeout = '5s'; SET LOCAL jit = off")
                cur = await conn.execute(Q["fleet"])
                row = await cur.fetchone()
                assert row is not None and cur.description is not None
                names = [d.name for d in cur.description]
            snapshot = Snapshot.from_row(dict(zip(names, row, strict=True)))
            self.text = await asyncio.to_thread(render, snapshot)
            self.snapshot, self.error = snapshot, None
        except Exception as exc:
            self.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log.warning("could not read the fleet's status: %s", self.error)
        self.read_seconds = time.monotonic() - started

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "syncworker_fleet_up",
            "1 if the latest read of the fleet's tables succeeded",
            value=1.0 if self.snapshot.taken and self.error is None else 0.0,
        )
        yield GaugeMetricFamily(
            "syncworker_fleet_read_seconds",
            "How long the latest read of the fleet's tables and its rendering took",
            value=self.read_seconds,
        )


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def render(snap: Snapshot) -> bytes:
    """The fleet's series of one snapshot, in the Prometheus text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families([*_job_families(snap), *_fleet_families(snap)]))
    return generate_latest(registry)


def _job_families(snap: Snapshot) -> list[Metric]:
    """One series per integration and family, from the fleet snapshot."""
    labels = ["integration", "kind"]
    enabled = GaugeMetricFamily("syncworker_integration_enabled", "1 if the job is enabled", labels=labels)
    health = GaugeMetricFamily(
        "syncworker_integration_health",
        "1, labelled with the job's health word in syncworker.status (one series per job)",
        labels=[*labels, "health"],
    )
    last_success = GaugeMetricFamily(
        "syncworker_integration_last_success_timestamp_seconds",
        "When the job last succeeded (success or partial), Unix time; absent if never",
        labels=labels,
    )
    last_duration = GaugeMetricFamily(
        "syncworker_integration_last_duration_seconds",
        "Duration of the job's latest finished run",
        labels=labels,
    )
    failures = GaugeMetricFamily(
        "syncworker_integration_consecutive_failures",
        "Failed runs in a row (retry_count)",
        labels=labels,
    )
    next_due = GaugeMetricFamily(
        "syncworker_integration_next_due_timestamp_seconds",
        "When the job is next due, Unix time; absent for a job with nothing scheduled",
        labels=labels,
    )
    running = GaugeMetricFamily(
        "syncworker_integration_running", "1 while a run of the job is in progress", labels=labels
    )
    running_for = GaugeMetricFamily(
        "syncworker_integration_running_seconds",
        "How long the job's run in progress has taken so far (0 when idle)",
        labels=labels,
    )
    for job in snap.jobs:
        key = [_label(job.get("name"), 200), _label(job.get("kind"))]
        enabled.add_metric(key, 1.0 if job.get("enabled") else 0.0)
        health.add_metric([*key, _label(job.get("health"))], 1.0)
        if job.get("last_success_epoch") is not None:
            last_success.add_metric(key, float(job["last_success_epoch"]))
        if job.get("last_duration_ms") is not None:
            last_duration.add_metric(key, float(job["last_duration_ms"]) / 1000)
        failures.add_metric(key, float(job.get("retry_count") or 0))
        if job.get("next_sync_epoch") is not None and job.get("enabled"):
            next_due.add_metric(key, float(job["next_sync_epoch"]))
        running.add_metric(key, 1.0 if job.get("running") else 0.0)
        since = job.get("running_since_epoch")
        running_for.add_metric(key, max(0.0, snap.db_now - float(since)) if since is not None else 0.0)
    return [enabled, health, last_success, last_duration, failures, next_due, running, running_for]


def _fleet_families(snap: Snapshot) -> Iterator[Metric]:
    """Unresolved errors by type, the replicas alive and the leaders."""
    errors = GaugeMetricFamily(
        "syncworker_unresolved_errors",
        "Unresolved rows in sync_errors, by error_type",
        labels=["error_type"],
    )
    for error_type, count in sorted(snap.errors.items()):
        errors.add_metric([_label(error_type)], float(count))
    yield errors

    alive = [w for w in snap.workers if w.get("alive")]
    yield GaugeMetricFamily(
        "syncworker_workers_alive", "Replicas holding their liveness lock", value=float(len(alive))
    )
    yield GaugeMetricFamily(
        "syncworker_leaders",
        "Live replicas that say they lead (1 in a healthy fleet)",
        value=float(sum(1 for w in alive if w.get("leader"))),
    )
