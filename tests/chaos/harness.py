"""What every chaos scenario needs: a database of its own, real replicas, signals, and figures.

A `Cluster` creates a migrated database (dropped on exit) and starts `python -m worker run`
replicas against it, each logging to a file of its own that survives restarts.  Times are
compared on the database's clock: the harness measures the offset between its own clock
and the server's once, so a kill's moment and a run's `started_at` can be subtracted.

The ids of the cluster's integrations and workers start at a random offset.  The worker's
advisory locks are keyed by these ids, and the rescuer reads `pg_locks` for the whole server
(every database): a test of another database holding integration 1's or worker 2's lock at
the same moment would make this cluster's dead runs look alive.  With the offset, the
figures describe this cluster and nothing else that runs on the same server.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from psycopg.types.json import Jsonb

from helpers import ROOT, create_database, drop_database, execute, one, rows, worker_env

T = TypeVar("T")

# Namespace (first key) of the advisory locks the chaos jobs take as their own evidence of
# overlapping runs; distinct from syncworker's lock_key() values.
EVIDENCE_LOCK_NS = 1128808787


# -- figures ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Figure:
    """One measured figure of a scenario, with its target; `ok` is None when there is no target
    (information) or the measure was skipped."""

    scenario: str
    measure: str
    value: str
    target: str = ""
    ok: bool | None = None

    @property
    def verdict(self) -> str:
        return {True: "yes", False: "NO", None: ""}[self.ok]

    def describe(self) -> str:
        return f"{self.scenario}: {self.measure} = {self.value} (target {self.target})"


def seconds(value: float | None, cap: float | None = None) -> str:
    if value is None:
        return f"none within {cap:.0f} s" if cap is not None else "n/a"
    return f"{value:.2f}"


def at_most(
    scenario: str,
    measure: str,
    value: float | None,
    limit: float,
    *,
    cap: float | None = None,
    unit: str = "s",
) -> Figure:
    """A duration (None: it never happened within `cap`) that must not exceed `limit`."""
    shown = seconds(value, cap) if unit == "s" else ("n/a" if value is None else f"{value:g}")
    return Figure(
        scenario, measure, shown, f"<= {limit:g} {unit}".strip(), value is not None and value <= limit
    )


def zero(scenario: str, measure: str, count: int, detail: str = "") -> Figure:
    shown = f"{count}" + (f" ({detail})" if detail and count else "")
    return Figure(scenario, measure, shown, "0", count == 0)


def info(scenario: str, measure: str, value: object) -> Figure:
    return Figure(scenario, measure, str(value))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def wait_until(condition: Callable[[], T], timeout: float, interval: float = 0.05) -> T | None:
    """Poll `condition` until it is truthy; None after `timeout` seconds (no exception)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            return None
        time.sleep(interval)


# -- replicas -----------------------------------------------------------------------------


