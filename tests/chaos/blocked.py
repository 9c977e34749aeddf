"""SIGKILL a replica while its jobs are blocked: inside Postgres (a long statement, a COPY, a
lock wait behind a long transaction) and inside Python (an asyncio sleep, a thread).

Placement: the leader runs with `--concurrency 1` and is kept busy by an occupier job, so
every case runs on replica A; replica B starts once they all run.  Then A is SIGKILLed
and, for each case, the time until its rerun starts is measured (target: 5 s), while the
leader stays healthy.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psycopg

from .harness import Cluster, Figure, at_most, info, wait_all, zero

S = "kill while blocked"

CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "sql `SELECT pg_sleep(60)`": ("sql", {"statement": "SELECT pg_sleep(60)"}),
    "sql waiting on a row lock a long transaction holds": (
        "sql",
        {"statement": "UPDATE public.chaos_hot SET n = n + 1 WHERE id = 1"},
    ),
    "postgres job in a long COPY (slow source query)": (
        "postgres",
        {
            "source": {
                "dsn": {"env": "CHAOS_SOURCE_DSN"},
                # ~2 ms a row: the COPY streams for minutes.
                "query": "SELECT g AS id, md5(g::text) || pg_sleep(0.001)::text AS v "
                "FROM generate_series(1, 100000) g",
                "key": ["id"],
            },
            "destination": {
                "table": "public.chaos_copy",
                "key": ["id"],
                "create_table": True,
                "columns": {"id": "bigint", "v": "text"},
            },
        },
    ),
    "python job in an asyncio sleep": ("python", {"callable": "jobs:sleep", "options": {"seconds": 60}}),
    "python job sleeping in a thread": (
        "python",
        {"callable": "jobs:sleep_blocking", "options": {"seconds": 60}},
    ),
}


def run(workdir: Path, cap: float) -> list[Figure]:
    with Cluster(workdir / "blocked") as c:
        c.env["CHAOS_SOURCE_DSN"] = c.url
        c.execute(
            "CREATE TABLE public.chaos_hot (id int PRIMARY KEY, n int NOT NULL);"
            "INSERT INTO public.chaos_hot VALUES (1, 0)"
        )
        leader = c.start("leader", "--concurrency", "1").ready()
        c.occupy(leader)
        a = c.start("a", "--concurrency", "6").ready()
        with psycopg.connect(c.url) as holder:
            # The long transaction: holds the row the lock-wait case wants to update.
            holder.execute("SELECT n FROM public.chaos_hot WHERE id = 1 FOR UPDATE")
            jobs = {
                name: c.add_job(f"blocked-{i}", kind, config, timeout_seconds=600)
                for i, (name, (kind, config)) in enumerate(CASES.items())
            }
            first = wait_all(jobs.values(), c.running_run, 20)
            missing = [name for name, job in jobs.items() if job not in first]
            if missing or any(run["pid"] != a.pid for run in first.values()):
                raise RuntimeError(f"not every case started on replica a: {missing}\n{a.tail()}")
            time.sleep(1.5)  # well inside their blocking calls (the COPY is streaming)
            c.start("b", "--concurrency", "6").ready()
            killed = c.now()
            a.kill()
            reruns = wait_all(jobs.values(), lambda job: c.first_run_after(job, first[job]["id"]), cap)
            figures = []
            for name, job in jobs.items():
                rerun = reruns.get(job)
                figures.append(
                    at_most(
                        S,
                        f"{name}: kill -> rerun starts (s)",
                        None if rerun is None else rerun["started"] - killed,
                        5.0,
                        cap=cap,
                    )
                )
            abandoned = [c.abandoned_at(first[job]["id"]) for job in jobs.values()]
            late = [t - killed for t in abandoned if t is not None]
            figures.append(
                info(
                    S,
                    "kill -> run abandoned (s), max",
                    f"{max(late):.2f} ({len(late)} of {len(jobs)})" if late else f"none within {cap:.0f} s",
                )
            )
            holder.rollback()
        exits = c.unexpected_exits()
        figures.append(zero(S, "worker exits (other than the kill)", len(exits), "; ".join(exits)))
        return figures
