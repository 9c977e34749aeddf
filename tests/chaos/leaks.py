"""Secret leaks: a canary secret (with `/+&"` in it, from the workers' environment) is sent
through every connector's error paths, then looked for everywhere a person or a log
collector could read it.

Paths: `http` with basic, bearer and api_key (header and query) auth, a secret header and
a secret query parameter, against a local upstream that answers 400 echoing what it got
(tests/httpapi.py, /echo400), and against a closed port; `postgres` (source and
destination) and `sql` with a DSN holding the canary as password (a role that does not
exist, a closed port, a DSN that does not parse); `redis` with the canary as password (a
wrong password, a closed port); a `sql` job whose own error message quotes a setting of
its DSN that holds the canary.

Places: every text and JSON column of every syncworker table, the worker logs (one
replica writes text, one JSON, both at debug level), and the output of `status`,
`status --json`, `errors` and `history` for every job.  Forms: raw, JSON-escaped,
URL-encoded (quote and quote_plus), base64 of `user:secret` and of the secret alone.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus, urlsplit

from helpers import ROOT
from httpapi import Api

from .harness import Cluster, Figure, info, wait_until, zero

S = "secret leaks"
USER = "chaos-user"


def canary() -> str:
    return f'cAnArY{secrets.token_hex(6)}/+&"q'


def forms(secret: str) -> dict[str, str]:
    return {
        "raw": secret,
        "JSON-escaped": json.dumps(secret)[1:-1],
        "URL-encoded": quote(secret, safe=""),
        "URL-encoded (plus)": quote_plus(secret),
        "base64 of user:secret": base64.b64encode(f"{USER}:{secret}".encode()).decode(),
        "base64": base64.b64encode(secret.encode()).decode(),
    }


def jobs(api_url: str) -> dict[str, tuple[str, dict[str, Any]]]:
    ref = {"env": "CHAOS_CANARY"}
    http_dest = {
        "table": "public.chaos_http",
        "key": ["id"],
        "create_table": True,
        "columns": {"id": "bigint"},
    }
    http = {"records_path": "data", "mapping": {"id": "id"}, "destination": http_dest, "max_attempts": 1}
    echo = f"{api_url}/echo400"
    closed = "http://127.0.0.1:1/x"
    pg_dest = {"table": "public.chaos_pg", "key": ["id"], "create_table": True, "columns": {"id": "bigint"}}
    return {
        "http-basic": (
            "http",
            {**http, "url": echo, "auth": {"type": "basic", "username": USER, "password": ref}},
        ),
        "http-bearer": ("http", {**http, "url": echo, "auth": {"type": "bearer", "token": ref}}),
        "http-api-key-header": (
            "http",
            {**http, "url": echo, "auth": {"type": "api_key", "name": "X-Api-Key", "value": ref}},
        ),
        "http-api-key-query": (
            "http",
            {**http, "url": echo, "auth": {"type": "api_key", "name": "key", "value": ref, "in": "query"}},
        ),
        "http-secret-header": ("http", {**http, "url": echo, "headers": {"X-Token": ref}}),
        "http-secret-param": ("http", {**http, "url": echo, "params": {"token": ref}}),
        "http-basic-closed-port": (
            "http",
            {**http, "url": closed, "auth": {"type": "basic", "username": USER, "password": ref}},
        ),
        "http-api-key-query-closed-port": (
            "http",
            {**http, "url": closed, "auth": {"type": "api_key", "name": "key", "value": ref, "in": "query"}},
        ),
        "postgres-source-no-such-role": (
            "postgres",
            {
                "source": {"dsn": {"env": "CHAOS_PG_NO_ROLE"}, "table": "public.src", "key": ["id"]},
                "destination": pg_dest,
            },
        ),
        "postgres-source-closed-port": (
            "postgres",
            {
                "source": {"dsn": {"env": "CHAOS_PG_CLOSED"}, "table": "public.src", "key": ["id"]},
                "destination": pg_dest,
            },
        ),
        "postgres-source-keyword-dsn": (
            "postgres",
            {
                "source": {"dsn": {"env": "CHAOS_PG_KEYWORDS"}, "table": "public.src", "key": ["id"]},
                "destination": pg_dest,
            },
        ),
        "postgres-source-unparsable-dsn": (
            "postgres",
            {
                "source": {"dsn": {"env": "CHAOS_PG_UNPARSABLE"}, "table": "public.src", "key": ["id"]},
                "destination": pg_dest,
            },
        ),
        "postgres-destination-no-such-role": (
            "postgres",
            {
                "source": {"dsn": {"env": "CHAOS_PG_GOOD"}, "table": "public.chaos_src", "key": ["id"]},
                "destination": {**pg_dest, "dsn": {"env": "CHAOS_PG_NO_ROLE"}},
            },
        ),
        "sql-dsn-no-such-role": ("sql", {"statement": "SELECT 1", "dsn": {"env": "CHAOS_PG_NO_ROLE"}}),
        "sql-error-quotes-the-password": (
            "sql",
            {"statement": "SELECT current_setting('chaos.canary')::int", "dsn": {"env": "CHAOS_PG_OPTIONS"}},
        ),
        "redis-wrong-password": (
            "redis",
            {
                "url": {"env": "CHAOS_REDIS_WRONG"},
                "source": {"type": "zset", "columns": {"score": "chaos-leaks:none"}},
                "destination": {"table": "public.chaos_redis", "key": ["member"], "create_table": True},
            },
        ),
        "redis-closed-port": (
            "redis",
            {
                "url": {"env": "CHAOS_REDIS_CLOSED"},
                "source": {"type": "zset", "columns": {"score": "chaos-leaks:none"}},
                "destination": {"table": "public.chaos_redis", "key": ["member"], "create_table": True},
            },
        ),
    }


def environment(url: str, secret: str) -> dict[str, str]:
    parts = urlsplit(url)
    host, port, db = parts.hostname or "127.0.0.1", parts.port or 5432, parts.path.lstrip("/")
    encoded = quote(secret, safe="")
    redis = urlsplit(os.environ.get("SYNCWORKER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"))
    escaped = secret.replace("\\", "\\\\").replace("'", "\\'")
    return {
        "CHAOS_CANARY": secret,
        "CHAOS_PG_GOOD": url,
        "CHAOS_PG_NO_ROLE": f"postgresql://chaos_no_such_role:{encoded}@{host}:{port}/{db}",
        "CHAOS_PG_CLOSED": f"postgresql://postgres:{encoded}@127.0.0.1:1/{db}",
        "CHAOS_PG_KEYWORDS": f"host=127.0.0.1 port=1 dbname={db} user=postgres password='{escaped}'",
        "CHAOS_PG_UNPARSABLE": f"postgresql://postgres:{secret}@{host}:{port}/{db}",
        "CHAOS_PG_OPTIONS": f"postgresql://{parts.username or 'postgres'}:{encoded}@{host}:{port}/{db}"
        f"?options={quote('-c chaos.canary=' + secret.replace(' ', '_'), safe='')}",
        "CHAOS_REDIS_WRONG": f"redis://chaos:{encoded}@{redis.hostname}:{redis.port or 6379}/0",
        "CHAOS_REDIS_CLOSED": f"redis://chaos:{encoded}@127.0.0.1:1/0",
    }


def run(workdir: Path) -> list[Figure]:
    secret = canary()
    api = Api()
    try:
        with Cluster(workdir / "leaks") as c:
            c.env.update(environment(c.url, secret))
            c.execute("CREATE TABLE public.chaos_src (id bigint PRIMARY KEY)")
            c.start("text", "--log-level", "debug").ready()
            c.start("json", "--log-level", "debug", "--log-format", "json").ready()
            ids = {
                name: c.add_job(name, kind, config, max_retries=1, retry_backoff_seconds=1)
                for name, (kind, config) in jobs(api.url).items()
            }
            done = wait_until(
                lambda: (
                    c.one(
                        "SELECT count(*) FROM syncworker.integrations WHERE NOT enabled OR retry_count >= 1"
                    )
                    >= len(ids)
                ),
                30,
            )
            time.sleep(1)
            outputs = cli_outputs(c, list(ids))
            tables = table_texts(c)
            exits = c.unexpected_exits()
            logs = {r.name: r.output() for r in c.replicas}
    finally:
        api.close()

    leaks: list[str] = []
    for form, text in forms(secret).items():
        leaks += [f"{where}: {form}" for where, body in tables.items() if text in body]
        leaks += [f"{name} log: {form}" for name, body in logs.items() if text in body]
        leaks += [f"`{cmd}`: {form}" for cmd, body in outputs.items() if text in body]
    sent = [*forms(secret).values()]
    upstream_saw = sum(
        any(form in value for form in sent for value in [*r.headers.values(), *r.query.values()])
        for r in api.requests
    )
    return [
        info(
            S,
            "jobs sent the canary through their error paths",
            f"{len(ids)} ({'all' if done else 'not all'} ran)",
        ),
        info(S, "requests where the local upstream received the canary", upstream_saw),
        zero(S, "leaks (tables, logs, CLI output)", len(leaks), "; ".join(sorted(set(leaks))[:8])),
        zero(S, "worker exits", len(exits), "; ".join(exits)),
    ]


def table_texts(c: Cluster) -> dict[str, str]:
    """Every text or JSON column of every syncworker table, as one text per column."""
    columns = c.rows(
        """SELECT c.table_name, c.column_name FROM information_schema.columns c
             JOIN information_schema.tables t USING (table_schema, table_name)
            WHERE c.table_schema = 'syncworker' AND t.table_type = 'BASE TABLE'
              AND c.data_type IN ('text', 'character varying', 'json', 'jsonb', 'ARRAY', 'USER-DEFINED')
            ORDER BY 1, 2"""
    )
    texts = {}
    for col in columns:
        table, column = col["table_name"], col["column_name"]
        texts[f"{table}.{column}"] = str(
            c.one(f'SELECT string_agg("{column}"::text, E\'\\n\') FROM syncworker."{table}"') or ""
        )
    return texts


def cli_outputs(c: Cluster, names: list[str]) -> dict[str, str]:
    commands = [["status"], ["status", "--json"], ["errors"], *(["history", n] for n in names)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCWORKER_")}
    env.update({"SYNCWORKER_DATABASE_URL": c.url, "PGAPPNAME": "chaos cli"})
    out = {}
    for args in commands:
        done = subprocess.run(
            [sys.executable, "-m", "worker", *args],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        out["syncworker " + " ".join(args)] = done.stdout + done.stderr
    return out
