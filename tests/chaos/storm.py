"""Kill storm: three replicas, a hundred `sql` jobs every 1-2 s, a random replica SIGKILLed
(and restarted) every few seconds.

Each job's statement is its own evidence of overlapping runs: it takes an advisory
transaction lock of the chaos namespace on its id (a failure bumps a sequence, which no
rollback undoes), sleeps a little, and inserts a tick row with its run's id and its start
and end times.  Overlaps are then counted three independent ways: the runs' own intervals
in sync_runs, the evidence lock's failures, and the committed ticks' intervals.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from .harness import EVIDENCE_LOCK_NS, Cluster, Figure, at_most, info, percentile, zero

S = "kill storm"

STATEMENT = """DO $chaos$
DECLARE
  began timestamptz := clock_timestamp();
  got boolean;
  rid bigint;
BEGIN
  got := pg_try_advisory_xact_lock({ns}, {id});
  IF NOT got THEN
    PERFORM nextval('public.chaos_lock_failures');
  END IF;
  SELECT running_run_id INTO rid FROM syncworker.integrations WHERE id = {id};
  PERFORM pg_sleep(0.02 + random() * 0.08);
  INSERT INTO public.chaos_ticks (job_id, run_id, pid, got_lock, started_at, ended_at)
  VALUES ({id}, rid, pg_backend_pid(), got, began, clock_timestamp());
