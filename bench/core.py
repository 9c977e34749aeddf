"""Core benchmark: dispatch latency, no-op throughput, idle cost and memory of `syncworker run`.

Usage: .venv/bin/python bench/core.py [--triggers 250] [--jobs 3000] [--bursts 5]
Creates and drops its own database on SYNCWORKER_BENCH_DATABASE_URL's server
(default postgresql://postgres@127.0.0.1:5432/postgres). Prints a table and writes
bench/RESULTS.md (the section between the core markers).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psutil
import psycopg

ROOT = Path(__file__).resolve().parent.parent
ADMIN = os.environ.get("SYNCWORKER_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
RESULTS = ROOT / "bench" / "RESULTS.md"


def db_url(name: str) -> str:
    return urlunsplit(urlsplit(ADMIN)._replace(path="/" + name))


def sql(url: str, query: str, params: object = None) -> list[tuple]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def start_worker(url: str, *args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "SYNCWORKER_DATABASE_URL": url, "SYNCWORKER_LOG_LEVEL": "warning"}
    env["SYNCWORKER_ALLOW_SUPERUSER_JOBS"] = "1"  # as postgres, sql jobs without run_as
    return subprocess.Popen(
        [sys.executable, "-m", "worker", "run", *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def wait_workers(url: str, count: int) -> None:
    deadline = time.time() + 30
    while time.time() < deadline:
        if sql(url, "SELECT count(*) FROM syncworker.workers WHERE stopped_at IS NULL")[0][0] >= count:
            time.sleep(0.5)
            return
        time.sleep(0.05)
    raise SystemExit("workers did not start")


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(60)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def reset_jobs(url: str, count: int) -> None:
    sql(url, "TRUNCATE syncworker.integrations, syncworker.sync_runs, syncworker.sync_errors CASCADE")
    sql(
        url,
        """INSERT INTO syncworker.integrations (name, kind, config, next_sync_at)
                SELECT 'noop' || g, 'sql', '{"statement": "SELECT 1"}', NULL FROM generate_series(1, %s) g""",
        (count,),
    )


# -- dispatch latency -----------------------------------------------------------------


def dispatch_latency(url: str, triggers: int, gap: float) -> list[float]:
    """ms from the commit of trigger_sync (as the client sees it) to the run taking its lock."""
    reset_jobs(url, triggers)
    committed: dict[str, float] = {}
    with psycopg.connect(url, autocommit=True) as conn:
        for i in range(1, triggers + 1):
            name = f"noop{i}"
            conn.execute("SELECT syncworker.trigger_sync(%s)", (name,))
            committed[name] = time.time()
            time.sleep(gap)
    deadline = time.time() + 30
    while sql(url, "SELECT count(*) FROM syncworker.sync_runs WHERE status = 'success'")[0][0] < triggers:
        if time.time() > deadline:
            raise SystemExit("not every trigger ran")
        time.sleep(0.1)
    started = sql(
        url,
        """SELECT i.name, extract(epoch FROM r.locked_at)::float8
             FROM syncworker.sync_runs r JOIN syncworker.integrations i ON i.id = r.integration_id""",
    )
    return [(at - committed[name]) * 1000 for name, at in started]


def naive_poller(url: str, stop_at: list[bool], poll: float) -> None:
    """The hand-written way: poll for due rows every `poll` seconds, run them, record them."""
    with psycopg.connect(url, autocommit=True) as conn:
        while not stop_at[0]:
            with conn.transaction():
                rows = conn.execute("""SELECT id FROM syncworker.integrations WHERE next_sync_at <= now()
                                       FOR UPDATE SKIP LOCKED""").fetchall()
                for (job_id,) in rows:
                    conn.execute(
                        """INSERT INTO syncworker.sync_runs (integration_id, status, finished_at, locked_at)
                                    VALUES (%s, 'success', clock_timestamp(), clock_timestamp())""",
                        (job_id,),
                    )
                    conn.execute("SELECT 1")
                    conn.execute(
                        "UPDATE syncworker.integrations SET next_sync_at = NULL WHERE id = %s", (job_id,)
                    )
            time.sleep(poll)


# -- throughput -----------------------------------------------------------------------


def throughputs(url: str, jobs: int, bursts: int) -> str:
    """Median runs/s over `bursts` bursts, with the slowest and fastest."""
    rates = sorted(throughput(url, jobs) for _ in range(bursts))
    return f"{statistics.median(rates):.0f} ({rates[0]:.0f}-{rates[-1]:.0f})"


def throughput(url: str, jobs: int) -> float:
    """runs/s for a burst of `jobs` no-op runs made due at once."""
    reset_jobs(url, jobs)
    time.sleep(0.5)
    begin = sql(url, "UPDATE syncworker.integrations SET next_sync_at = now() RETURNING clock_timestamp()")[
        0
    ][0]
    deadline = time.time() + 300
    while sql(url, "SELECT count(*) FROM syncworker.sync_runs WHERE status = 'success'")[0][0] < jobs:
        if time.time() > deadline:
            raise SystemExit("burst did not finish")
        time.sleep(0.2)
    end = sql(url, "SELECT max(finished_at) FROM syncworker.sync_runs")[0][0]
    return jobs / (end - begin).total_seconds()


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


def idle_cost(url: str, seconds: float) -> tuple[float, float, float, float]:
    """(queries/min, background transactions/min, CPU s/min, RSS MB) of one worker with
    nothing due.  Background: what the database does with no worker (autovacuum visits),
    measured first and subtracted."""
    reset_jobs(url, 0)
    time.sleep(11)
    background = transactions_per_minute(url, seconds)
    proc = start_worker(url)
    try:
        wait_workers(url, 1)
        time.sleep(12)  # start-up done, stats of the start-up flushed
        ps = psutil.Process(proc.pid)
        cpu_before = sum(ps.cpu_times()[:2])
        total = transactions_per_minute(url, seconds)
        cpu = sum(ps.cpu_times()[:2]) - cpu_before
        rss = ps.memory_info().rss / 2**20
        return max(total - background, 0.0), background, cpu * 60 / (seconds + 11), rss
    finally:
        stop([proc])


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
    return [
        f"- machine: {cpu}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
        f"{platform.system()} {platform.release()}",
        f"- Python {platform.python_version()}, psycopg {psycopg.__version__}, PostgreSQL {server}",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--triggers", type=int, default=250)
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--bursts", type=int, default=5)
    parser.add_argument("--idle-seconds", type=float, default=60)
    args = parser.parse_args()

    name = f"swbench_{uuid.uuid4().hex[:8]}"
    sql(ADMIN, f'CREATE DATABASE "{name}"')
    url = db_url(name)
    rows: list[tuple[str, str, str]] = []
    try:
        from worker.db.migrate import upgrade

        upgrade(url)

        procs = [start_worker(url)]
        wait_workers(url, 1)
        lat = dispatch_latency(url, args.triggers, gap=0.02)
        rows.append(
            (
                "dispatch latency p50 / p95 / p99 (ms)",
                f"{percentile(lat, 0.5):.1f} / {percentile(lat, 0.95):.1f} / {percentile(lat, 0.99):.1f}",
                "p50 <= 3, p99 <= 10",
            )
        )
        one_replica = throughputs(url, args.jobs, args.bursts)
        rss_loaded = psutil.Process(procs[0].pid).memory_info().rss / 2**20
        rows.append(("no-op sql runs/s, 1 replica, concurrency 4 (default)", one_replica, ">= 1500"))
        procs.append(start_worker(url))
        wait_workers(url, 2)
        rows.append(
            ("no-op sql runs/s, 2 replicas, concurrency 4", throughputs(url, args.jobs, args.bursts), "")
        )
        stop(procs)
        sql(url, "UPDATE syncworker.workers SET stopped_at = now()")
        procs = [start_worker(url, "--concurrency", "8")]
        wait_workers(url, 1)
        eight = throughputs(url, args.jobs, args.bursts)
        rows.append(("no-op sql runs/s, 1 replica, concurrency 8", eight, ">= 1500"))
        stop(procs)
        sql(url, "UPDATE syncworker.workers SET stopped_at = now()")

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

        qpm, background, cpu, rss_idle = idle_cost(url, args.idle_seconds)
        rows.append(("idle: queries per minute", f"{qpm:.1f}", "<= 5"))
        rows.append(("  the database's own background, subtracted (per minute)", f"{background:.1f}", ""))
        rows.append(("idle: CPU seconds per minute", f"{cpu:.3f}", ""))
        rows.append(("RSS idle / after the bursts (MB)", f"{rss_idle:.1f} / {rss_loaded:.1f}", "<= 45"))
    finally:
        sql(ADMIN, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    notes = [
        "",
        f"Throughput: median of {args.bursts} bursts of {args.jobs} no-op jobs made due at once "
        "(slowest-fastest in brackets), from the commit that makes them due to the last finish.",
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
