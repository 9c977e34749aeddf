"""The `http` connector against a local API: pagination, auth, incremental, faults, shared limits."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest

from helpers import add_job, execute, one, rows, wait_for
from httpapi import Api, make_records
from worker.connectors import get
from worker.connectors.base import ConfigError
from worker.run.once import OneShot, run_once

COLUMNS = {"id": "bigint", "name": "text", "score": "numeric", "updated_at": "timestamptz", "tags": "jsonb"}


@pytest.fixture
def api() -> Iterator[Api]:
    server = Api()
    server.set_records(make_records(95))
    yield server
    server.close()


def job(api: Api, path: str, **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "url": api.url + path,
        "records_path": "data",
        "pagination": {"type": "page", "size_param": "per_page", "size": 10, "total_path": "total"},
        "destination": {"table": "public.items", "key": ["id"], "create_table": True, "columns": COLUMNS},
    }
    config.update(extra)
    # None here means "leave the setting out" (an explicit null in a row is a type error)
    return {key: value for key, value in config.items() if value is not None}


def cooled_down(db: str) -> bool:
    """Has every open breaker's cool-down (3 s in these tests) passed, on the database clock?"""
    return bool(
        one(db, "SELECT bool_and(opened_at + interval '3 seconds' <= now()) FROM syncworker.circuit_breakers")
    )


def run(db: str, name: str = "items", **kw: Any) -> OneShot:
    return asyncio.run(run_once(db, name, **kw))


def last_run(db: str) -> dict[str, Any]:
    return rows(db, "SELECT * FROM syncworker.sync_runs ORDER BY id DESC LIMIT 1")[0]


def loaded(db: str) -> dict[int, dict[str, Any]]:
    return {r["id"]: r for r in rows(db, "SELECT * FROM items ORDER BY id")}


def test_pages_load_every_record_with_types_and_a_repeat_run_changes_nothing(db: str, api: Api) -> None:
    add_job(db, "items", "http", job(api, "/page"), interval_seconds=3600)
    assert run(db).status == "success"
    got = loaded(db)
    assert sorted(got) == list(range(1, 96))
    assert got[7]["name"] == "name 7" and float(got[7]["score"]) == 10.5
    assert got[7]["tags"] == ["a", "0"]
    assert got[7]["updated_at"].isoformat() == "2026-01-01T00:00:02+00:00"
    r = last_run(db)
    assert (r["records_processed"], r["records_inserted"], r["records_updated"]) == (95, 95, 0)
    assert len(api.requests) == 10  # stopped by the total, not by asking for an empty page

    api.upsert({**make_records(1, start=3)[0], "name": "renamed"})
    assert run(db).status == "success"
    r = last_run(db)
    assert (r["records_inserted"], r["records_updated"]) == (0, 1)
    assert loaded(db)[3]["name"] == "renamed"


@pytest.mark.parametrize(
    ("path", "config", "requests"),
    [
        ("/page", {"pagination": {"type": "page", "size_param": "per_page", "size": 10}}, 11),
        (
            "/offset",
            {
                "records_path": "items",
                "pagination": {"type": "offset", "size": 20, "has_more_path": "has_more"},
            },
            5,
        ),
        (
            "/cursor",
            {
                "pagination": {
                    "type": "cursor",
                    "cursor_path": "meta.next_cursor",
                    "size_param": "limit",
                    "size": 25,
                }
            },
            4,
        ),
        (
            "/next",
            {"records_path": "results", "params": {"limit": 30}, "pagination": {"type": "next_url"}},
            4,
        ),
        (
            "/link",
            {
                "records_path": "",
                "params": {"per_page": 40},
                "pagination": {"type": "link_header"},
            },
            3,
        ),
    ],
    ids=["page-until-empty", "offset-has-more", "cursor", "next-url", "link-header"],
)
def test_every_pagination_style_reads_each_record_once(
    db: str, api: Api, path: str, config: dict[str, Any], requests: int
) -> None:
    add_job(db, "items", "http", job(api, path, **config), interval_seconds=3600)
    assert run(db).status == "success", last_run(db)["error"]
    assert sorted(loaded(db)) == list(range(1, 96))
    r = last_run(db)
    assert (r["records_processed"], r["records_inserted"]) == (95, 95)
    assert len(api.requests) == requests


def test_post_sends_the_json_body(db: str, api: Api) -> None:
    api.set_records([{**r, "kind": "x" if r["id"] % 2 else "y"} for r in make_records(10)])
    add_job(db, "items", "http", job(api, "/post", method="POST", body={"kind": "x"}, pagination=None))
    assert run(db).status == "success"
    assert sorted(loaded(db)) == [1, 3, 5, 7, 9]
    assert api.requests[0].method == "POST" and api.requests[0].body == {"kind": "x"}


