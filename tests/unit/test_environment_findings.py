"""What the environment probe's results mean (worker/db/environment.py), and which errors are a
server's own timeouts (worker/run/outcome.py): pure functions, no server needed."""

from __future__ import annotations

from dataclasses import replace

import psycopg
import pytest

from worker.db import environment as env_mod
from worker.db.environment import Environment, findings, refusal
from worker.errors import ErrorType
from worker.run.outcome import classify, server_timeout

HEALTHY = Environment(150008, "15.8", False, False, False, "app")


def levels(env: Environment) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for f in findings(env):
        found.setdefault(f.level, []).append(f"{f.topic}: {f.message}")
    return found


def test_a_direct_connection_to_a_primary_as_an_ordinary_role_is_all_ok() -> None:
    assert set(levels(HEALTHY)) == {"ok"}
    assert refusal(findings(HEALTHY)) is None


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"version": 130011, "version_name": "13.11"}, "PostgreSQL 13.11 is too old: syncworker needs 14"),
        ({"in_recovery": True, "read_only": True}, "hot standby (read-only, pg_is_in_recovery())"),
        ({"read_only": True}, "sessions are read-only (default_transaction_read_only"),
        ({"stable": False}, "PgBouncer with pool_mode = session"),
    ],
)
def test_what_the_worker_refuses_to_start_on(change: dict[str, object], words: str) -> None:
    env = replace(HEALTHY, **change)  # type: ignore[arg-type]
    reason = refusal(findings(env))
    assert reason is not None and words in reason
    assert len(levels(env)["error"]) == 1


def test_a_standby_is_one_error_not_two() -> None:
    env = replace(HEALTHY, in_recovery=True, read_only=True)
    assert [m for m in levels(env)["error"] if "read-only" in m] == [levels(env)["error"][0]]


def test_a_superuser_is_a_warning() -> None:
    env = replace(HEALTHY, superuser=True, user="postgres")
    assert levels(env)["warning"] == [
        "role: connected as postgres, a superuser: jobs' SQL may run with superuser rights; "
        "connect as a login granted syncworker_runner instead"
    ]
    assert refusal(findings(env)) is None


def test_default_timeouts_and_a_pooler_that_keeps_startup_options_are_notes() -> None:
    env = replace(
        HEALTHY,
        options="refused",
        timeouts=(("statement_timeout", "30s", "database"), ("lock_timeout", "5s", "user")),
    )
    assert env.by_set and not HEALTHY.by_set
    assert levels(env)["note"] == [
        "sessions: startup options are refused on the way to the server (a pooler): the worker "
        "sets its session settings with SET instead",
        "timeouts: statement_timeout = 30s for the database: the worker's own sessions override it "
        "(sessions a job opens with a dsn of its own do not)",
        "timeouts: lock_timeout = 5s for the role: the worker's own sessions override it "
        "(sessions a job opens with a dsn of its own do not)",
    ]
    assert refusal(findings(env)) is None


def test_the_minimum_version_is_14() -> None:
    assert env_mod.MIN_SERVER_VERSION == 140000
    assert refusal(findings(replace(HEALTHY, version=140000, version_name="14.0"))) is None


def _error(cls: type[psycopg.Error], state: str, message: str) -> psycopg.Error:
    exc = cls(message)
    exc.sqlstate = state  # type: ignore[misc]
    return exc


@pytest.mark.parametrize(
    ("cls", "state", "message", "cut"),
    [
        (psycopg.errors.QueryCanceled, "57014", "canceling statement due to statement timeout", True),
        (psycopg.errors.LockNotAvailable, "55P03", "canceling statement due to lock timeout", True),
        (
            psycopg.errors.IdleInTransactionSessionTimeout,
            "25P03",
            "terminating connection due to idle-in-transaction timeout",
            True,
        ),
        (
            psycopg.errors.IdleSessionTimeout,
            "57P05",
            "terminating connection due to idle-session timeout",
            True,
        ),
        (psycopg.errors.QueryCanceled, "57014", "canceling statement due to user request", False),
        (psycopg.errors.LockNotAvailable, "55P03", 'could not obtain lock on row in relation "t"', False),
    ],
)
def test_a_servers_own_timeout_is_told_apart(
    cls: type[psycopg.Error], state: str, message: str, cut: bool
) -> None:
    exc = _error(cls, state, message)
    assert (server_timeout(exc) is not None) is cut
    # the runner raises a plain OperationalError from a session that broke: the cause tells
    wrapped = psycopg.OperationalError("consuming input failed")
    wrapped.__cause__ = exc
    assert (server_timeout(wrapped) is not None) is cut
    expected = ErrorType.SERVER_TIMEOUT if cut else None
    if expected is not None:
        assert classify(exc, timed_out=False).error_type == expected
    # the worker's own timeout_seconds stays `timeout`
    assert classify(exc, timed_out=True).error_type == ErrorType.TIMEOUT
