"""A canary secret sent by an `http` job never shows, in any encoding, wherever the failure is reported.

The upstream answers 400 and echoes the request (request line, auth headers, decoded
query) in its body; the job fails twice and is disabled. Then every text the project
stores or prints is searched for the secret and for each form it took on the wire.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote, quote_plus

import psycopg
import pytest

from helpers import ROOT, TESTS, add_job, rows
from httpapi import Api
from worker import logs
from worker.run.once import run_once

UNIQUE = "a93f06c2e1"  # appears in the secret and in every encoding that keeps letters as they are
CANARY = f'cnry-{UNIQUE}/+&"\\ q=Z'
USER = "svc"


def wire_forms() -> dict[str, str]:
    """Forms of the canary that do not keep its letters: the base64 of it and of the basic-auth pair."""
    forms = {}
    for name, text in (("pair", f"{USER}:{CANARY}"), ("secret", CANARY)):
        raw = text.encode()
        for variant, encoded in (("", base64.b64encode(raw)), ("urlsafe ", base64.urlsafe_b64encode(raw))):
            # skip the part that encodes only "svc:" and the padding; a piece of the rest is a leak
            forms[f"{variant}base64 of the {name}"] = encoded.decode()[4:].rstrip("=")[:-2]
    return forms


def leaks(text: str) -> list[str]:
    """The forms of the canary in `text`; any piece of its letters counts, however it is escaped."""
    forms = {
        "raw": CANARY,
        "url-encoded": quote_plus(CANARY),
        "url-encoded, / kept": quote(CANARY),
        "json-escaped": json.dumps(CANARY)[1:-1],
        **wire_forms(),
        "the secret's letters": UNIQUE,
    }
    return [name for name, form in forms.items() if form in text]


def strings(value: Any) -> Iterator[str]:
    """Every string in a JSON-like value, keys too, and the value as JSON text."""
    yield json.dumps(value, default=str)
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from strings(k)
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)


def stored_texts(url: str) -> dict[str, str]:
    """Every table of the syncworker schema (runs, errors, integrations, hosts, ...) as text."""
    tables = rows(
        url,
        "SELECT table_name FROM information_schema.tables"
        " WHERE table_schema = 'syncworker' AND table_type = 'BASE TABLE'",
    )
    found = {}
    for table in (t["table_name"] for t in tables):
        stored = rows(url, f"SELECT to_jsonb(t) AS row FROM syncworker.{table} t")
        found[f"syncworker.{table}"] = "\n".join(text for r in stored for text in strings(r["row"]))
    return found


def cli(url: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNCWORKER_", "PG"))}
    env["PYTHONPATH"] = str(TESTS)
    env["SYNCWORKER_DATABASE_URL"] = url
    result = subprocess.run(
        [sys.executable, "-m", "worker", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    return result.stdout + result.stderr


@contextmanager
def daemon_logs() -> Iterator[list[io.StringIO]]:
    """What the worker would log, in text and in JSON, at DEBUG, httpx's request lines included."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    handlers, streams = [], []
    for fmt in ("text", "json"):
        logs.setup(fmt, "debug")
        handler = root.handlers[0]
        assert isinstance(handler, logging.StreamHandler)
        streams.append(io.StringIO())
        handler.setStream(streams[-1])
        handlers.append(handler)
    root.handlers[:] = handlers
    httpx_log = logging.getLogger("httpx")
    httpx_level = httpx_log.level
    httpx_log.setLevel(logging.INFO)  # "HTTP Request: GET <url with the query>"
    try:
        yield streams
    finally:
        httpx_log.setLevel(httpx_level)
        root.handlers[:], level = saved
        root.setLevel(level)


@pytest.fixture
def api() -> Iterator[Api]:
    server = Api()
    yield server
    server.close()