@pytest.mark.parametrize(
    ("server_auth", "auth"),
    [
        (("bearer", "s3cret-token"), {"type": "bearer", "token": {"env": "API_SECRET"}}),
        (
            ("basic", "svc", "s3cret-token"),
            {"type": "basic", "username": "svc", "password": {"env": "API_SECRET"}},
        ),
        (
            ("header", "X-Api-Key", "s3cret-token"),
            {"type": "api_key", "name": "X-Api-Key", "value": {"env": "API_SECRET"}},
        ),
        (
            ("query", "api_key", "s3cret-token"),
            {"type": "api_key", "name": "api_key", "in": "query", "value": {"env": "API_SECRET"}},
        ),
    ],
    ids=["bearer", "basic", "api-key-header", "api-key-query"],
)
def test_auth_from_secrets_and_a_wrong_secret_fails_without_leaking_it(
    db: str, api: Api, monkeypatch: pytest.MonkeyPatch, server_auth: tuple[str, ...], auth: dict[str, Any]
) -> None:
    api.auth = server_auth
    add_job(db, "items", "http", job(api, "/page", auth=auth), interval_seconds=3600)
    monkeypatch.setenv("API_SECRET", "s3cret-token")
    assert run(db).status == "success"
    assert len(loaded(db)) == 95

    monkeypatch.setenv("API_SECRET", "wrong-s3cret")
    assert run(db).status == "failed"
    r = last_run(db)
    assert r["error_type"] == "upstream_http" and "HTTP 401" in r["error"]
    stored = json.dumps(rows(db, "SELECT * FROM syncworker.sync_errors"), default=str) + str(r)
    assert "s3cret" not in stored
    assert "s3cret" not in json.dumps(one(db, "SELECT config FROM syncworker.integrations"))


def test_a_missing_secret_fails_the_run_clearly(db: str, api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("API_SECRET", raising=False)
    add_job(db, "items", "http", job(api, "/page", auth={"type": "bearer", "token": {"env": "API_SECRET"}}))
    assert run(db, local_check=False).status == "failed"
    r = last_run(db)
    assert r["error_type"] == "secret_unavailable" and "API_SECRET" in r["error"]
    assert api.requests == []


def test_incremental_sends_the_saved_cursor_minus_the_lookback_and_misses_no_tie(db: str, api: Api) -> None:
    config = job(
        api, "/page", incremental={"cursor_field": "updated_at", "param": "updated_since", "lookback": 10}
    )
    add_job(db, "items", "http", config, interval_seconds=3600)
    assert run(db).status == "success"
    state = one(db, "SELECT state FROM syncworker.integrations")
    assert state == {"cursor": "2026-01-01T00:00:31Z"}  # the newest updated_at in the data
    assert "updated_since" not in api.requests[0].query  # the first run reads everything

    # A record written later in the same second as the cursor, and one a minute later.
    api.upsert({"id": 500, "name": "tie", "score": 1, "updated_at": "2026-01-01T00:00:31Z", "tags": []})
    api.upsert({"id": 501, "name": "new", "score": 2, "updated_at": "2026-01-01T00:01:31Z", "tags": []})
    api.requests.clear()
    assert run(db).status == "success"
    assert api.requests[0].query["updated_since"] == "2026-01-01T00:00:21Z"  # the cursor, 10 s earlier
    assert {500, 501} <= set(loaded(db))
    r = last_run(db)
    assert r["records_inserted"] == 2 and r["records_processed"] < 95  # only the recent window was read
    assert one(db, "SELECT state->>'cursor' FROM syncworker.integrations") == "2026-01-01T00:01:31Z"


def test_the_initial_cursor_starts_the_first_run(db: str, api: Api) -> None:
    config = job(
        api,
        "/page",
        incremental={
            "cursor_field": "updated_at",
            "param": "updated_since",
            "initial": "2026-01-01T00:00:30Z",
        },
    )
    add_job(db, "items", "http", config)
    assert run(db).status == "success"
    assert api.requests[0].query["updated_since"] == "2026-01-01T00:00:30Z"
    assert sorted(loaded(db)) == list(range(90, 96))


def test_5xx_and_429_are_retried_honouring_retry_after(db: str, api: Api) -> None:
    api.faults.extend(["500", ("429", 1), "503"])
    add_job(db, "items", "http", job(api, "/page"), interval_seconds=3600)
    assert run(db).status == "success"
    assert len(loaded(db)) == 95
    assert len(api.requests) == 13  # 3 failures, then the 10 pages
    after_429 = api.requests[2].at - api.requests[1].at
    assert after_429 >= 0.95  # Retry-After: 1 was waited out
    assert one(db, "SELECT count(*) FROM syncworker.sync_errors") == 0


def test_each_retry_is_logged_once_in_our_words(db: str, api: Api, caplog: pytest.LogCaptureFixture) -> None:
    api.faults.extend(["500", "503"])
    add_job(db, "items", "http", job(api, "/page"), interval_seconds=3600)
    with caplog.at_level(logging.DEBUG):
        assert run(db).status == "success"
    retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retries) == 2, retries
    assert not [r for r in caplog.records if r.name == "backoff" or "Backing off" in r.getMessage()]