class Replica:
    """One `syncworker run` process, restartable; its output goes to one log file."""

    def __init__(self, cluster: Cluster, name: str, args: tuple[str, ...]) -> None:
        self.cluster = cluster
        self.name = name
        self.args = args
        self.log_path = cluster.workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.ended_by_us = False
        self.unexpected_exits: list[int] = []
        self._worker_id: int | None = None
        self.start()

    def start(self) -> None:
        self._note_exit()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "worker", "run", *self.args],
                env=self.cluster.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        self.ended_by_us = False
        self._worker_id = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _note_exit(self) -> None:
        """Remember an exit nobody asked for (a crash) before the process object is replaced."""
        if self.proc is not None and not self.ended_by_us and self.proc.poll() is not None:
            self.unexpected_exits.append(self.proc.returncode)
            self.ended_by_us = True  # counted once

    def worker_id(self, timeout: float = 15) -> int:
        """Its row in syncworker.workers (waits for the process to register)."""
        if self._worker_id is None:
            found = wait_until(
                lambda: (
                    not self.alive()
                    or one(
                        self.cluster.url,
                        "SELECT id FROM syncworker.workers WHERE pid = %s ORDER BY id DESC LIMIT 1",
                        (self.pid,),
                    )
                ),
                timeout,
            )
            if found is True:
                found = None
            if found is None:
                raise RuntimeError(f"replica {self.name} (pid {self.pid}) did not register:\n{self.tail()}")
            self._worker_id = int(found)
        return self._worker_id

    def ready(self, timeout: float = 15) -> Replica:
        """Registered, and its first heartbeat written (its pools and services are up)."""
        wid = self.worker_id(timeout)
        wait_until(
            lambda: one(
                self.cluster.url,
                "SELECT heartbeat_at > started_at FROM syncworker.workers WHERE id = %s",
                (wid,),
            ),
            timeout,
        )
        time.sleep(0.2)
        return self

    def signal(self, sig: signal.Signals) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self._note_exit()
        self.ended_by_us = True
        self.signal(signal.SIGKILL)
        assert self.proc is not None
        self.proc.wait(10)

    def freeze(self) -> None:
        self.signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.signal(signal.SIGCONT)

    def stop(self, timeout: float = 40, *, signalled: bool = False) -> int | None:
        """SIGTERM (after SIGCONT, in case it is frozen) unless `signalled` already; SIGKILL
        if it does not exit in time.  (A second SIGTERM would make it exit at once.)"""
        self._note_exit()
        if not self.alive():
            return None
        assert self.proc is not None
        self.ended_by_us = True
        if not signalled:
            self.thaw()
            self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self, chars: int = 3000) -> str:
        return self.output()[-chars:]


# -- the cluster --------------------------------------------------------------------------


