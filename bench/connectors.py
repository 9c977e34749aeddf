"""Connector benchmark: rows/s and peak memory of `postgres`, `http` and `redis` syncs.

Usage: .venv/bin/python bench/connectors.py [--rows 1000000] [--rss-rows 1000000,5000000]
       [--http-records 200000] [--redis-members 100000] [--naive-sample 20000]
       [--mirror-rows 1000000,5000000] [--only connectors|mirror]

Every sync is one `syncworker run-once` child process; rows/s come from the run's own
`duration_ms`, peak RSS from the child's rusage. In the same run, for comparison:
the raw limit (a bare `COPY … TO STDOUT` piped into `COPY … FROM STDIN` between the same
two databases) and the hand-written way (a loop of single-row `INSERT … ON CONFLICT`,
timed over a sample). Creates and drops its own databases on
SYNCWORKER_BENCH_DATABASE_URL's server and its own keys in SYNCWORKER_BENCH_REDIS_URL
(default redis://127.0.0.1:6379/0). Prints a table and writes the connectors section of
bench/RESULTS.md. The mirror section's logical-replication rows run on a private cluster
with wal_level = logical that the benchmark starts (initdb + pg_ctl, as the tests do).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from core import ADMIN, ROOT, db_url, machine, save_section, sql, table_lines

REDIS_URL = os.environ.get("SYNCWORKER_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
SOURCE_TABLE = """
CREATE TABLE public.events (
  id bigint PRIMARY KEY, account int NOT NULL, amount numeric(12, 2) NOT NULL,
  note text, updated_at timestamptz NOT NULL
)"""
FILL = """
INSERT INTO public.events
SELECT g, g %% 1000, (g %% 100000) / 100.0, 'note ' || g, '2024-01-01'::timestamptz + g * interval '1 second'
  FROM generate_series(%(start)s::bigint, %(stop)s::bigint) g"""


@contextmanager
def database() -> Iterator[str]:
    name = f"swbench_{uuid.uuid4().hex[:8]}"
    sql(ADMIN, f'CREATE DATABASE "{name}"')
    try:
        yield db_url(name)
    finally:
        sql(ADMIN, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def fill(url: str, rows: int) -> None:
    sql(url, "DROP TABLE IF EXISTS public.events")
    sql(url, SOURCE_TABLE)
    for start in range(1, rows + 1, 1_000_000):
        sql(url, FILL, {"start": start, "stop": min(rows, start + 999_999)})
    sql(url, "VACUUM ANALYZE public.events")


def add_job(url: str, name: str, kind: str, config: dict[str, Any]) -> None:
    sql(
        url,
        "INSERT INTO syncworker.integrations (name, kind, config, interval_seconds, next_sync_at)"
        " VALUES (%s, %s, %s, 3600, NULL)",
        (name, kind, json.dumps(config)),
    )


# Starts the command it is given and reports its peak RSS on stderr. A child forked from
# this (large) benchmark process would count the parent's memory as its own high-water
# mark; forked from this small one, it does not.
RSS_WRAPPER = """
import resource, subprocess, sys
code = subprocess.call(sys.argv[1:])
print(f"\\nmaxrss_kb={resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}", file=sys.stderr)
sys.exit(code)
"""


def run_once(url: str, name: str, env: dict[str, str]) -> tuple[float, float, dict[str, Any]]:
    """One run in a child process: (run seconds, peak RSS in MB, the run's row)."""
    child_env = {**os.environ, "SYNCWORKER_LOG_LEVEL": "warning", **env, "SYNCWORKER_DATABASE_URL": url}
    child_env["SYNCWORKER_ALLOW_SUPERUSER_JOBS"] = "1"  # as postgres, sql jobs without run_as
    proc = subprocess.Popen(
        [sys.executable, "-c", RSS_WRAPPER, sys.executable, "-m", "worker", "run-once", name],
        env=child_env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    err = proc.stderr.read()
    proc.wait()
    peak_kb = int(err.rsplit(b"maxrss_kb=", 1)[1]) if b"maxrss_kb=" in err else 0
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(
            "SELECT r.status, r.duration_ms, r.records_processed, r.records_inserted, r.records_updated,"
            " r.records_deleted, r.error"
            " FROM syncworker.sync_runs r JOIN syncworker.integrations i ON i.id = r.integration_id"
            " WHERE i.name = %s ORDER BY r.id DESC LIMIT 1",
            (name,),
        )
        found = cur.fetchone()
    if found is None or found[0] != "success":
        raise SystemExit(f"run of {name} did not succeed: {found}\n{err.decode(errors='replace')}")
    keys = ("status", "duration_ms", "processed", "inserted", "updated", "deleted", "error")
    row = dict(zip(keys, found, strict=True))
    row["log"] = err.decode(errors="replace")
    return row["duration_ms"] / 1000, peak_kb / 1024, row


def raw_pipe(source: str, dest: str) -> float:
    """The raw limit: COPY out of the source straight into COPY in, seconds."""
    sql(dest, "DROP TABLE IF EXISTS public.raw_events")
    sql(dest, SOURCE_TABLE.replace("public.events", "public.raw_events"))
    started = time.perf_counter()
    with psycopg.connect(source) as src, psycopg.connect(dest) as dst:
        with (
            src.cursor().copy("COPY public.events TO STDOUT") as out,
            dst.cursor().copy("COPY public.raw_events FROM STDIN") as into,
        ):
            for block in out:
                into.write(block)
        dst.commit()
    return time.perf_counter() - started


def naive_loop(source: str, dest: str, sample: int) -> float:
    """The hand-written way over `sample` rows: rows/s of single-row upserts."""
    sql(dest, "DROP TABLE IF EXISTS public.naive_events")
    sql(dest, SOURCE_TABLE.replace("public.events", "public.naive_events"))
    upsert = (
        "INSERT INTO public.naive_events (id, account, amount, note, updated_at) VALUES (%s, %s, %s, %s, %s)"
        " ON CONFLICT (id) DO UPDATE SET account = EXCLUDED.account, amount = EXCLUDED.amount,"
        " note = EXCLUDED.note, updated_at = EXCLUDED.updated_at"
    )
    started = time.perf_counter()
    with psycopg.connect(source) as src, psycopg.connect(dest) as dst:
        with src.cursor(name="naive") as cur:
            cur.execute("SELECT * FROM public.events ORDER BY id LIMIT %s", (sample,))
            for row in cur:
                dst.execute(upsert, row)
        dst.commit()
    return sample / (time.perf_counter() - started)


def postgres_config() -> dict[str, Any]:
    return {
        "source": {
            "dsn": {"env": "BENCH_SOURCE_DSN"},
            "table": "public.events",
            "key": ["id"],
            "updated_at": "updated_at",
        },
        "destination": {"table": "public.events", "key": ["id"], "create_table": True},
        "lookback_seconds": 60,
    }


def bench_postgres(rows: int, sample: int) -> list[tuple[str, str, str]]:
    out: list[tuple[str, str, str]] = []
    with database() as source, database() as dest:
        from worker.db.migrate import upgrade

        upgrade(dest)
        fill(source, rows)
        env = {"BENCH_SOURCE_DSN": source}
        add_job(dest, "pg", "postgres", postgres_config())
        seconds, rss, _ = run_once(dest, "pg", env)
        full = rows / seconds
        pipe = rows / raw_pipe(source, dest)
        loop = naive_loop(source, dest, sample)
        sql(source, "UPDATE public.events SET amount = amount + 1, updated_at = now() WHERE id % 10 = 0")
        inc_seconds, inc_rss, inc = run_once(dest, "pg", env)
        changed = rows // 10
        n = f"{rows:,}"
        out += [
            (f"postgres full copy, {n} rows (rows/s)", f"{full:,.0f}", ""),
            ("  raw COPY pipe, same rows (rows/s)", f"{pipe:,.0f}", ""),
            (f"  single-row upsert loop, {sample:,}-row sample (rows/s)", f"{loop:,.0f}", ""),
            ("  full copy vs raw pipe", f"{full / pipe:.0%}", ">= 50%"),
            ("  full copy vs upsert loop", f"{full / loop:.0f}x", ">= 20x"),
            (
                f"postgres incremental, {changed:,} changed (rows/s)",
                f"{changed / inc_seconds:,.0f} ({inc['updated']:,} updated)",
                "",
            ),
            (f"postgres peak RSS, full / incremental, {n} rows (MB)", f"{rss:.0f} / {inc_rss:.0f}", "<= 150"),
        ]
    return out


def bench_postgres_rss(rows: int) -> tuple[str, str, str]:
    with database() as source, database() as dest:
        from worker.db.migrate import upgrade

        upgrade(dest)
        fill(source, rows)
        add_job(dest, "pg", "postgres", postgres_config())
        seconds, rss, _ = run_once(dest, "pg", {"BENCH_SOURCE_DSN": source})
    what = f"postgres peak RSS, full copy of {rows:,} rows (MB)"
    return (what, f"{rss:.0f} ({rows / seconds:,.0f} rows/s)", "<= 150")


ACCOUNTS = """
CREATE TABLE public.accounts (
  aid int PRIMARY KEY, bid int NOT NULL, abalance int NOT NULL, filler char(84),
  updated_at timestamptz NOT NULL DEFAULT now()
)"""
# pgbench_accounts' rows (about 100 bytes), all written within the last minute
FILL_ACCOUNTS = """
INSERT INTO public.accounts
SELECT g, (g - 1) / 100000 + 1, 0, '', now() FROM generate_series(%(start)s::int, %(stop)s::int) g"""


def raw_accounts_pipe(source: str, dest: str) -> float:
    """The raw pipe for the accounts table, into a table with the same primary key: seconds."""
    sql(dest, "DROP TABLE IF EXISTS public.raw_accounts")
    sql(dest, ACCOUNTS.replace("public.accounts", "public.raw_accounts"))
    started = time.perf_counter()
    with psycopg.connect(source) as src, psycopg.connect(dest) as dst:
        with (
            src.cursor().copy("COPY public.accounts TO STDOUT") as out,
            dst.cursor().copy("COPY public.raw_accounts FROM STDIN") as into,
        ):
            for block in out:
                into.write(block)
        dst.commit()
    seconds = time.perf_counter() - started
    sql(dest, "DROP TABLE public.raw_accounts")
    return seconds


def logged_seconds(log: str, what: str) -> float:
    """Seconds a run's log line reports for `what` (`key buckets of …: … (1.2s)`), 0 if absent."""
    for line in log.splitlines():
        if what in line and line.rstrip().endswith("s)"):
            return float(line.rstrip()[:-2].rsplit("(", 1)[1])
    return 0.0


# The server's WAL counters (cluster-wide: bytes, full-page images).
WAL_STATS = "SELECT wal_bytes::float8, wal_fpi FROM pg_stat_wal"


def bench_mirror(rows: int, lookback_baseline: bool) -> list[tuple[str, str, str]]:
    """A `postgres` job on a pgbench_accounts-like table written within the last minute."""
    n = f"{rows:,}"
    changed = rows // 100
    out: list[tuple[str, str, str]] = []
    with database() as source, database() as dest:
        from worker.db.migrate import upgrade

        upgrade(dest)
        sql(source, ACCOUNTS)
        for start in range(1, rows + 1, 1_000_000):
            sql(source, FILL_ACCOUNTS, {"start": start, "stop": min(rows, start + 999_999)})
        sql(source, "VACUUM ANALYZE public.accounts")
        env = {"BENCH_SOURCE_DSN": source, "SYNCWORKER_LOG_LEVEL": "info"}
        config = {
            "source": {
                "dsn": {"env": "BENCH_SOURCE_DSN"},
                "table": "public.accounts",
                "key": ["aid"],
                "updated_at": "updated_at",
            },
            "destination": {"table": "public.accounts", "key": ["aid"], "create_table": True},
            "deletes": "hard",
        }
        sql(
            dest,
            "INSERT INTO syncworker.integrations (name, kind, config, interval_seconds, next_sync_at)"
            " VALUES ('pg', 'postgres', %s, 60, NULL)",
            (json.dumps(config),),
        )
        pipe = [raw_accounts_pipe(source, dest)]
        first, rss_first, row = run_once(dest, "pg", env)
        assert row["inserted"] == rows, row
        pipe.append(raw_accounts_pipe(source, dest))
        raw = sum(pipe) / 2
        buckets_first = logged_seconds(row["log"], "key buckets of")
        idle, rss_idle, idle_row = run_once(dest, "pg", env)
        change = "UPDATE public.accounts SET abalance = abalance + 1, updated_at = now() WHERE aid % 100 = 0"
        started = time.perf_counter()
        sql(source, change)
        source_update = time.perf_counter() - started
        wal_before = sql(dest, WAL_STATS)[0]
        inc, rss_inc, inc_row = run_once(dest, "pg", env)
        wal_after = sql(dest, WAL_STATS)[0]
        sql(source, change)
        inc2, _, inc2_row = run_once(dest, "pg", env)
        assert inc_row["updated"] == changed, inc_row

        # hard deletes without tombstones: key buckets, forced this run
        sql(source, "DELETE FROM public.accounts WHERE aid % 1000 = 1")
        sql(dest, "UPDATE syncworker.integrations SET state = state - 'keys_checked_at'")
        bucket_run, rss_bucket, bucket_row = run_once(dest, "pg", env)
        assert bucket_row["deleted"] == rows // 1000, bucket_row
        bucket_seconds = logged_seconds(bucket_row["log"], "key buckets of")

        # with the delete trigger: tombstones every run (the first run after installing it
        # still compares buckets: the tombstones start at the install)
        subprocess.run(
            [sys.executable, "-m", "worker", "install-trigger", "pg"],
            env={**os.environ, **env, "SYNCWORKER_DATABASE_URL": dest},
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        run_once(dest, "pg", env)
        sql(source, "DELETE FROM public.accounts WHERE aid % 1000 = 2")
        tomb_run, rss_tomb, tomb_row = run_once(dest, "pg", env)
        assert tomb_row["deleted"] == rows // 1000, tomb_row
        assert logged_seconds(tomb_row["log"], "key buckets of") == 0.0, tomb_row["log"]

        out += [
            (
                f"mirror {n} rows: raw COPY pipe, same run (s)",
                f"{raw:.2f} ({pipe[0]:.2f} / {pipe[1]:.2f})",
                "",
            ),
            (
                "  first run in total (s; rows read)",
                f"{first:.2f}; {row['processed']:,} ({first / raw:.2f}x raw; buckets {buckets_first:.2f})",
                "<= 1.5x raw",
            ),
            ("  next run, nothing changed (s; rows read)", f"{idle:.2f}; {idle_row['processed']:,}", ""),
            (
                f"  next run, 1% changed = {changed:,} rows (s; rows read)",
                f"{inc:.2f}; {inc_row['processed']:,} ({inc / first:.0%} of the first run)",
                f"<= {2 * changed:,} rows, <= 10%",
            ),
            ("    the source's own UPDATE of those rows (s)", f"{source_update:.2f}", "(reference)"),
            (
                "    WAL the server wrote during that run (MB; full-page images)",
                f"{(wal_after[0] - wal_before[0]) / 1e6:.0f}; {wal_after[1] - wal_before[1]:,}",
                "",
            ),
            (
                "    the same rows changed again, next run (s; rows read)",
                f"{inc2:.2f}; {inc2_row['processed']:,} ({inc2 / first:.0%} of the first run)",
                "",
            ),
            (
                f"  hard deletes by key buckets, {rows // 1000:,} deleted (s)",
                f"{bucket_seconds:.2f} (run {bucket_run:.2f})",
                "",
            ),
            (
                f"  hard deletes by tombstones, {rows // 1000:,} deleted (run, s)",
                f"{tomb_run:.2f}",
                "",
            ),
            (
                "  peak RSS: first / incremental / buckets / tombstones (MB)",
                f"{rss_first:.0f} / {max(rss_idle, rss_inc):.0f} / {rss_bucket:.0f} / {rss_tomb:.0f}",
                "<= 64",
            ),
        ]
        if lookback_baseline:
            # The same change found by updated_at and a lookback (what a query source gets).
            query = {**config["source"], "query": "SELECT * FROM public.accounts"}  # type: ignore[dict-item]
            del query["table"]
            sql(
                dest,
                "UPDATE syncworker.integrations SET config = %s,"
                " state = jsonb_build_object('phase', 'incremental', 'watermark', %s::text)",
                (
                    json.dumps({**config, "source": query}),
                    sql(source, "SELECT max(updated_at)::text FROM accounts")[0][0],
                ),
            )
            sql(
                source,
                "UPDATE public.accounts SET abalance = abalance + 1, updated_at = now() WHERE aid % 100 = 1",
            )
            look, rss_look, look_row = run_once(dest, "pg", env)
            out.append(
                (
                    "  the same 1% by updated_at, window compared (a query source; s, rows read)",
                    f"{look:.2f}; {look_row['processed']:,}; peak RSS {rss_look:.0f} MB",
                    "(reference)",
                )
            )
    return out


@contextmanager
def logical_cluster() -> Iterator[Any]:
    """A private cluster with wal_level = logical (the shared server's is replica), otherwise
    at the shared server's settings (fsync on, autovacuum off, 128 MB of shared buffers)."""
    from helpers import missing_server, private_cluster

    reason = missing_server()
    if reason is not None:
        raise SystemExit(f"the logical mode's rows need a private cluster: {reason}")
    with private_cluster(
        "swbench-logical-",
        wal_level="logical",
        max_replication_slots=10,
        max_wal_senders=10,
        autovacuum="off",
        shared_buffers="128MB",
    ) as cluster:
        yield cluster


def bench_logical(rows: int) -> list[tuple[str, str, str]]:
    """The same job and table as `bench_mirror`, with `"changes": "logical"`: the source on a
    private cluster with wal_level = logical, the control (destination) database on the shared
    server, as a source usually has a server of its own (the slot then decodes only the
    source's WAL, not the destination's writes too)."""
    n = f"{rows:,}"
    changed = rows // 100
    with logical_cluster() as cluster, database() as dest:
        sql(cluster.url(), "CREATE DATABASE source")
        source = cluster.url("source")
        from worker.db.migrate import upgrade

        upgrade(dest)
        sql(source, ACCOUNTS)
        for start in range(1, rows + 1, 1_000_000):
            sql(source, FILL_ACCOUNTS, {"start": start, "stop": min(rows, start + 999_999)})
        sql(source, "VACUUM ANALYZE public.accounts")
        sql(source, "CHECKPOINT")
        env = {"BENCH_SOURCE_DSN": source, "SYNCWORKER_LOG_LEVEL": "info"}
        config = {
            "source": {"dsn": {"env": "BENCH_SOURCE_DSN"}, "table": "public.accounts", "key": ["aid"]},
            "destination": {"table": "public.accounts", "key": ["aid"], "create_table": True},
            "deletes": "hard",
            "changes": "logical",
        }
        # The raw pipe twice before the job's slot exists: the slot would decode its WAL.
        pipe = [raw_accounts_pipe(source, dest), raw_accounts_pipe(source, dest)]
        raw = sum(pipe) / 2
        sql(source, "CHECKPOINT")
        add_job(dest, "pg", "postgres", config)
        first, rss_first, row = run_once(dest, "pg", env)
        assert row["inserted"] == rows, row
        idle, rss_idle, idle_row = run_once(dest, "pg", env)
        change = "UPDATE public.accounts SET abalance = abalance + 1, updated_at = now() WHERE aid % 100 = 0"
        started = time.perf_counter()
        sql(source, change)
        source_update = time.perf_counter() - started
        inc, rss_inc, inc_row = run_once(dest, "pg", env)
        assert inc_row["updated"] == changed, inc_row
        sql(source, change)
        inc2, _, inc2_row = run_once(dest, "pg", env)
        sql(source, "DELETE FROM public.accounts WHERE aid % 1000 = 1")
        gone, rss_gone, gone_row = run_once(dest, "pg", env)
        assert gone_row["deleted"] == rows // 1000, gone_row
        exact = sql(dest, "SELECT count(*) FROM public.accounts")[0][0] == rows - rows // 1000
        retained = sql(
            source,
            "SELECT pg_size_pretty(pg_current_wal_lsn() - restart_lsn) FROM pg_replication_slots",
        )[0][0]
    return [
        (
            f"logical mode, {n} rows (source on a private cluster, wal_level = logical): raw COPY pipe (s)",
            f"{raw:.2f} ({pipe[0]:.2f} / {pipe[1]:.2f})",
            "",
        ),
        (
            "  first run in total: slot, copy, stream (s; rows read)",
            f"{first:.2f}; {row['processed']:,} ({first / raw:.2f}x raw)",
            "<= 1.5x raw",
        ),
        ("  next run, nothing changed (s; rows read)", f"{idle:.2f}; {idle_row['processed']:,}", ""),
        (
            f"  next run, 1% changed = {changed:,} rows (s; rows read)",
            f"{inc:.2f}; {inc_row['processed']:,} ({inc / first:.0%} of the first run)",
            f"<= {2 * changed:,} rows, <= 10%",
        ),
        ("    the source's own UPDATE of those rows (s)", f"{source_update:.2f}", "(reference)"),
        (
            "    the same rows changed again, next run (s; rows read)",
            f"{inc2:.2f}; {inc2_row['processed']:,} ({inc2 / first:.0%} of the first run)",
            "",
        ),
        (
            f"  hard deletes from the stream, {rows // 1000:,} deleted (run, s; rows read)",
            f"{gone:.2f}; {gone_row['processed']:,}{'' if exact else ' (NOT EXACT)'}",
            "",
        ),
        (
            "  peak RSS: first / incremental / deletes (MB)",
            f"{rss_first:.0f} / {max(rss_idle, rss_inc):.0f} / {rss_gone:.0f}",
            "<= 64",
        ),
        ("  WAL the slot holds after the last run", str(retained), ""),
    ]


@contextmanager
def http_server(records: int) -> Iterator[str]:
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "httpapi.py"), str(records)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        yield proc.stdout.readline().strip()
    finally:
        proc.terminate()
        proc.wait()


def bench_http(records: int) -> tuple[str, str, str]:
    import httpx

    with http_server(records) as base, database() as dest:
        from worker.db.migrate import upgrade

        upgrade(dest)
        config = {
            "url": base + "/page",
            "records_path": "data",
            "pagination": {"type": "page", "size_param": "per_page", "size": 1000, "total_path": "total"},
            "destination": {
                "table": "public.items",
                "key": ["id"],
                "create_table": True,
                "columns": {
                    "id": "bigint",
                    "name": "text",
                    "score": "numeric",
                    "updated_at": "timestamptz",
                    "tags": "jsonb",
                },
            },
        }
        add_job(dest, "api", "http", config)
        seconds, rss, row = run_once(dest, "api", {})
        assert row["inserted"] == records, row
        # the transport alone: the same pages fetched and parsed, nothing loaded
        started = time.perf_counter()
        with httpx.Client() as client:
            for page in range(1, records // 1000 + 2):
                client.get(base + "/page", params={"page": page, "per_page": 1000}).json()
        fetch_only = records / (time.perf_counter() - started)
    return (
        f"http, {records:,} records, 1,000 per page (records/s)",
        f"{records / seconds:,.0f} (fetch alone {fetch_only:,.0f}); peak RSS {rss:.0f} MB",
        "",
    )


def bench_redis(members: int) -> tuple[str, str, str]:
    prefix = f"swbench:{uuid.uuid4().hex[:8]}:"
    client = redis.Redis.from_url(REDIS_URL)
    try:
        for set_name in ("daily", "weekly"):
            for start in range(0, members, 50_000):
                chunk = range(start, min(members, start + 50_000))
                client.zadd(f"{prefix}{set_name}", {f"player{i}": i * 1.5 for i in chunk})
        with database() as dest:
            from worker.db.migrate import upgrade

            upgrade(dest)
            config = {
                "url": {"env": "BENCH_REDIS_URL"},
                "source": {"type": "zset", "columns": {n: f"{prefix}{n}" for n in ("daily", "weekly")}},
                "key_column": "player",
                "destination": {"table": "public.board", "key": ["player"], "create_table": True},
            }
            add_job(dest, "lb", "redis", config)
            seconds, rss, row = run_once(dest, "lb", {"BENCH_REDIS_URL": REDIS_URL})
            assert row["inserted"] == members, row
    finally:
        for key in client.scan_iter(match=prefix + "*"):
            client.unlink(key)
        client.close()
    return (
        f"redis, {members:,} members in 2 joined sorted sets (members/s)",
        f"{members / seconds:,.0f}; peak RSS {rss:.0f} MB",
        "",
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument(
        "--rss-rows", default="1000000,5000000", help="sizes for every connector's peak memory"
    )
    parser.add_argument("--http-records", type=int, default=200_000)
    parser.add_argument("--redis-members", type=int, default=100_000)
    parser.add_argument("--naive-sample", type=int, default=20_000)
    parser.add_argument(
        "--mirror-rows", default="1000000,5000000", help="sizes for the postgres mirror section"
    )
    parser.add_argument("--only", choices=["connectors", "mirror"], help="run one section only")
    args = parser.parse_args()

    if args.only != "connectors":
        mirror_sizes = [int(size) for size in args.mirror_rows.split(",") if size]
        mirror: list[tuple[str, str, str]] = []
        for i, size in enumerate(mirror_sizes):
            mirror += bench_mirror(size, lookback_baseline=i == 0)
        for size in mirror_sizes:
            mirror += bench_logical(size)
        save_section(
            "mirror",
            "Postgres mirror",
            [
                *machine(),
                "",
                *table_lines(mirror),
                "",
                'A `postgres` job (`key ["aid"]`, `updated_at`, `deletes: hard`, `create_table: true`,',
                "interval 60 s) on a pgbench_accounts-like table whose rows were all written within the",
                "last minute; each run is `syncworker run-once` in a child process, timed by its",
                "`duration_ms`. The raw pipe (`COPY TO STDOUT` into `COPY FROM STDIN`, a table with the",
                "same primary key) is measured just before and just after the first run. Peak RSS is",
                "the run-once process's own (started from a small wrapper: a child forked from the",
                "benchmark itself would count the benchmark's memory as its own). An incremental run is",
                "one scan of the source (the run where nothing changed) with the destination's writes of",
                "the changed rows overlapped: compare the source's own UPDATE of them. The changed rows",
                "lie one in a page or so: after a checkpoint (the first copy's WAL starts one) each page",
                "written costs a full-page image in the WAL, as the source's own UPDATE does. The WAL",
                "row counts the whole server (the benchmark is all that runs on it). The machine is",
                "shared: runs vary by a third or more from one turn to the next.",
                "",
                'The "logical mode" rows: the same job with `"changes": "logical"` (and no `updated_at`),',
                "its source on a private cluster the benchmark starts with `wal_level = logical` (initdb",
                "of the same server version, fsync on, autovacuum off, 128 MB of shared buffers, as the",
                "shared server), the control database (the destination) on the shared server, as a source",
                "usually has a server of its own; the raw pipe is measured between the two, twice, before",
                "the job exists. The first run creates the publication and the slot, copies, and reads",
                "the stream; later runs read only the stream, from where the slot can restart decoding",
                "(the server's last running-transactions record before the previous run's end).",
            ],
        )
        if args.only == "mirror":
            return

    sizes = [int(size) for size in args.rss_rows.split(",") if size]
    results = bench_postgres(args.rows, args.naive_sample)
    results += [bench_postgres_rss(size) for size in sizes if size != args.rows]
    results.append(bench_http(args.http_records))
    results += [bench_http(size) for size in sizes]
    results.append(bench_redis(args.redis_members))
    results += [bench_redis(size) for size in sizes]

    redis_version = redis.Redis.from_url(REDIS_URL).info()["redis_version"]
    save_section(
        "connectors",
        "Connectors",
        [
            *machine(),
            f"- Redis {redis_version}, redis-py {redis.__version__}",
            "",
            *table_lines(results),
            "",
            "Rows/s come from each run's `duration_ms`; peak RSS from the run-once process's rusage.",
            "The http source is the tests' local API, one Python process: 'fetch alone' is its own limit.",
        ],
    )


if __name__ == "__main__":
    main()
