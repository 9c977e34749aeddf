"""Hostile rows: thousands of random rows written into syncworker.integrations while two
replicas run and healthy control jobs tick every second.

Every kind (and unknown ones), configs of wrong types, nulls, huge strings, unicode, broken
SQL, secret references to missing variables or to DSNs nobody listens on, random schedules
and timezones.  The database may reject a row (that is counted, not a failure).  What must
hold: no replica exits, the control jobs stay on time, no row loops (many `abandoned` runs,
or runs that never end as `success`, `partial` or `failed`), no "run task crashed".

The generator never produces what would be harmful on a shared machine: no URL beyond
127.0.0.1, no real Redis or Postgres credentials, no callable outside a fixed list.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from .harness import Cluster, Figure, at_most, info, zero

S = "hostile rows"
CONTROL_JOBS = 3

STATEMENTS = [
    "SELECT 1",
    "SELEC 1",
    "SELECT 1/0",
    "SELECT pg_sleep(0.01)",
    "SELECT %(x)s",
    "SELECT %s",
    "SELECT $1",
    "",
    "   ",
    ";",
    "SELECT 'ü🙂ß'",
    "SELECT repeat('x', 100000)",
    "DO $$ BEGIN RAISE EXCEPTION 'fuzz'; END $$",
    "SELECT * FROM no_such_table",
    "INSERT INTO public.ticks DEFAULT VALUES",
    "SELECT 1; SELECT 2",
    "SELECT '" + "x" * 3000,
    "SELECT E'\\\\x'",
    "CALL no_such_procedure()",
]
CALLABLES = [
    "jobs:fail",
    "jobs:not_a_result",
    "jobs:NOT_CALLABLE",
    "jobs:exits",
    "jobs:count_up",
    "jobs:some_records_fail",
    "jobs:no_such_function",
    "no_such_module:func",
    "jobs",
    ":",
    "",
    "jobs:fail.__call__",
    "builtins:len",
    "json:dumps",
    "模块:函数",
]
URLS = [
    "http://127.0.0.1:1/x",
    "http://127.0.0.1:1/" + "x" * 5000,
    "https://127.0.0.1:1/",
    "ftp://127.0.0.1/x",
    "not a url",
    "",
    "http://",
    "http://[::1",
    "http://127.0.0.1:99999/",
    "http://127.0.0.1:1/ü🙂",
]
SECRET_REFS: list[Any] = [
    {"env": "CHAOS_MISSING_VARIABLE"},
    {"env": ""},
    {"env": "CHAOS_BAD_DSN"},
    {"env": "CHAOS_BAD_REDIS"},
    {"file": "/nonexistent/chaos/secret"},
    {"file": ""},
    {"env": "CHAOS_MISSING_VARIABLE", "file": "/x"},
    {"env": None},
    {"env": 5},
    "postgresql://nobody@127.0.0.1:1/x",
]
CRONS = [
    "* * * * *",
    "*/1 * * * *",
    "0 3 * * *",
    "0 2 * * sun",
    "0 0 29 2 *",
    "0 0 31 2 *",
    "61 * * * *",
    "bad",
    "",
    "* * * *",
    "* * * * * *",
    "@hourly",
    "🙂 * * * *",
    "0 0 1 jan mon",
]
TIMEZONES = [
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "Asia/Kathmandu",
    "Australia/Lord_Howe",
    "EST5EDT",
    "posix/Europe/Berlin",
    "Mars/Olympus",
    "",
    "+05:00",
    "🙂",
    "x" * 1000,
]
NEXT_SYNC = [
    None,
    "now",
    "-infinity",
    "infinity",
    "1970-01-01",
    "2100-01-01",
    "yesterday",
    "tomorrow",
    "not a date",
]


def _text(rng: random.Random) -> str:
    return rng.choice(
        [
            "",
            " ",
            "x",
            "ü🙂ß\u200b\u202e",
            "a" * rng.choice([100, 5000, 200_000]),
            "'; DROP TABLE x; --",
            "%s %(x)s {}",
            "\\",
            '"',
            "public.ticks",
            "id",
        ]
    )


def _value(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth > 2 or roll < 0.15:
        return None
    if roll < 0.3:
        return rng.choice([True, False])
    if roll < 0.45:
        return rng.choice([0, -1, 1, 2**31, 2**63, 10**30, 1.5, -0.0, 1e308])
    if roll < 0.7:
        return _text(rng)
    if roll < 0.85:
        return [_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {_text(rng)[:20]: _value(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def _maybe(rng: random.Random, value: Any, p: float = 0.75) -> Any:
    """`value` most of the time, else something of a random type."""
    return value if rng.random() < p else _value(rng)


def _destination(rng: random.Random) -> Any:
    return _maybe(
        rng,
        {
            "table": _maybe(rng, rng.choice(["public.fuzz_out", "fuzz_out", "a.b.c", "", "🙂", "x" * 100])),
            "key": _maybe(rng, rng.choice([["id"], "id", [], ["id", "id"], ["🙂"]])),
            "create_table": _maybe(rng, rng.choice([True, False])),
            "columns": _maybe(rng, {"id": rng.choice(["bigint", "text", "nonsense type", "int; drop"])}),
            "dsn": rng.choice([None, *SECRET_REFS]),
        },
    )


def config_for(rng: random.Random, kind: Any) -> Any:
    if kind == "sql":
        body: dict[str, Any] = {"statement": _maybe(rng, rng.choice(STATEMENTS))}
        if rng.random() < 0.3:
            body["params"] = _value(rng)
        if rng.random() < 0.3:
            body["dsn"] = rng.choice(SECRET_REFS)
    elif kind == "python":
        body = {"callable": _maybe(rng, rng.choice(CALLABLES))}
        if rng.random() < 0.5:
            body["options"] = _maybe(rng, {"message": _text(rng), "seconds": rng.choice([0, 0.05, -1, "x"])})
    elif kind == "http":
        body = {
            "url": _maybe(rng, rng.choice(URLS)),
            "records_path": _maybe(rng, rng.choice(["data", "", "a.b", None])),
            "mapping": _maybe(rng, {"id": "id"}),
            "destination": _destination(rng),
            "max_attempts": _maybe(rng, 1),
            "request_timeout_seconds": _maybe(rng, 1),
        }
        if rng.random() < 0.5:
            body["auth"] = _maybe(
                rng,
                rng.choice(
                    [
                        {"type": "bearer", "token": rng.choice(SECRET_REFS)},
                        {"type": "basic", "username": _text(rng), "password": rng.choice(SECRET_REFS)},
                        {
                            "type": "api_key",
                            "name": _text(rng),
                            "value": rng.choice(SECRET_REFS),
                            "in": "query",
                        },
                        {"type": _text(rng)},
                    ]
                ),
            )
        for extra in ("pagination", "incremental", "rate_limit", "circuit_breaker", "headers", "params"):
            if rng.random() < 0.2:
                body[extra] = _value(rng)
    elif kind == "postgres":
        body = {
            "source": _maybe(
                rng,
                {
                    "dsn": rng.choice(SECRET_REFS),
                    rng.choice(["table", "query"]): _maybe(
                        rng, rng.choice(["public.src", "SELECT 1 AS id", ""])
                    ),
                    "key": _maybe(rng, ["id"]),
                    "updated_at": _maybe(rng, rng.choice([None, "updated_at", "🙂"])),
                },
            ),
            "destination": _destination(rng),
        }
        for extra in ("deletes", "lookback_seconds", "realtime", "hard_delete_every_seconds"):
            if rng.random() < 0.2:
                body[extra] = _value(rng)
    elif kind == "redis":
        body = {
            "url": rng.choice(SECRET_REFS),
            "source": _maybe(rng, {"type": _maybe(rng, rng.choice(["zset", "hash"])), "pattern": "chaos:*"}),
            "destination": _destination(rng),
        }
    else:
        body = {_text(rng)[:20]: _value(rng)} if rng.random() < 0.5 else {}
    if isinstance(body, dict):
        for _ in range(rng.choice([0, 0, 0, 1, 2])):
            body[_text(rng)[:30]] = _value(rng)  # unknown keys
    if rng.random() < 0.05:
        return rng.choice([None, _value(rng), [body], "{}"])
    return body


def random_row(rng: random.Random, n: int) -> dict[str, Any]:
    """A row with a random config, and now and then a hostile value in another column."""
    kind = rng.choice(
        ["sql", "python", "http", "postgres", "redis"] * 4 + ["", "ftp", "SQL", "🙂", None, "x" * 5000]
    )
    row: dict[str, Any] = {
        "name": f"fuzz-{n}-{rng.choice(['', 'ü🙂', 'x' * 200, ' ', chr(0x202E)])}",
        "kind": kind,
        "config": config_for(rng, kind),
    }
    schedule = rng.random()
    if schedule < 0.5:
        row["interval_seconds"] = rng.choice([1, 2, 5, 30, 3600])
    elif schedule < 0.8:
        row["cron"] = rng.choice(CRONS[:6])
    if rng.random() < 0.3:
        row["timezone"] = rng.choice(TIMEZONES[:7])
    if rng.random() < 0.3:
        row["max_retries"] = rng.choice([1, 3, 10**6])
        row["retry_backoff_seconds"] = rng.choice([1, 5, 60])
    if rng.random() < 0.2:
        row["timeout_seconds"] = rng.choice([1, 5, 3600])
    for _ in range(rng.choice([0, 0, 1, 1, 2])):
        column, values = rng.choice(HOSTILE)
        row[column] = rng.choice(values) if values else _value(rng)
    return row


HOSTILE: list[tuple[str, list[Any]]] = [
    ("name", ["", None, "fuzz-0", "x" * 100_000, "\x00"]),
    ("kind", [None, "", " ", "x" * 100_000]),
    ("config", []),
    ("interval_seconds", [0, -1, 2**31 - 1, 2**31, None, "x", 1.5]),
    ("cron", CRONS),
    ("timezone", TIMEZONES),
    ("next_sync_at", NEXT_SYNC),
    ("enabled", [None, False]),
    ("max_retries", [0, -1, None, 2**31 - 1]),
    ("retry_backoff_seconds", [0, -5, None, 10**9]),
    ("timeout_seconds", [0, -1, None, 2**31 - 1]),
    ("state", [[], "x", None, {"cursor": "ü🙂"}, {"a": "x" * 100_000}]),
]


def _adapt(value: Any) -> Any:
    return Jsonb(value) if isinstance(value, dict | list) else value


class Fuzzer(threading.Thread):
    """Writes random rows, one statement each, as fast as `rate` allows, until stopped."""

    def __init__(self, url: str, rate: float, seed: int) -> None:
        super().__init__(name="fuzzer", daemon=True)
        self.url, self.rate, self.rng = url, rate, random.Random(seed)
        self.stop_now = threading.Event()
        self.attempted = 0
        self.rejected: Counter[str] = Counter()

    def run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self.stop_now.is_set():
                began = time.monotonic()
                row = random_row(self.rng, self.attempted)
                names = ", ".join(row)
                marks = ", ".join(["%s"] * len(row))
                self.attempted += 1
                try:
                    jsonb_columns = ("config", "state")
                    values = [Jsonb(v) if c in jsonb_columns else _adapt(v) for c, v in row.items()]
                    conn.execute(f"INSERT INTO syncworker.integrations ({names}) VALUES ({marks})", values)
                except (psycopg.Error, ValueError, TypeError, OverflowError) as exc:
                    self.rejected[type(exc).__name__] += 1
                self.stop_now.wait(max(0.0, 1 / self.rate - (time.monotonic() - began)))


def run(workdir: Path, seconds: float, rate: float = 250.0) -> list[Figure]:
    with Cluster(
        workdir / "fuzz",
        CHAOS_BAD_DSN="postgresql://nobody:nothing@127.0.0.1:1/nowhere",
        CHAOS_BAD_REDIS="redis://127.0.0.1:1/0",
    ) as c:
        for i in range(2):
            c.start(f"f{i}").ready()
        controls = [
            c.add_job(
                f"control-{i}",
                "sql",
                {"statement": "INSERT INTO public.ticks DEFAULT VALUES"},
                interval_seconds=1,
            )
            for i in range(CONTROL_JOBS)
        ]
        time.sleep(2)
        began = c.now()
        fuzzer = Fuzzer(c.url, rate, seed=random.randrange(2**32))
        fuzzer.start()
        time.sleep(seconds)
        fuzzer.stop_now.set()
        fuzzer.join(30)
        time.sleep(5)  # what the fuzzer wrote last gets its runs too
        ended = c.now()
        lateness = control_lateness(c, controls, began, ended)
        fuzz_rows = c.one(
            "SELECT count(*) FROM syncworker.integrations WHERE NOT (id = ANY(%s))", (controls,)
        )
        runs = c.rows(
            "SELECT status, count(*) AS n FROM syncworker.sync_runs WHERE NOT (integration_id = ANY(%s)) "
            "GROUP BY status ORDER BY status",
            (controls,),
        )
        # Stopping gracefully ends (or hands back, as `abandoned`) every run a replica knows
        # of: a run still `running` afterwards is one no replica accounts for any more.
        exits = c.stop_all(timeout=20)
        looping = c.rows(
            """SELECT i.id, left(i.kind, 20) AS kind,
                      count(*) FILTER (WHERE r.status = 'abandoned') AS abandoned,
                      count(*) FILTER (WHERE r.status = 'running') AS running
                 FROM syncworker.integrations i JOIN syncworker.sync_runs r ON r.integration_id = i.id
                WHERE NOT (i.id = ANY(%s))
                  AND NOT (r.status = 'abandoned' AND r.error LIKE '%%shut down%%')
                GROUP BY i.id, i.kind
               HAVING count(*) FILTER (WHERE r.status = 'abandoned') > 3
                   OR count(*) FILTER (WHERE r.status = 'running') > 0""",
            (controls,),
        )
        logs = c.logs()
        crashed = logs.count("run task crashed")
        service_crashes = logs.count("crashed; stopping the worker")
        rejected = sum(fuzzer.rejected.values())
        return [
            info(
                S,
                "rows written / rejected by the database / accepted",
                f"{fuzzer.attempted} / {rejected} / {fuzz_rows} in {seconds:g} s",
            ),
            info(S, "their runs by status", ", ".join(f"{r['status']} {r['n']}" for r in runs) or "none"),
            zero(S, "worker exits", len(exits), "; ".join(exits)),
            *(
                [info(S, "replicas SIGKILLed 20 s after SIGTERM", ", ".join(c.slow_stops))]
                if c.slow_stops
                else []
            ),
            at_most(S, "control jobs' worst lateness (s)", lateness, 2.0),
            zero(
                S,
                "rows looping (> 3 abandoned runs, or a run left `running` by stopped replicas)",
                len(looping),
                ", ".join(
                    f"{r['kind'] or '?'}: {r['abandoned']} abandoned, {r['running']} running"
                    for r in looping[:3]
                ),
            ),
            zero(S, '"run task crashed" lines in the logs', crashed),
            zero(S, '"service ... crashed" lines in the logs', service_crashes),
        ]


def control_lateness(c: Cluster, controls: list[int], since: float, until: float) -> float:
    """The control jobs' worst delay over [since, until]: a run's start after its slot, the
    largest gap between two starts less the interval, or the silence at the end."""
    late = c.one(
        """SELECT max(extract(epoch FROM started_at - scheduled_for))::float8 FROM syncworker.sync_runs
            WHERE integration_id = ANY(%s) AND scheduled_for BETWEEN to_timestamp(%s) AND to_timestamp(%s)""",
        (controls, since, until),
    )
    gaps = c.one(
        """SELECT max(extract(epoch FROM gap))::float8 - 1 FROM (
             SELECT coalesce(lead(started_at) OVER w, to_timestamp(%s)) - started_at AS gap
               FROM syncworker.sync_runs
              WHERE integration_id = ANY(%s) AND started_at >= to_timestamp(%s)
             WINDOW w AS (PARTITION BY integration_id ORDER BY started_at)) g""",
        (until, controls, since),
    )
    return max(float(late or 0), float(gaps or 0))