@pytest.mark.parametrize(
    ("auth", "sent"),
    [
        (
            {"type": "basic", "username": USER, "password": {"env": "CANARY_SECRET"}},
            lambda r: r.headers["Authorization"].removeprefix("Basic "),
        ),
        (
            {"type": "bearer", "token": {"env": "CANARY_SECRET"}},
            lambda r: r.headers["Authorization"].removeprefix("Bearer "),
        ),
        (
            {"type": "api_key", "name": "X-Api-Key", "value": {"env": "CANARY_SECRET"}},
            lambda r: r.headers["X-Api-Key"],
        ),
        (
            {"type": "api_key", "name": "api_key", "in": "query", "value": {"env": "CANARY_SECRET"}},
            lambda r: r.query["api_key"],
        ),
    ],
    ids=["basic", "bearer", "api-key-header", "api-key-query"],
)
def test_a_canary_secret_never_shows_in_any_form(
    db: str, api: Api, monkeypatch: pytest.MonkeyPatch, auth: dict[str, Any], sent: Any
) -> None:
    monkeypatch.setenv("CANARY_SECRET", CANARY)
    config = {
        "url": api.url + "/echo400",
        "records_path": "data",
        "auth": auth,
        "destination": {
            "table": "public.items",
            "key": ["id"],
            "create_table": True,
            "columns": {"id": "bigint"},
        },
    }
    add_job(db, "canary", "http", config, interval_seconds=3600, max_retries=1)

    texts: dict[str, str] = {}
    with psycopg.connect(db, autocommit=True) as listener:
        listener.execute("LISTEN syncworker_alerts")
        texts["run-once"] = cli(db, "run-once", "canary")  # the first failure
        with daemon_logs() as streams:
            assert asyncio.run(run_once(db, "canary")).status == "failed"  # the second: disabled
        # one alert, or one per run if the first failure already disabled the job
        alerts = list(listener.notifies(timeout=1, stop_after=2))
    assert alerts
    texts["alert"] = "\n".join(a.payload for a in alerts)
    texts["text log"], texts["json log"] = (s.getvalue() for s in streams)
    for args in (["status", "--json"], ["errors"], ["errors", "canary"], ["history", "canary"]):
        texts[" ".join(args)] = cli(db, *args)

    # the secret really went out, so the upstream's echo held it in every form
    assert len(api.requests) == 2, texts["run-once"]
    expected = base64.b64encode(f"{USER}:{CANARY}".encode()).decode() if auth["type"] == "basic" else CANARY
    assert all(sent(r) == expected for r in api.requests)

    texts.update(stored_texts(db))
    assert {"syncworker.sync_runs", "syncworker.sync_errors", "syncworker.integrations"} <= texts.keys()

    found = {where: leaks(text) for where, text in texts.items()}
    assert not any(found.values()), {where: what for where, what in found.items() if what}

    # and the reports are still useful: the upstream's answer is quoted, with the secret masked
    job = rows(db, "SELECT * FROM syncworker.integrations WHERE name = 'canary'")[0]
    assert not job["enabled"] and "HTTP 400" in job["disabled_reason"] and "***" in job["disabled_reason"]
    runs = rows(db, "SELECT status, error FROM syncworker.sync_runs ORDER BY id")
    assert [r["status"] for r in runs] == ["failed", "failed"]
    assert all("HTTP 400" in r["error"] and "GET /echo400" in r["error"] for r in runs)
    assert "***" in runs[-1]["error"] and "\n" not in runs[-1]["error"]
    errors = rows(db, "SELECT message, detail FROM syncworker.sync_errors")
    assert len(errors) == 2 and all("***" in e["message"] for e in errors)
    assert all("HTTP 400" in json.loads(a.payload)["reason"] for a in alerts)
    assert "HTTP 400" in texts["text log"] and "HTTP 400" in texts["json log"]
    assert "HTTP 400" in texts["run-once"] and "upstream_http" in texts["history canary"]
    if auth.get("in") == "query":
        assert "HTTP Request: GET" in texts["text log"]  # the URL with the key in its query was logged
