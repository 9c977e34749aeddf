"""A run's end is one message of statements with their values written in (worker.db.message):
every value must come back from the server as it was, whatever the session has set when the
message arrives (a job's settings are reset only by the message's first statement)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from worker.db.message import literal

TEXTS = [
    "",
    "plain",
    "it's",
    "back\\slash\\",
    "'\\'",
    "$_$",
    "ends with $_",
    "$_$$_1$$_2$ and $$",
    "$",
    "unicode: é, 😀, ß",
    "line\nbreak\ttab\r",
    "nul \x00 inside",
    "-- not a comment",
    "/* not a comment",
    "x" * 100_000,
]
HOSTILE_SETTINGS = [
    "SET standard_conforming_strings = off",
    "SET backslash_quote = on",
    "SET escape_string_warning = off",
    "SET DateStyle = 'SQL, DMY'",
    "SET TimeZone = 'Pacific/Kiritimati'",
    "SET IntervalStyle = 'sql_standard'",
]


async def read_back(url: str, value: Any, cast: str) -> Any:
    """`value` as a literal, read by a session with HOSTILE_SETTINGS, as `cast` (an epoch for
    a time: the session's DateStyle is not one a client reads)."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        for setting in HOSTILE_SETTINGS:
            await conn.execute(setting.encode())
        query = f"SELECT {literal(value)}::{cast}"
        if cast == "timestamptz":
            query = f"SELECT extract(epoch FROM {literal(value)}::timestamptz)::float8"
        cur = await conn.execute(query.encode())  # type: ignore[arg-type]
        row = await cur.fetchone()
        assert row is not None
        return row[0]


def back(url: str, value: Any, cast: str) -> Any:
    return asyncio.run(read_back(url, value, cast))


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_a_text_comes_back_as_it_was(empty_db: str, text: str) -> None:
    assert back(empty_db, text, "text") == text.replace("\x00", "\\0")  # text cannot hold NUL


def test_numbers_times_and_json_come_back_as_they_were(empty_db: str) -> None:
    for number in (0, 7, -7, 2**62, -(2**62)):
        assert back(empty_db, number, "bigint") == number
    assert back(empty_db, 1 - 2, "int") == -1
    assert back(empty_db, -2.5, "float8") == -2.5
    assert back(empty_db, None, "text") is None
    assert back(empty_db, True, "boolean") is True and back(empty_db, False, "boolean") is False
    for moment in (
        datetime(2026, 11, 27, 5, 0, 0, 123456, tzinfo=UTC),
        datetime(1999, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=-9, minutes=-30))),
    ):
        assert back(empty_db, moment, "timestamptz") == moment.timestamp()
    state = {"cursor": "it's $_$ \\ é", "n": [1, 2.5, None, True], "nested": {"": "$$"}}
    assert back(empty_db, Jsonb(state), "jsonb") == state


def test_a_negative_number_cannot_turn_what_precedes_it_into_a_comment(empty_db: str) -> None:
    async def check() -> Any:
        async with await psycopg.AsyncConnection.connect(empty_db, autocommit=True) as conn:
            cur = await conn.execute(f"SELECT 10 -{literal(-3)}, 1".encode())  # type: ignore[arg-type]
            return await cur.fetchone()

    assert asyncio.run(check()) == (13, 1)


def test_a_value_without_a_literal_is_refused() -> None:
    with pytest.raises(TypeError, match="no SQL literal for a list"):
        literal([1, 2])
