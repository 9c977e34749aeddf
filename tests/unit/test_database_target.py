"""Which database the command line uses, how it says so, and how it words database errors."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import errors

from worker import db


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql+psycopg://u:pw@h:5433/app", "postgresql://u:pw@h:5433/app"),
        ("postgresql+psycopg2://h/app", "postgresql://h/app"),
        ("postgresql+asyncpg://h/app?sslmode=require", "postgresql://h/app?sslmode=require"),
        ("postgres+psycopg://h/app", "postgres://h/app"),
        ("  postgresql://h/app\n", "postgresql://h/app"),
        ("postgresql://h/app", "postgresql://h/app"),
        ("host=h dbname=app", "host=h dbname=app"),
        ("", ""),
    ],
)
def test_libpq_url_strips_driver_suffixes(given: str, expected: str) -> None:
    assert db.libpq_url(given) == expected


def test_sqlalchemy_url_accepts_every_driver_suffix() -> None:
    for driver in ("", "+psycopg", "+psycopg2", "+asyncpg"):
        assert db.sqlalchemy_url(f"postgresql{driver}://h/app") == "postgresql+psycopg://h/app"


def test_the_flag_then_the_variables_then_libpq() -> None:
    env = {"SYNCWORKER_DATABASE_URL": "postgresql+psycopg://a/one", "DATABASE_URL": "postgresql://b/two"}
    assert db.choose_database("postgresql://c/three", env) == db.Target(
        "postgresql://c/three", "--database-url"
    )
    assert db.choose_database(None, env) == db.Target("postgresql://a/one", "SYNCWORKER_DATABASE_URL")
    assert db.choose_database(None, {**env, "SYNCWORKER_DATABASE_URL": ""}) == db.Target(
        "postgresql://b/two", "DATABASE_URL"
    )
    unnamed = db.choose_database(None, {"PGDATABASE": "x"})
    assert unnamed == db.Target("", "") and not unnamed.explicit
    assert db.choose_database(None, env).explicit


def test_describe_says_how_the_database_was_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in db.LIBPQ_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert (
        db.Target("postgresql://u:secret@h:5433/app", "DATABASE_URL").describe()
        == "h:5433/app (from DATABASE_URL)"
    )
    monkeypatch.setenv("PGHOST", "pg.internal")
    monkeypatch.setenv("PGUSER", "ops")
    described = db.Target("", "").describe()
    assert described.startswith("pg.internal:5432/ops (libpq defaults from PGHOST, PGUSER;")
    assert "no --database-url, SYNCWORKER_DATABASE_URL or DATABASE_URL is set" in described


NAMED = db.Target("postgresql://h/app", "SYNCWORKER_DATABASE_URL")


def test_connection_failures_say_cannot_connect() -> None:
    for exc in (
        psycopg.OperationalError("connection failed: connection refused"),
        errors.InvalidPassword("password authentication failed"),
        errors.AdminShutdown("terminating connection due to administrator command"),
    ):
        assert db.database_error(exc, NAMED).startswith(
            "cannot connect to h:5432/app (from SYNCWORKER_DATABASE_URL): "
        )


def test_errors_raised_in_the_database_are_not_connection_failures() -> None:
    # object_not_in_prerequisite_state is an OperationalError to psycopg; it is no connection failure
    for exc in (
        errors.ObjectNotInPrerequisiteState('integration "x" is disabled'),
        errors.NoDataFound('no integration named "x"'),
        errors.CheckViolation('unknown timezone "Mars/Olympus"'),
        errors.LockNotAvailable("could not obtain lock"),
    ):
        message = db.database_error(exc, NAMED)
        assert message.startswith(f"{exc}; database h:5432/app (from SYNCWORKER_DATABASE_URL)")
        assert "cannot connect" not in message


def test_a_missing_schema_says_to_migrate() -> None:
    for exc in (
        errors.InvalidSchemaName('schema "syncworker" does not exist'),
        errors.UndefinedTable('relation "syncworker.integrations" does not exist'),
    ):
        assert db.database_error(exc, NAMED) == (
            "no syncworker schema in h:5432/app (from SYNCWORKER_DATABASE_URL): "
            "run `syncworker migrate` first"
        )
    other = db.database_error(errors.UndefinedTable('relation "public.orders" does not exist'), NAMED)
    assert other.startswith('relation "public.orders" does not exist; database h:5432/app')


def test_a_missing_schema_in_an_unnamed_database_says_to_name_it() -> None:
    message = db.no_schema(db.Target("postgresql://h/postgres", ""))
    assert "name the database you mean with --database-url or SYNCWORKER_DATABASE_URL" in message