def test_retries_give_up_after_max_attempts(db: str, api: Api) -> None:
    api.faults.extend(["500"] * 10)
    add_job(db, "items", "http", job(api, "/page", max_attempts=2))
    assert run(db).status == "failed"
    r = last_run(db)
    assert r["error_type"] == "upstream_http" and "gave up after 2 attempts" in r["error"]
    assert len(api.requests) == 2


def test_other_4xx_fail_at_once(db: str, api: Api) -> None:
    add_job(db, "items", "http", job(api, "/nowhere"), interval_seconds=3600)
    assert run(db).status == "failed"
    r = last_run(db)
    assert r["error_type"] == "upstream_http" and "HTTP 404" in r["error"] and "/nowhere" in r["error"]
    assert len(api.requests) == 1
    assert one(db, "SELECT retry_count FROM syncworker.integrations") == 1


def test_a_slow_response_times_out_and_is_retried(db: str, api: Api) -> None:
    api.faults.append(("slow", 1.5))
    add_job(db, "items", "http", job(api, "/page", request_timeout_seconds=0.3))
    assert run(db).status == "success"
    assert len(loaded(db)) == 95

    api.faults.extend([("slow", 1.5)] * 2)
    execute(db, "TRUNCATE items")
    add_job(db, "slow", "http", job(api, "/page", request_timeout_seconds=0.3, max_attempts=2))
    assert run(db, "slow").status == "failed"
    r = last_run(db)
    assert r["error_type"] == "timeout" and "timed out" in r["error"]


@pytest.mark.parametrize(
    ("fault", "error_type"), [("malformed", "upstream_invalid"), ("truncated", "connection")]
)
def test_broken_bodies_are_retried_then_fail_clearly(db: str, api: Api, fault: str, error_type: str) -> None:
    api.faults.append(fault)
    add_job(db, "items", "http", job(api, "/page"))
    assert run(db).status == "success"
    assert len(loaded(db)) == 95

    api.faults.extend([fault] * 3)
    add_job(db, "broken", "http", job(api, "/page", max_attempts=3))
    assert run(db, "broken").status == "failed"
    assert last_run(db)["error_type"] == error_type


def test_a_next_link_to_itself_is_an_error_not_an_endless_loop(db: str, api: Api) -> None:
    add_job(db, "items", "http", job(api, "/self", pagination={"type": "next_url"}))
    assert run(db).status == "failed"
    r = last_run(db)
    assert r["error_type"] == "pagination_loop" and "twice" in r["error"]
    assert len(api.requests) == 1  # the repeat was caught before it was sent
    assert one(db, "SELECT to_regclass('public.items')") is None  # nothing landed


def test_a_page_that_repeats_under_another_url_is_a_loop(db: str, api: Api) -> None:
    # The API ignores the page parameter it was told about: every page is the first one.
    add_job(db, "items", "http", job(api, "/page", pagination={"type": "page", "param": "p"}))
    assert run(db).status == "failed"
    assert last_run(db)["error_type"] == "pagination_loop"
    assert len(api.requests) == 2


def test_a_body_without_the_records_list_fails_clearly_and_writes_nothing(db: str, api: Api) -> None:
    add_job(db, "items", "http", job(api, "/page", records_path="results"))
    assert run(db).status == "failed"
    r = last_run(db)
    assert r["error_type"] == "upstream_invalid" and "records_path 'results'" in r["error"]
    assert one(db, "SELECT to_regclass('public.items')") is None


def test_a_response_over_the_size_cap_fails_without_retrying(db: str, api: Api) -> None:
    api.faults.append("huge")
    add_job(db, "items", "http", job(api, "/page", max_response_bytes=100_000))
    assert run(db).status == "failed"
    r = last_run(db)
    assert r["error_type"] == "response_too_large" and "max_response_bytes" in r["error"]
    assert len(api.requests) == 1


