"""Operations benchmark: what `--http` costs.

* scrape time of /metrics and /health with 10,000 integrations and 1,000,000 sync_runs rows
  (p50 / p95 over repeated scrapes, each past the fleet cache so that every one reads the
  tables), target p95 <= 50 ms;
* no-op throughput with the HTTP server on and off, in turns, target within 3 %.

Usage: .venv/bin/python bench/ops.py [--integrations 10000] [--runs 1000000] [--scrapes 60]
Creates and drops its own database on SYNCWORKER_BENCH_DATABASE_URL's server. Prints a table
and writes the "ops" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import time
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from core import ADMIN, Fleet, burst, db_url, machine, percentile, save_section, sql, table_lines

from worker.ops.metrics import FLEET_TTL


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fill(url: str, integrations: int, runs: int) -> None:
    """`integrations` jobs (none due) and `runs` finished runs spread over them and 30 days."""
    sql(
        url,
        """INSERT INTO syncworker.integrations (name, kind, config, interval_seconds, next_sync_at)
           SELECT 'job-' || g, 'sql', '{"statement": "SELECT 1"}', 3600, now() + interval '1 day'
             FROM generate_series(1, %s) g""",
        (integrations,),
    )
    sql(
        url,
        """INSERT INTO syncworker.sync_runs (integration_id, status, trigger, started_at, finished_at,
                                             duration_ms, records_processed)
           SELECT i.id, CASE WHEN g %% 50 = 0 THEN 'failed' ELSE 'success' END, 'schedule',
                  now() - make_interval(secs => g %% 2592000),
                  now() - make_interval(secs => g %% 2592000) + interval '1 second', 1000, 10
             FROM generate_series(1, %s) g
             JOIN syncworker.integrations i ON i.id = (SELECT min(id) FROM syncworker.integrations)
                                                      + g %% %s""",
        (runs, integrations),
    )
    sql(url, "ANALYZE")


def scrape_times(port: int, path: str, count: int) -> tuple[list[float], list[float]]:
    """Milliseconds per GET of `path`, each after the fleet cache has expired (so each one
    starts a read of the tables), and the milliseconds of those background reads as
    syncworker_fleet_read_seconds reports them."""
    times, reads = [], []
    for _ in range(count):
        time.sleep(FLEET_TTL + 0.1)
        started = time.perf_counter()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as reply:
            reply.read()
        times.append((time.perf_counter() - started) * 1000)
        time.sleep(0.1)
        reads.append(fleet_read_ms(port))
    return times, reads


def fleet_read_ms(port: int) -> float:
    """The duration of the latest background read, once it is over."""
    deadline = time.time() + 30
    last = 0.0
    while time.time() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
            for line in reply.read().decode().splitlines():
                if line.startswith("syncworker_fleet_read_seconds "):
                    last = float(line.split()[1]) * 1000
        if last:
            return last
        time.sleep(0.2)
    return last


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--integrations", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=1_000_000)
    parser.add_argument("--scrapes", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--turns", type=int, default=3)
    args = parser.parse_args()
    rows: list[tuple[str, str, str]] = []

    name = f"swbench_{uuid.uuid4().hex[:8]}"
    sql(ADMIN, f'CREATE DATABASE "{name}"')
    url = db_url(name)
    try:
        from worker.db.migrate import upgrade

        upgrade(url)
        fill(url, args.integrations, args.runs)
        port = free_port()
        worker = Fleet(url, 1, "--http", f"127.0.0.1:{port}")
        try:
            reads: list[float] = []
            for path in ("/metrics", "/health"):
                times, more = scrape_times(port, path, args.scrapes)
                reads += more
                rows.append(
                    (
                        f"{path}: ms per scrape, {args.integrations:,} jobs, {args.runs:,} runs (p50 / p95)",
                        f"{statistics.median(times):.1f} / {percentile(times, 0.95):.1f}",
                        "p95 <= 50",
                    )
                )
            rows.append(
                (
                    "  the background read it starts (query + rendering), ms (p50 / p95)",
                    f"{statistics.median(reads):.0f} / {percentile(reads, 0.95):.0f}",
                    "",
                )
            )
        finally:
            worker.stop()
    finally:
        sql(ADMIN, f'DROP DATABASE "{name}" WITH (FORCE)')

    rates: dict[str, list[float]] = {"off": [], "on": []}
    for turn in range(args.turns * 2):
        mode = "on" if turn % 2 else "off"
        name = f"swbench_{uuid.uuid4().hex[:8]}"
        sql(ADMIN, f'CREATE DATABASE "{name}"')
        url = db_url(name)
        try:
            upgrade(url)
            extra = ["--http", f"127.0.0.1:{free_port()}"] if mode == "on" else []
            worker = Fleet(url, 1, *extra)
            try:
                rates[mode].append(burst(url, name, worker, args.jobs).rate)
            finally:
                worker.stop()
        finally:
            sql(ADMIN, f'DROP DATABASE "{name}" WITH (FORCE)')
    off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
    rows.append(("no-op runs/s, --http off (median of turns)", f"{off:.0f}", ""))
    rows.append(("no-op runs/s, --http on, not scraped (median of turns)", f"{on:.0f}", ""))
    rows.append(("on / off", f"{on / off:.3f}", ">= 0.97"))

    lines = [
        *machine(),
        "",
        *table_lines(rows),
        "",
        f"Scrapes: each one {FLEET_TTL:g} s after the last, so that every scrape finds the fleet's "
        f"snapshot stale (it is kept {FLEET_TTL:g} s) and starts a read of the tables in the background; "
        "the scrape itself is served the previous snapshot. "
        f"Throughput: bursts of {args.jobs} no-op jobs on a fresh database per turn, "
        f"{args.turns} turns each way, off and on alternating; worker at the default log level (info), "
        "as in the core benchmark.",
    ]
    save_section("ops", "Operations (--http)", lines)


if __name__ == "__main__":
    main()
