"""Integration fixtures: a migrated database with the tables the test jobs write to."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from helpers import execute


@pytest.fixture
def jobdb(db: str) -> Iterator[str]:
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