def test_bad_records_are_recorded_with_their_key_and_the_rest_lands(db: str, api: Api) -> None:
    records: list[Any] = make_records(20)
    records[3]["score"] = "not a number"  # id 4: the column is numeric
    del records[5]["id"]
    api.records = [*records, "not an object"]
    config = job(api, "/page", pagination=None, params={"per_page": 100})
    add_job(db, "items", "http", config, interval_seconds=3600)
    assert run(db).status == "partial"
    assert len(loaded(db)) == 18
    errors = rows(db, "SELECT record_key, error_type, message FROM syncworker.sync_errors ORDER BY id")
    keys = [e["record_key"] for e in errors]
    assert "4" in keys and "?" in keys and None in keys
    assert all(e["error_type"] == "record_invalid" for e in errors)
    assert last_run(db)["records_failed"] == 3


def test_delete_missing_removes_what_the_source_no_longer_has(db: str, api: Api) -> None:
    add_job(db, "items", "http", job(api, "/page", delete_missing=True), interval_seconds=3600)
    assert run(db).status == "success"
    api.remove(10)
    api.remove(11)
    assert run(db).status == "success"
    assert len(loaded(db)) == 93 and 10 not in loaded(db)
    assert last_run(db)["records_deleted"] == 2

    # A read that fails half-way deletes nothing.
    api.remove(12)
    api.faults.extend([None] * 3 + ["404"])  # type: ignore[list-item]
    assert run(db).status == "failed"
    assert len(loaded(db)) == 93


def test_the_rate_limit_is_shared_by_concurrent_runs(db: str, api: Api) -> None:
    limit = {"requests": 10, "per_seconds": 1}
    add_job(db, "a", "http", job(api, "/page", rate_limit=limit))
    other = job(api, "/page", rate_limit=limit)
    other["destination"] = {**other["destination"], "table": "public.items_b"}
    add_job(db, "b", "http", other)

    async def both() -> list[OneShot]:
        return list(await asyncio.gather(run_once(db, "a"), run_once(db, "b")))

    started = time.monotonic()
    assert [o.status for o in asyncio.run(both())] == ["success", "success"]
    elapsed = time.monotonic() - started
    assert len(api.requests) == 20
    assert elapsed >= 1.8  # 20 requests at 10 per second, spread evenly
    times = sorted(r.at for r in api.requests)
    assert max(sum(1 for t in times if s <= t < s + 1.0) for s in times) <= 11
    host = api.url.removeprefix("http://")
    assert one(db, "SELECT requests FROM syncworker.rate_limits WHERE host = %s", (host,)) == 20


def test_min_interval_spaces_requests(db: str, api: Api) -> None:
    api.set_records(make_records(30))
    add_job(db, "items", "http", job(api, "/page", min_interval_seconds=0.25))
    assert run(db).status == "success"
    times = [r.at for r in api.requests]
    assert len(times) == 3
    assert min(b - a for a, b in itertools.pairwise(times)) >= 0.2


def test_the_circuit_breaker_opens_is_visible_in_sql_and_half_opens_after_the_cooldown(
    db: str, api: Api
) -> None:
    # The cool-down outlasts the backoff before a third attempt (at most 1 + 2 seconds).
    breaker = {"failures": 2, "cooldown_seconds": 3}
    add_job(db, "items", "http", job(api, "/page", circuit_breaker=breaker, max_attempts=3))
    add_job(db, "other", "http", job(api, "/page", circuit_breaker=breaker))
    api.faults.extend(["500"] * 20)
    assert run(db).status == "failed"
    assert last_run(db)["error_type"] == "circuit_open"
    assert len(api.requests) == 2  # the third attempt was stopped before it left
    host = api.url.removeprefix("http://")
    state = rows(db, "SELECT state, consecutive_failures, last_error FROM syncworker.circuit_breakers")
    assert state == [{"state": "open", "consecutive_failures": 2, "last_error": "HTTP 500"}]

    # Every job on that host fails fast while it is open.
    assert run(db, "other").status == "failed"
    assert last_run(db)["error_type"] == "circuit_open" and host in last_run(db)["error"]
    assert len(api.requests) == 2

    # After the cool-down one trial goes out; it fails, and the breaker opens again.
    wait_for(lambda: cooled_down(db), timeout=10, what="the breaker's cool-down")
    assert run(db, "other").status == "failed"
    assert len(api.requests) == 3
    assert one(db, "SELECT state FROM syncworker.circuit_breakers") == "open"

    # The next trial succeeds: closed, and the sync completes.
    api.faults.clear()
    wait_for(lambda: cooled_down(db), timeout=10, what="the breaker's cool-down")
    assert run(db, "other").status == "success"
    assert rows(db, "SELECT state, consecutive_failures FROM syncworker.circuit_breakers") == [
        {"state": "closed", "consecutive_failures": 0}
    ]


