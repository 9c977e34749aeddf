"""SIGSTOP: a frozen runner replica (its runs are stuck: does anything else stall?), then a
frozen leader while another replica is SIGKILLed mid-run (is the run rescued, does a
standby take over the leader's duties?).

Replicas: the leader (`--concurrency 1`, kept busy by an occupier so that it runs nothing
else), r1 (runs a long job, then the victim) and r2; six control jobs tick every second.
"""

from __future__ import annotations

import time
from pathlib import Path

from .harness import Cluster, Figure, at_most, info, wait_all, wait_until, zero

S = "SIGSTOP"
CONTROL_JOBS = 6


def run(workdir: Path, stop_seconds: float, cap: float) -> list[Figure]:
    with Cluster(workdir / "freeze") as c:
        leader = c.start("leader", "--concurrency", "1").ready()
        c.occupy(leader)
        r1 = c.start("r1").ready()
        long_job = c.add_job("long", "python", {"callable": "jobs:sleep", "options": {"seconds": 3600}})
        long_run = wait_until(lambda: c.running_run(long_job), 15)
        if long_run is None or long_run["pid"] != r1.pid:
            raise RuntimeError(f"the long job did not start on r1:\n{r1.tail()}")
        r2 = c.start("r2").ready()
        controls = [
            c.add_job(
                f"control-{i}",
                "sql",
                {"statement": "INSERT INTO public.ticks DEFAULT VALUES"},
                interval_seconds=1,
            )
            for i in range(CONTROL_JOBS)
        ]
        time.sleep(3)

        # 1. A frozen runner replica.
        r1_id = r1.worker_id()
        stopped = c.now()
        r1.freeze()
        held = held_through(c, controls, stop_seconds)
        r1.thaw()
        resumed = c.now()
        time.sleep(2)
        stuck = held | {
            row["integration_id"]
            for row in c.rows(
                """SELECT integration_id FROM syncworker.sync_runs
                    WHERE worker_id = %s AND started_at < to_timestamp(%s)
                      AND (finished_at IS NULL OR finished_at > to_timestamp(%s))
                      AND integration_id = ANY(%s)""",
                (r1_id, resumed - 0.5, stopped + 0.5, controls),
            )
        }
        others = [job for job in controls if job not in stuck]
        figures = [
            info(
                S,
                f"runner frozen {stop_seconds:g} s: control jobs stuck with it",
                f"{len(stuck)} of {len(controls)}",
            ),
            at_most(
                S,
                "runner frozen: the other control jobs' worst lateness (s)",
                worst_lateness(c, others, stopped, resumed),
                2.0,
            ),
        ]

        # 2. A frozen leader, and a runner killed mid-run meanwhile.
        standby_ids = [r1_id, r2.worker_id()]
        leader.freeze()
        frozen = c.now()
        killed = c.now()
        r1.kill()
        found = wait_all(
            ["rescue", "leader"],
            lambda what: (
                c.first_run_after(long_job, long_run["id"])
                if what == "rescue"
                else c.one(
                    "SELECT extract(epoch FROM now())::float8 FROM syncworker.workers "
                    "WHERE leader AND stopped_at IS NULL AND id = ANY(%s) LIMIT 1",
                    (standby_ids,),
                )
            ),
            cap,
        )
        rescued = found.get("rescue")
        figures += [
            at_most(
                S,
                "leader frozen, runner killed: kill -> rerun starts (s)",
                None if rescued is None else rescued["started"] - killed,
                5.0,
                cap=cap,
            ),
            at_most(
                S,
                "leader frozen: a standby takes over its duties (s)",
                None if "leader" not in found else max(0.0, found["leader"] - frozen),
                10.0,
                cap=cap,
            ),
        ]
        leader.thaw()
        time.sleep(2)
        leaders = c.one("SELECT count(*) FROM syncworker.workers WHERE leader AND stopped_at IS NULL")
        figures.append(info(S, "replicas that say they lead, 2 s after SIGCONT", leaders))
        exits = c.unexpected_exits()
        figures.append(zero(S, "worker exits (other than the kill)", len(exits), "; ".join(exits)))
        return figures


def held_through(c: Cluster, jobs: list[int], seconds: float) -> set[int]:
    """Sleep `seconds`, and return the jobs whose rows stayed locked all along (sampled three
    times): a frozen replica holds the row of a job whose run it was finishing, its final
    COMMIT not yet sent, until it resumes, as it holds the jobs it is running."""
    held = set(jobs)
    for _ in range(3):
        time.sleep(seconds / 3)
        free = c.rows(
            "SELECT id FROM syncworker.integrations WHERE id = ANY(%s) FOR SHARE SKIP LOCKED", (jobs,)
        )
        held -= {row["id"] for row in free}
    return held


def worst_lateness(c: Cluster, jobs: list[int], since: float, until: float) -> float:
    """The worst delay of these jobs over [since, until]: a run's start after its slot, or a
    slot with no start at all (the largest gap between starts, less the 1 s interval)."""
    if not jobs:
        return 0.0
    late = c.one(
        """SELECT max(extract(epoch FROM started_at - scheduled_for))::float8 FROM syncworker.sync_runs
            WHERE integration_id = ANY(%s) AND scheduled_for BETWEEN to_timestamp(%s) AND to_timestamp(%s)""",
        (jobs, since, until),
    )
    gap = c.one(
        """SELECT max(extract(epoch FROM gap))::float8 - 1 FROM (
             SELECT started_at - lag(started_at) OVER (PARTITION BY integration_id ORDER BY started_at) AS gap
               FROM syncworker.sync_runs
              WHERE integration_id = ANY(%s)
                AND started_at BETWEEN to_timestamp(%s) - interval '1 second'
                                   AND to_timestamp(%s) + interval '1 second') g""",
        (jobs, since, until),
    )
    return max(float(late or 0), float(gap or 0))