END
$chaos$"""


def run(workdir: Path, duration: float, kill_every: float = 5.0, jobs: int = 100) -> list[Figure]:
    with Cluster(workdir / "storm") as c:
        c.execute(
            """CREATE TABLE public.chaos_ticks (id bigserial PRIMARY KEY, job_id bigint, run_id bigint,
                                                pid int, got_lock boolean,
                                                started_at timestamptz, ended_at timestamptz);
               CREATE SEQUENCE public.chaos_lock_failures"""
        )
        rng = random.Random()
        for i in range(jobs):
            job = c.add_job(
                f"storm-{i:03d}",
                "sql",
                {"statement": "SELECT 1"},
                interval_seconds=rng.choice([1, 2]),
            )
            c.execute(
                "UPDATE syncworker.integrations SET config = jsonb_build_object('statement', %s::text), "
                f"next_sync_at = now() + {rng.random() * 2:.3f} * interval '1 second' WHERE id = %s",
                (STATEMENT.format(ns=EVIDENCE_LOCK_NS, id=job), job),
            )
        replicas = [c.start(f"storm{i}") for i in range(3)]
        for replica in replicas:
            replica.ready()

        began = c.now()
        kills: dict[int, float] = {}  # worker id of the victim -> moment of its SIGKILL
        deadline = time.monotonic() + duration
        next_kill = time.monotonic() + kill_every
        while next_kill <= deadline:
            time.sleep(max(0.0, next_kill - time.monotonic()))
            victim = rng.choice(replicas)
            wid = victim.worker_id()
            kills[wid] = c.now()
            victim.kill()
            victim.start()
            next_kill += kill_every
        time.sleep(max(0.0, deadline - time.monotonic()))
        ended = c.now()

        # Let the last victims' runs be rescued, then stop every replica cleanly.
        victims = list(kills)
        settled = time.monotonic() + 15
        while time.monotonic() < settled and c.one(
            "SELECT count(*) FROM syncworker.sync_runs WHERE status = 'running' AND worker_id = ANY(%s)",
            (victims,),
        ):
            time.sleep(0.1)
        for replica in replicas:
            replica.ready()  # a replica SIGTERMed while it starts exits before it can stop cleanly
        exits = c.stop_all()

        figures = [
            info(
                S,
                "duration / kills / runs",
                f"{ended - began:.0f} s / {len(kills)} / "
                f"{c.one('SELECT count(*) FROM syncworker.sync_runs')}",
            ),
        ]
        figures += overlaps(c)
        left = c.rows(
            """SELECT r.worker_id = ANY(%s) AS killed, r.locked_at IS NOT NULL AS locked,
                      extract(epoch FROM r.started_at)::float8 AS started
                 FROM syncworker.sync_runs r WHERE r.status = 'running'""",
            (list(kills),),
        )
        figures.append(
            zero(
                S,
                "runs left `running` after the replicas stopped",
                len(left),
                ", ".join(
                    f"{'killed' if r['killed'] else 'stopped'} worker, {'' if r['locked'] else 'not '}locked,"
                    f" started {r['started'] - ended:+.1f} s after the storm"
                    for r in left[:3]
                ),
            )
        )
        figures += rescue_times(c, kills)
        gap = c.rows(
            """SELECT extract(epoch FROM gap)::float8 AS gap, interval_seconds FROM (
                 SELECT r.started_at - lag(r.started_at) OVER (PARTITION BY r.integration_id
                                                                ORDER BY r.started_at) AS gap,
                        i.interval_seconds
                   FROM syncworker.sync_runs r JOIN syncworker.integrations i ON i.id = r.integration_id
                  WHERE r.started_at BETWEEN to_timestamp(%s) AND to_timestamp(%s)) g
                WHERE gap IS NOT NULL ORDER BY gap DESC LIMIT 1""",
            (began, ended),
        )
        if gap:
            figures.append(
                info(
                    S,
                    "largest gap between a job's starts (s)",
                    f"{gap[0]['gap']:.2f} (interval {gap[0]['interval_seconds']} s)",
                )
            )
        late = c.one(
            """SELECT percentile_cont(0.95)
                        WITHIN GROUP (ORDER BY extract(epoch FROM started_at - scheduled_for))
                 FROM syncworker.sync_runs WHERE trigger = 'schedule'
                  AND started_at BETWEEN to_timestamp(%s) AND to_timestamp(%s)""",
            (began, ended),
        )
        figures.append(info(S, "scheduled runs' lateness p95 (s)", f"{float(late or 0):.2f}"))
        committed = c.one(
            """SELECT count(*) FROM public.chaos_ticks t JOIN syncworker.sync_runs r ON r.id = t.run_id
                WHERE r.status = 'abandoned'"""
        )
        figures.append(zero(S, "tick rows committed by runs that ended abandoned", int(committed)))
        figures.append(zero(S, "worker exits (other than the kills)", len(exits), "; ".join(exits)))
        if c.slow_stops:
            figures.append(info(S, "replicas SIGKILLed 40 s after SIGTERM", ", ".join(c.slow_stops)))
        return figures


def overlaps(c: Cluster) -> list[Figure]:
    by_runs = c.one(
        """SELECT count(*) FROM (
             SELECT started_at < max(coalesce(finished_at, 'infinity')) OVER (
                      PARTITION BY integration_id ORDER BY started_at, id
                      ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS overlapping
               FROM syncworker.sync_runs) o WHERE overlapping"""
    )
    failures = c.one("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM public.chaos_lock_failures")
    committed_failures = c.one("SELECT count(*) FROM public.chaos_ticks WHERE NOT got_lock")
    by_ticks = c.one(
        """SELECT count(*) FROM (
             SELECT started_at < max(ended_at) OVER (
                      PARTITION BY job_id ORDER BY started_at, id
                      ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS overlapping
               FROM public.chaos_ticks) o WHERE overlapping"""
    )
    return [
        zero(S, "overlapping runs: (a) sync_runs intervals of one job", int(by_runs)),
        zero(
            S,
            "overlapping runs: (b) the job's own advisory lock was taken",
            int(failures),
            f"{committed_failures} of them committed",
        ),
        zero(S, "overlapping runs: (c) tick rows of one job overlap", int(by_ticks)),
    ]


def rescue_times(c: Cluster, kills: dict[int, float]) -> list[Figure]:
    """Kill -> abandoned, and kill -> the rerun's start, for every run a kill cut short."""
    cut = c.rows(
        """SELECT r.id, r.worker_id, extract(epoch FROM r.finished_at)::float8 AS abandoned,
                  (SELECT extract(epoch FROM min(n.started_at))::float8 FROM syncworker.sync_runs n
                    WHERE n.integration_id = r.integration_id AND n.id > r.id) AS rerun
             FROM syncworker.sync_runs r
            WHERE r.status = 'abandoned' AND r.worker_id = ANY(%s)""",
        (list(kills),),
    )
    to_abandoned = [r["abandoned"] - kills[r["worker_id"]] for r in cut]
    to_rerun = [r["rerun"] - kills[r["worker_id"]] for r in cut if r["rerun"] is not None]
    never = len(cut) - len(to_rerun)
    figures = [info(S, "runs cut short by the kills", len(cut))]
    if not cut:
        return figures
    figures.append(
        info(
            S,
            "kill -> run abandoned (s), p95 / max",
            f"{percentile(to_abandoned, 0.95):.2f} / {max(to_abandoned):.2f}",
        )
    )
    if to_rerun:
        figures.append(info(S, "kill -> rerun starts (s), p95", f"{percentile(to_rerun, 0.95):.2f}"))
    if never:
        figures.append(
            Figure(S, "kill -> rerun starts (s), max", f"{never} cut run(s) never rerun", "<= 5 s", False)
        )
    else:
        figures.append(at_most(S, "kill -> rerun starts (s), max", max(to_rerun), 5.0))
    return figures