def test_dry_run_reads_but_writes_nothing(db: str, api: Api) -> None:
    config = job(api, "/page", incremental={"cursor_field": "updated_at", "param": "updated_since"})
    add_job(db, "items", "http", config)
    outcome = run(db, dry_run=True)
    assert outcome.result is not None and outcome.result.inserted == 95
    assert outcome.result.preview is not None and outcome.result.preview["insert"][:3] == ["1", "2", "3"]
    assert one(db, "SELECT to_regclass('public.items')") is None
    assert one(db, "SELECT state FROM syncworker.integrations") == {}
    assert one(db, "SELECT count(*) FROM syncworker.sync_runs") == 0


def test_an_external_destination_gets_the_data(db: str, api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    from helpers import create_database, drop_database

    name, dest = create_database()
    try:
        monkeypatch.setenv("DEST_DSN", dest)
        config = job(api, "/page", incremental={"cursor_field": "updated_at", "param": "updated_since"})
        config["destination"] = {**config["destination"], "dsn": {"env": "DEST_DSN"}}
        add_job(db, "items", "http", config)
        assert run(db).status == "success"
        assert one(dest, "SELECT count(*) FROM items") == 95
        assert one(db, "SELECT state->>'cursor' FROM syncworker.integrations") == "2026-01-01T00:00:31Z"
        assert one(db, "SELECT to_regclass('public.items')") is None
    finally:
        drop_database(name)


BASE = {"url": "http://api.test/v1", "mapping": {"id": "id"}, "destination": {"table": "t", "key": ["id"]}}


@pytest.mark.parametrize(
    ("change", "field", "says"),
    [
        ({"url": None}, "url", "is required"),
        ({"url": "ftp://api.test"}, "url", "http:// or https://"),
        ({"method": "DELETE"}, "method", "GET or POST"),
        ({"body": {"a": 1}}, "body", "only sent with POST"),
        ({"pagination": {"type": "pages"}}, "pagination.type", "expected one of"),
        ({"pagination": {"type": "offset"}}, "pagination.size", "required for offset"),
        ({"pagination": {"type": "page", "size": 0}}, "pagination.size", "positive"),
        ({"pagination": {"type": "page", "size": 50}}, "pagination.size_param", "is required"),
        ({"auth": {"type": "oauth"}}, "auth.type", "bearer, basic or api_key"),
        ({"auth": {"type": "bearer", "token": "plain-text"}}, "auth.token", "secret reference"),
        (
            {"auth": {"type": "api_key", "name": "k", "value": {"env": "K"}, "in": "body"}},
            "auth.in",
            "header",
        ),
        ({"mapping": {"name": "name"}}, "mapping", "key column"),
        ({"mapping": None}, "mapping", "is required"),
        ({"incremental": {"param": "since"}}, "incremental.cursor_field", "is required"),
        (
            {"incremental": {"cursor_field": "u", "param": "s"}, "delete_missing": True},
            "delete_missing",
            "cannot go with incremental",
        ),
        ({"rate_limit": {"requests": 0, "per_seconds": 60}}, "rate_limit.requests", "positive"),
        ({"rate_limit": {"requests": 10}}, "rate_limit.per_seconds", "is required"),
        ({"circuit_breaker": {"failures": -1}}, "circuit_breaker.failures", "positive"),
        ({"request_timeout_seconds": "10"}, "request_timeout_seconds", "seconds"),
        ({"max_response_bytes": 0}, "max_response_bytes", "positive"),
        ({"headers": {"X-A": ["x"]}}, "headers.X-A", "string or a number"),
        ({"retries": 3}, "retries", "unknown setting"),
    ],
)
def test_config_errors_name_the_field(change: dict[str, Any], field: str, says: str) -> None:
    config = {**BASE, **change}
    config = {k: v for k, v in config.items() if v is not None}
    with pytest.raises(ConfigError) as err:
        get("http").validate(config)
    assert err.value.field == field and says in str(err.value), str(err.value)


def test_a_bad_config_disables_only_that_job(db: str, api: Api) -> None:
    add_job(db, "items", "http", {**job(api, "/page"), "pagination": {"type": "scroll"}})
    assert run(db).status == "failed"
    r = last_run(db)
    assert r["error_type"] == "config_invalid" and "pagination.type" in r["error"]
    assert one(db, "SELECT enabled FROM syncworker.integrations") is False
    assert api.requests == []