class Cluster:
    """A migrated database of its own and the replicas started against it."""

    def __init__(self, workdir: Path, **env: str) -> None:
        from worker.db.migrate import upgrade

        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.db_name, self.url = create_database()
        self.replicas: list[Replica] = []
        self.slow_stops: list[str] = []
        try:
            upgrade(self.url)
            base = random.randrange(10**8, 10**9)
            execute(
                self.url,
                f"ALTER TABLE syncworker.integrations ALTER COLUMN id RESTART WITH {base};"
                f"ALTER TABLE syncworker.workers ALTER COLUMN id RESTART WITH {base}",
            )
            execute(
                self.url,
                """CREATE TABLE public.job_events (id bigserial PRIMARY KEY, integration text, run_id bigint,
                                                   event text, pid int,
                                                   at timestamptz DEFAULT clock_timestamp());
                   CREATE TABLE public.job_rows (id bigserial PRIMARY KEY, run_id bigint);
                   CREATE TABLE public.ticks (id bigserial PRIMARY KEY,
                                              at timestamptz DEFAULT clock_timestamp())""",
            )
            self.offset = self._clock_offset()
        except BaseException:
            drop_database(self.db_name)
            raise
        self.env = worker_env(self.url, **env)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _clock_offset(self) -> float:
        """Database clock minus this process's clock, from the quickest of a few round trips."""
        best: tuple[float, float] | None = None
        with psycopg.connect(self.url, autocommit=True) as conn:
            for _ in range(5):
                before = time.time()
                row = conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()
                after = time.time()
                assert row is not None
                if best is None or after - before < best[0]:
                    best = (after - before, float(row[0]) - (before + after) / 2)
        assert best is not None
        return best[1]

    def now(self) -> float:
        """Now, on the database's clock (epoch seconds)."""
        return time.time() + self.offset

    # -- queries --------------------------------------------------------------------------

    def rows(self, sql: str, params: Any = None) -> list[dict[str, Any]]:
        return rows(self.url, sql, params)

    def one(self, sql: str, params: Any = None) -> Any:
        return one(self.url, sql, params)

    def execute(self, sql: str, params: Any = None) -> None:
        execute(self.url, sql, params)

    def add_job(self, name: str, kind: str, config: dict[str, Any], **columns: Any) -> int:
        cols = {"name": name, "kind": kind, "config": Jsonb(config), **columns}
        names = ", ".join(cols)
        marks = ", ".join(f"%({c})s" for c in cols)
        return int(
            self.one(f"INSERT INTO syncworker.integrations ({names}) VALUES ({marks}) RETURNING id", cols)
        )

    def running_run(self, job_id: int) -> dict[str, Any] | None:
        """The job's live run (once its session holds the lock), with the worker's pid."""
        found = self.rows(
            """SELECT r.id, r.worker_id, w.pid, extract(epoch FROM r.started_at)::float8 AS started
                 FROM syncworker.sync_runs r LEFT JOIN syncworker.workers w ON w.id = r.worker_id
                WHERE r.integration_id = %s AND r.status = 'running' AND r.locked_at IS NOT NULL
                ORDER BY r.id DESC LIMIT 1""",
            (job_id,),
        )
        return found[0] if found else None

    def first_run_after(self, job_id: int, run_id: int) -> dict[str, Any] | None:
        """The first run of the job opened after run `run_id` (its rerun)."""
        found = self.rows(
            """SELECT id, trigger, extract(epoch FROM started_at)::float8 AS started
                 FROM syncworker.sync_runs WHERE integration_id = %s AND id > %s ORDER BY id LIMIT 1""",
            (job_id, run_id),
        )
        return found[0] if found else None

    def abandoned_at(self, run_id: int) -> float | None:
        at: float | None = self.one(
            "SELECT extract(epoch FROM finished_at)::float8 FROM syncworker.sync_runs "
            "WHERE id = %s AND status = 'abandoned'",
            (run_id,),
        )
        return at

    # -- replicas -------------------------------------------------------------------------

    def start(self, name: str, *args: str) -> Replica:
        """A new replica; a short grace period unless `args` say otherwise, so that stopping
        a replica busy with an hour-long job does not take long."""
        replica = Replica(self, name, ("--grace-period", "2", *args))
        self.replicas.append(replica)
        return replica

    def occupy(self, replica: Replica, name: str = "occupier") -> int:
        """Fill a `--concurrency 1` replica with a job that sleeps for an hour, so that the
        jobs added next run elsewhere; returns the occupier's id."""
        job = self.add_job(name, "python", {"callable": "jobs:sleep", "options": {"seconds": 3600}})
        run = wait_until(lambda: self.running_run(job), 15)
        if run is None or run["pid"] != replica.pid:
            raise RuntimeError(f"the occupier did not start on {replica.name}:\n{replica.tail()}")
        return job

    def unexpected_exits(self) -> list[str]:
        """Replicas that exited without being asked to (now or earlier), as 'name: code'."""
        found = []
        for replica in self.replicas:
            replica._note_exit()
            found += [f"{replica.name}: exit {code}" for code in replica.unexpected_exits]
        return found

    def stop_all(self, timeout: float = 40) -> list[str]:
        """Stop every replica gracefully (SIGTERM, all at once); returns the unexpected exits
        over the whole run, an exit code other than 0 on SIGTERM included.  Replicas still
        running `timeout` seconds after SIGTERM are SIGKILLed and listed in `slow_stops`."""
        exits = self.unexpected_exits()
        for replica in self.replicas:
            replica.thaw()
            replica.signal(signal.SIGTERM)
        for replica in self.replicas:
            was_alive = replica.alive()
            code = replica.stop(timeout, signalled=True)
            if was_alive and code is None:
                self.slow_stops.append(replica.name)
            elif was_alive and code != 0:
                exits.append(f"{replica.name}: exit {code} on SIGTERM")
        return exits

    def logs(self) -> str:
        return "\n".join(r.output() for r in self.replicas)

    def close(self) -> None:
        """SIGKILL what still runs (a scenario that wants a graceful stop calls stop_all) and
        drop the database."""
        try:
            for replica in self.replicas:
                if replica.alive():
                    replica.kill()
        finally:
            drop_database(self.db_name)


def wait_all(items: Iterable[T], condition: Callable[[T], Any], timeout: float) -> dict[T, Any]:
    """Poll `condition(item)` for every item until each has given a truthy value once, or
    `timeout` passes; returns the first value per item (missing items never got one)."""
    pending = list(items)
    found: dict[T, Any] = {}
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() <= deadline:
        for item in list(pending):
            value = condition(item)
            if value:
                found[item] = value
                pending.remove(item)
        if pending:
            time.sleep(0.05)
    return found
