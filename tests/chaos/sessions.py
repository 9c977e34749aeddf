"""Cut sessions: `pg_terminate_backend` of each kind of worker session (by application_name,
in this cluster's database only), and a restart of the Postgres server (only when the
caller sets SYNCWORKER_TEST_RESTART_POSTGRES=1).

Two replicas, three control jobs ticking every second and one long python job.  After each
cut: seconds until every control job has started a run that succeeded, the long job's
rerun when its own session was cut, and no replica may exit.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import psycopg

from .harness import Cluster, Figure, at_most, wait_all, wait_until, zero

S = "cut sessions"
# The application_name of each kind of worker session; a replica may add " w<worker id>".
SESSIONS = ["syncworker listener", "syncworker leader", "syncworker run", "syncworker"]


def run(workdir: Path, cap: float) -> list[Figure]:
    with Cluster(workdir / "sessions") as c:
        replicas = [c.start(f"s{i}").ready() for i in range(2)]
        controls = [
            c.add_job(
                f"control-{i}",
                "sql",
                {"statement": "INSERT INTO public.ticks DEFAULT VALUES"},
                interval_seconds=1,
            )
            for i in range(3)
        ]
        long_job = c.add_job("long", "python", {"callable": "jobs:sleep", "options": {"seconds": 3600}})
        wait_until(lambda: c.running_run(long_job), 15)
        time.sleep(2)
        figures: list[Figure] = []
        for app in SESSIONS:
            long_run = c.running_run(long_job)
            cut_at = c.now()
            cut = c.one(
                """SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                    WHERE datname = current_database() AND pid <> pg_backend_pid()
                      AND (application_name = %(app)s
                           OR application_name ~ ('^' || %(app)s || ' w[0-9]+$'))""",
                {"app": app},
            )
            if not cut:
                figures.append(Figure(S, f'terminate the "{app}" sessions', "none found", "some cut", False))
                continue
            figures.append(
                at_most(
                    S,
                    f'terminate the {cut} "{app}" session(s): control jobs run again (s)',
                    back_after(c, controls, cut_at, cap),
                    5.0,
                    cap=cap,
                )
            )
            if app == "syncworker run" and long_run is not None:
                cut_run: int = long_run["id"]
                rerun = wait_until(lambda: c.first_run_after(long_job, cut_run), cap)  # noqa: B023
                figures.append(
                    at_most(
                        S,
                        f'terminate "{app}": the long job\'s rerun starts (s)',
                        None if rerun is None else rerun["started"] - cut_at,
                        5.0,
                        cap=cap,
                    )
                )
            time.sleep(1)
        figures.append(restart_postgres(c, controls, cap))
        alive = sum(r.alive() for r in replicas)
        exits = c.unexpected_exits()
        figures.append(zero(S, "worker exits", len(exits), "; ".join(exits)))
        figures.append(Figure(S, "replicas still running at the end", f"{alive} of {len(replicas)}"))
        return figures


def back_after(c: Cluster, controls: list[int], since: float, cap: float) -> float | None:
    """Seconds from `since` until every control job has started a successful run after it."""

    def started(job: int) -> float | None:
        try:
            at: float | None = c.one(
                """SELECT extract(epoch FROM min(started_at))::float8 FROM syncworker.sync_runs
                    WHERE integration_id = %s AND status = 'success' AND started_at > to_timestamp(%s)""",
                (job, since),
            )
            return at
        except psycopg.OperationalError:
            return None  # the server is restarting

    found = wait_all(controls, started, cap)
    return None if len(found) < len(controls) else max(found.values()) - since


def restart_postgres(c: Cluster, controls: list[int], cap: float) -> Figure:
    measure = "Postgres restart: control jobs run again (s)"
    if os.environ.get("SYNCWORKER_TEST_RESTART_POSTGRES") != "1":
        return Figure(S, measure, "skipped: set SYNCWORKER_TEST_RESTART_POSTGRES=1", "<= 10 s", None)
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    began = c.now()
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart", "-m", "fast"],
        check=True,
        timeout=60,
    )
    return at_most(S, measure, back_after(c, controls, began, cap + 20), 10.0, cap=cap + 20)
