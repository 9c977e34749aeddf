"""Core benchmark: dispatch latency, no-op throughput over bursts and replicas, CPU per run,
idle cost and memory of `syncworker run`, at the settings users run (log level info,
concurrency 4) unless a row says otherwise.

Usage: .venv/bin/python bench/core.py [--triggers 250] [--bursts 20000,100000] [--replicas 2,3]
       [--idle-seconds 60] [--log-level info]
Creates and drops its own database on SYNCWORKER_BENCH_DATABASE_URL's server
(default postgresql://postgres@127.0.0.1:5432/postgres). Prints a table and writes
bench/RESULTS.md (the section between the core markers).

CPU per run: the worker processes' user+system time, and that of the Postgres backends
connected to the benchmark's database (from /proc, through psutil), divided by the runs of
the burst. The server's shared processes (WAL writer, checkpointer, autovacuum) are not in it.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psutil
import psycopg

ROOT = Path(__file__).resolve().parent.parent
ADMIN = os.environ.get("SYNCWORKER_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
RESULTS = ROOT / "bench" / "RESULTS.md"
LOGS = Path(tempfile.gettempdir())


def db_url(name: str) -> str:
    return urlunsplit(urlsplit(ADMIN)._replace(path="/" + name))


def sql(url: str, query: str, params: object = None) -> list[tuple]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


class Fleet:
    """Worker processes at the user's settings; their output goes to a file, as under systemd
    it goes to the journal."""

    def __init__(self, url: str, count: int, *args: str, log_level: str | None = None) -> None:
        env = {**os.environ, "SYNCWORKER_DATABASE_URL": url, "SYNCWORKER_ALLOW_SUPERUSER_JOBS": "1"}
        env.pop("SYNCWORKER_LOG_LEVEL", None)
        if log_level:
            env["SYNCWORKER_LOG_LEVEL"] = log_level
        self.url = url
        self.logs = [open(LOGS / f"syncworker-bench-{uuid.uuid4().hex[:6]}.log", "wb") for _ in range(count)]  # noqa: SIM115
        before = live_workers(url)
        self.procs = [
            subprocess.Popen(
                [sys.executable, "-m", "worker", "run", *args], env=env, cwd=ROOT, stdout=log, stderr=log
            )
            for log in self.logs
        ]
        deadline = time.time() + 30
        while live_workers(url) < before + count:
            if time.time() > deadline:
                raise SystemExit("workers did not start")
            time.sleep(0.05)
        time.sleep(0.5)

    def cpu(self) -> float:
        return sum(sum(psutil.Process(p.pid).cpu_times()[:2]) for p in self.procs)

    def rss_mb(self) -> float:
        return max(psutil.Process(p.pid).memory_info().rss for p in self.procs) / 2**20

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(60)
        for log in self.logs:
            log.close()
            Path(log.name).unlink(missing_ok=True)
        sql(self.url, "UPDATE syncworker.workers SET stopped_at = now() WHERE stopped_at IS NULL")


def live_workers(url: str) -> int:
    return sql(url, "SELECT count(*) FROM syncworker.workers WHERE stopped_at IS NULL")[0][0]


def backends_cpu(dbname: str) -> float:
    """User+system seconds of the Postgres backends connected to `dbname` (ended ones excluded:
    the workers' sessions live through a burst)."""
    total = 0.0
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
            if cmd.startswith("postgres: ") and f" {dbname} " in cmd:
                total += sum(proc.cpu_times()[:2])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def reset_jobs(url: str, count: int, statement: str = "SELECT 1") -> None:
    sql(url, "TRUNCATE syncworker.integrations, syncworker.sync_runs, syncworker.sync_errors CASCADE")
    sql(
        url,
        """INSERT INTO syncworker.integrations (name, kind, config, next_sync_at)
           SELECT 'noop' || g, 'sql', jsonb_build_object('statement', %s::text), NULL
             FROM generate_series(1, %s) g""",
        (statement, count),
    )
    sql(url, "VACUUM ANALYZE syncworker.integrations")


# -- dispatch latency -----------------------------------------------------------------


def dispatch_latency(url: str, triggers: int, gap: float) -> list[float]:
    """ms from the commit of trigger_sync (as the client sees it) to the first statement of
    the job's body (a clock_timestamp() it writes)."""
    sql(url, "CREATE TABLE IF NOT EXISTS public.bench_started (name text PRIMARY KEY, at timestamptz)")
    sql(url, "TRUNCATE public.bench_started")
    reset_jobs(url, triggers)
    sql(
        url,
        """UPDATE syncworker.integrations SET config = jsonb_build_object('statement',
             format('INSERT INTO public.bench_started VALUES (%L, clock_timestamp())', name))""",
    )
    committed: dict[str, float] = {}
    with psycopg.connect(url, autocommit=True) as conn:
        for i in range(1, triggers + 1):
            name = f"noop{i}"
            conn.execute("SELECT syncworker.trigger_sync(%s)", (name,))
            committed[name] = time.time()
            time.sleep(gap)
    deadline = time.time() + 60
    while sql(url, "SELECT count(*) FROM public.bench_started")[0][0] < triggers:
        if time.time() > deadline:
            raise SystemExit("not every trigger ran")
        time.sleep(0.1)
    started = sql(url, "SELECT name, extract(epoch FROM at)::float8 FROM public.bench_started")
    return [(at - committed[name]) * 1000 for name, at in started]


def naive_poller(url: str, stop_at: list[bool], poll: float) -> None:
    """The hand-written way: poll for due rows every `poll` seconds, run them, record them."""
    with psycopg.connect(url, autocommit=True) as conn:
        while not stop_at[0]:
            with conn.transaction():
                rows = conn.execute("""SELECT id, config->>'statement' FROM syncworker.integrations
                                        WHERE next_sync_at <= now() FOR UPDATE SKIP LOCKED""").fetchall()
                for job_id, statement in rows:
                    conn.execute(statement)
                    conn.execute(
                        """INSERT INTO syncworker.sync_runs (integration_id, status, finished_at, locked_at)
                                    VALUES (%s, 'success', clock_timestamp(), clock_timestamp())""",
                        (job_id,),
                    )
                    conn.execute(
                        "UPDATE syncworker.integrations SET next_sync_at = NULL WHERE id = %s", (job_id,)
                    )
            time.sleep(poll)


# -- throughput -----------------------------------------------------------------------


@dataclass
class Burst:
    jobs: int
    seconds: float
    worker_cpu: float  # seconds
    pg_cpu: float

    @property
    def rate(self) -> float:
        return self.jobs / self.seconds

    def per_run_ms(self) -> str:
        return f"{self.worker_cpu / self.jobs * 1000:.2f} / {self.pg_cpu / self.jobs * 1000:.2f}"


def burst(url: str, dbname: str, fleet: Fleet, jobs: int) -> Burst:
    """A burst of `jobs` no-op runs made due at once: from the commit that makes them due to
    the last finish, with every run's sync_runs row checked."""
    reset_jobs(url, jobs)
    time.sleep(0.5)
    worker_before, pg_before = fleet.cpu(), backends_cpu(dbname)
    begin = sql(url, "UPDATE syncworker.integrations SET next_sync_at = now() RETURNING clock_timestamp()")[
        0
    ][0]
    deadline = time.time() + 600
    while sql(url, "SELECT count(*) FROM syncworker.sync_runs WHERE status <> 'running'")[0][0] < jobs:
        if time.time() > deadline:
            raise SystemExit("burst did not finish")
        time.sleep(0.2)
    end, ok, distinct = sql(
        url,
        "SELECT max(finished_at), count(*) FILTER (WHERE status = 'success'), count(DISTINCT integration_id) "
        "FROM syncworker.sync_runs",
    )[0]
    if ok != jobs or distinct != jobs:
        raise SystemExit(f"burst of {jobs}: {ok} successful runs over {distinct} jobs")
    return Burst(
        jobs, (end - begin).total_seconds(), fleet.cpu() - worker_before, backends_cpu(dbname) - pg_before
    )


# -- idle cost ------------------------------------------------------------------------


def transactions_per_minute(url: str, seconds: float) -> float:
    """Transactions per minute in the database over `seconds` (idle backends report theirs
    to pg_stat_database after ~10 s, so the window is read 11 s late)."""
    count = "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"
    before = sql(url, count)[0][0]
    time.sleep(seconds + 11)
    after = sql(url, count)[0][0]
    # The two reads of pg_stat_database are transactions too.
    return max(after - before - 2, 0) * 60 / (seconds + 11)


def idle_cost(url: str, seconds: float, log_level: str | None) -> tuple[float, float, float, float]:
    """(queries/min, background transactions/min, CPU s/min, RSS MB) of one worker with
    nothing due.  Background: what the database does with no worker (autovacuum visits),
    measured first and subtracted."""
    reset_jobs(url, 0)
    time.sleep(11)
    background = transactions_per_minute(url, seconds)
    fleet = Fleet(url, 1, log_level=log_level)
    try:
        time.sleep(12)  # start-up done, stats of the start-up flushed
        cpu_before = fleet.cpu()
        total = transactions_per_minute(url, seconds)
        cpu = fleet.cpu() - cpu_before
        return max(total - background, 0.0), background, cpu * 60 / (seconds + 11), fleet.rss_mb()
    finally:
        fleet.stop()


def machine() -> list[str]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    server = sql(ADMIN, "SHOW server_version")[0][0]
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    python_s, server_s = speed()
    return [
        f"- machine: {cpu}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
        f"{platform.system()} {platform.release()}; load average at the end {load} (1 / 5 / 15 min)",
        f"- its speed, to compare runs on other machines: 10,000,000 additions in a Python loop "
        f"{python_s:.2f} s of CPU; the server counts 3,000,000 rows of generate_series in {server_s:.2f} s",
        f"- Python {platform.python_version()}, psycopg {psycopg.__version__}, PostgreSQL {server}",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- code: {git_head()}",
    ]


def speed() -> tuple[float, float]:
    """(Python seconds, server seconds) of two fixed single-core tasks, the best of three."""
    python, server = [], []
    for _ in range(3):
        start = time.process_time()
        total = 0
        for i in range(10_000_000):
            total += i
        python.append(time.process_time() - start)
        start = time.perf_counter()
        sql(ADMIN, "SELECT count(*) FROM generate_series(1, 3000000)")
        server.append(time.perf_counter() - start)
    return min(python), min(server)


def git_head() -> str:
    try:
        return subprocess.run(
            ["git", "log", "-1", "--format=%h (%cs)"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--triggers", type=int, default=250)
    parser.add_argument("--bursts", default="20000,100000", help="burst sizes, one replica")
    parser.add_argument("--replicas", default="2,3", help="replica counts, on the first burst size")
    parser.add_argument("--idle-seconds", type=float, default=60)
    parser.add_argument("--log-level", default=None, help="the workers' level (default: theirs, info)")
    args = parser.parse_args()
    sizes = [int(x) for x in args.bursts.split(",") if x]
    replica_counts = [int(x) for x in args.replicas.split(",") if x]
    level = args.log_level or "info (default)"

    name = f"swbench_{uuid.uuid4().hex[:8]}"
    sql(ADMIN, f'CREATE DATABASE "{name}"')
    url = db_url(name)
    rows: list[tuple[str, str, str]] = []
    try:
        from worker.db.migrate import upgrade

        upgrade(url)

        fleet = Fleet(url, 1, log_level=args.log_level)
        try:
            lat = dispatch_latency(url, args.triggers, gap=0.02)
            rows.append(
                (
                    f"dispatch, trigger_sync commit -> job body, p50 / p95 / p99 (ms; {len(lat)} triggers)",
                    f"{percentile(lat, 0.5):.1f} / {percentile(lat, 0.95):.1f} / {percentile(lat, 0.99):.1f}",
                    "p50 <= 2.5, p99 <= 6",
                )
            )
            single: dict[int, Burst] = {}
            for size in sizes:
                single[size] = burst(url, name, fleet, size)
                rows.append((f"burst of {size:,}, 1 replica: runs/s", f"{single[size].rate:.0f}", ">= 2500"))
                rows.append(
                    (
                        "  CPU per run, worker / Postgres backends (ms)",
                        single[size].per_run_ms(),
                        "<= 0.35 each",
                    )
                )
            rss_loaded = fleet.rss_mb()
        finally:
            fleet.stop()
        if len(sizes) > 1:
            rows.append(
                (
                    f"burst of {sizes[-1]:,} vs {sizes[0]:,}, 1 replica (runs/s ratio)",
                    f"{single[sizes[-1]].rate / single[sizes[0]].rate:.2f}",
                    ">= 0.85",
                )
            )
        for count in replica_counts:
            fleet = Fleet(url, count, log_level=args.log_level)
            try:
                b = burst(url, name, fleet, sizes[0])
            finally:
                fleet.stop()
            rows.append(
                (
                    f"burst of {sizes[0]:,}, {count} replicas: runs/s (x one replica)",
                    f"{b.rate:.0f} ({b.rate / single[sizes[0]].rate:.2f}x)",
                    ">= 1.5x" if count == 2 else "",
                )
            )
            rows.append(("  CPU per run, workers / Postgres backends (ms)", b.per_run_ms(), ""))

        flag = [False]
        reset_jobs(url, args.triggers)
        poller = threading.Thread(target=naive_poller, args=(url, flag, 1.0))
        poller.start()
        naive = dispatch_latency(url, min(args.triggers, 100), gap=0.02)
        flag[0] = True
        poller.join()
        rows.append(
            (
                "naive 1 s poller: dispatch p50 / p99 (ms)",
                f"{percentile(naive, 0.5):.0f} / {percentile(naive, 0.99):.0f}",
                "(reference)",
            )
        )

        qpm, background, cpu, rss_idle = idle_cost(url, args.idle_seconds, args.log_level)
        rows.append(("idle: queries per minute", f"{qpm:.1f}", "<= 5"))
        rows.append(("  the database's own background, subtracted (per minute)", f"{background:.1f}", ""))
        rows.append(("idle: CPU seconds per minute", f"{cpu:.3f}", ""))
        rows.append(("RSS idle / after the bursts (MB)", f"{rss_idle:.1f} / {rss_loaded:.1f}", "<= 45"))
    finally:
        sql(ADMIN, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    notes = [
        "",
        f"Workers at log level {level}, concurrency 4 (the default), output to a file. A burst: "
        "that many no-op `sql` jobs (`SELECT 1`) made due by one UPDATE, timed from its commit to",
        "the last run's finish; every job must have exactly one successful run. CPU per run: the",
        "workers' processes and the Postgres backends of the benchmark's database, from /proc.",
        "Idle: transactions in the worker's database per minute with nothing due, minus what the",
        "database does on its own in the same window (autovacuum), measured just before.",
    ]
    save_section("core", "Core worker", [*machine(), "", *table_lines(rows), *notes])


def table_lines(rows: list[tuple[str, str, str]]) -> list[str]:
    """A markdown table of (measure, result, target) rows."""
    width = max(len(r[0]) for r in rows)
    lines = [f"| {'measure'.ljust(width)} | result | target |", f"|{'-' * (width + 2)}|---|---|"]
    return lines + [f"| {m.ljust(width)} | {v} | {t} |" for m, v, t in rows]


def save_section(key: str, title: str, lines: list[str]) -> None:
    """Print a report and put it in bench/RESULTS.md between its markers (replacing the old one)."""
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    report = "\n".join([start, f"## {title}", "", *lines, end])
    print(report)
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\n"
    if start in text:
        head, rest = text.split(start, 1)
        text = head + report + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + report + "\n"
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
