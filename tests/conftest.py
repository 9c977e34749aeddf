"""Shared fixtures: every test works in Postgres databases it creates and drops itself.

The server comes from SYNCWORKER_TEST_DATABASE_URL (default
postgresql://postgres@127.0.0.1:5432/postgres); that URL is only used to
CREATE and DROP databases whose names start with SYNCWORKER_TEST_DB_PREFIX
(default ``swtest_``; lower-case letters, digits and underscores).  Redis comes
from SYNCWORKER_TEST_REDIS_URL (default redis://127.0.0.1:6379/0); tests only
touch keys under a unique prefix.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from helpers import ADMIN_URL, REDIS_URL, create_database, db_prefix, drop_database, url_for_db

# The tests connect as the superuser postgres, and their sql jobs have no run_as: let the runs
# in this process (run_once) run them, as the worker processes do (helpers.worker_env).
os.environ.setdefault("SYNCWORKER_ALLOW_SUPERUSER_JOBS", "1")
# The python jobs of the tests are in tests/jobs.py (`jobs:...`): allow that module, in this
# process as in the worker processes.
os.environ.setdefault("SYNCWORKER_PYTHON_MODULES", "jobs")

__all__ = ["ADMIN_URL", "REDIS_URL", "create_database", "drop_database", "url_for_db"]


def pytest_configure(config: pytest.Config) -> None:
    try:
        db_prefix()
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None


@pytest.fixture
def empty_db() -> Iterator[str]:
    """URL of a new, empty database, dropped after the test."""
    name, url = create_database()
    try:
        yield url
    finally:
        drop_database(name)


@pytest.fixture(scope="session")
def migrated_template() -> Iterator[str]:
    """A database migrated to head once per session, used as a template."""
    from worker.db.migrate import upgrade

    name, url = create_database()
    try:
        upgrade(url)
        yield name
    finally:
        drop_database(name)


@pytest.fixture
def db(migrated_template: str) -> Iterator[str]:
    """URL of a new database with the syncworker schema at head."""
    name, url = create_database(template=migrated_template)
    try:
        yield url
    finally:
        drop_database(name)


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A unique key prefix; every key under it is deleted afterwards."""
    import redis

    prefix = f"swtest:{uuid.uuid4().hex[:10]}:"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    try:
        for key in client.scan_iter(match=prefix + "*", count=500):
            client.unlink(key)
    finally:
        client.close()


@pytest.fixture
def jobdb(db: str) -> Iterator[str]:
    """A migrated database with the tables the test jobs write to (tests/jobs.py)."""
    from helpers import execute

    execute(
        db,
        """
        CREATE TABLE public.job_events (id bigserial PRIMARY KEY, integration text, run_id bigint,
                                        event text, pid int, at timestamptz DEFAULT clock_timestamp());
        CREATE TABLE public.job_rows (id bigserial PRIMARY KEY, run_id bigint);
        CREATE TABLE public.ticks (id bigserial PRIMARY KEY, at timestamptz DEFAULT clock_timestamp());
    """,
    )
    yield db
