"""Several statements sent as one message, in one round trip (the simple query protocol: it
takes no parameters, so each value is written into the statement's text).

A run session ends each run this way.  Its statements are the worker's own queries (`Q`,
values by name as psycopg takes them: `%(name)s`):
* on a session where psycopg prepares nothing (`prepare_threshold` None: the worker's run
  sessions), the hot ones are prepared once (`PREPARED`) and the message EXECUTEs them, so
  the server neither parses nor plans them again;
* anywhere else, each is sent with its values in its text.

Every value becomes a literal that reads the same whatever the job left set before the
message's RESET ALL runs: text is dollar-quoted (no escapes, so neither
standard_conforming_strings nor backslash_quote matter), a time is an ISO 8601 string with
its offset, a number is its digits.
"""

from __future__ import annotations

import json
import math
import re
import weakref
from collections.abc import Mapping
from datetime import date
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from worker.db.queries import Q

__all__ = ["PREPARED", "Statement", "bind", "forget", "literal", "send"]


def literal(value: Any) -> str:
    """`value` as SQL text the server reads back as that value (typed by where it goes)."""
    if value is None or isinstance(value, bool):
        return {None: "NULL", True: "true", False: "false"}[value]
    if isinstance(value, int | float):
        number = repr(value)
        if not math.isfinite(value):
            return f"'{number}'"
        return number if value >= 0 else f"({number})"
    if isinstance(value, date):  # a datetime too
        text = value.isoformat()
    elif isinstance(value, Jsonb):
        text = json.dumps(value.obj)
    elif isinstance(value, str):
        text = value
    else:
        raise TypeError(f"no SQL literal for a {type(value).__name__}")
    return quoted(text)


def quoted(text: str) -> str:
    """`text` dollar-quoted, with a tag it does not contain (text cannot hold NUL: `\\0`)."""
    text = text.replace("\x00", "\\0")
    tag, n = "$_$", 0
    while (text + tag).find(tag) != len(text):  # the first end tag must be the last one
        n += 1
        tag = f"$_{n}$"
    return f"{tag}{text}{tag}"


_PLACEHOLDER = re.compile(r"%\((\w+)\)s")


def bind(query: str, params: Mapping[str, Any]) -> str:
    """`query` with each `%(name)s` replaced by the literal of `params[name]`."""
    return query % {name: literal(value) for name, value in params.items()}


class Statement:
    """One of the worker's queries, as a message carries it: EXECUTE of the statement prepared
    on the session (see `send`), or its text with the values in it."""

    def __init__(self, name: str) -> None:
        self.query = Q[name]
        self.name = f"syncworker_{name}"
        self.order = list(dict.fromkeys(_PLACEHOLDER.findall(self.query)))
        numbered = {key: f"${i}" for i, key in enumerate(self.order, 1)}
        self.prepare = f"PREPARE {self.name} AS {self.query % numbered}"

    def text(self, conn: AsyncConnection[Any], params: Mapping[str, Any]) -> str:
        if conn.prepare_threshold is not None:
            return bind(self.query, params)
        return f"EXECUTE {self.name}({', '.join(literal(params[key]) for key in self.order)})"


# The statements a run session prepares: a run's start, its finish, the next claim.
PREPARED = {name: Statement(name) for name in ("begin_run", "finish_run", "claim")}

# Sessions on which PREPARED exist (they go with the session).
_ready: weakref.WeakSet[AsyncConnection[Any]] = weakref.WeakSet()


def forget(conn: AsyncConnection[Any]) -> None:
    """The session's prepared statements may be gone (a job deallocated them, or prepared
    its own): the next message prepares them again."""
    _ready.discard(conn)


async def send(conn: AsyncConnection[Any], statements: list[str]) -> psycopg.AsyncCursor[dict[str, Any]]:
    """Run `statements` as one message, on a session in a transaction or with BEGIN first.
    The cursor is on the first statement's result; the first error is raised, the statements
    after it skipped.  Where the message EXECUTEs `PREPARED` and the session lacks them, it
    prepares them first (after DEALLOCATE ALL: a job may have taken a name)."""
    prepare = conn.prepare_threshold is None and conn not in _ready
    if prepare:
        statements = ["DEALLOCATE ALL", *(s.prepare for s in PREPARED.values()), *statements]
    cur = conn.cursor(row_factory=dict_row)
    text = ";\n".join(statements).encode(conn.info.encoding, "backslashreplace")
    try:
        await cur.execute(text, prepare=False)
    except psycopg.Error:
        forget(conn)  # how far it got is unknown
        raise
    if prepare:
        _ready.add(conn)
        for _ in range(1 + len(PREPARED)):
            cur.nextset()
    return cur
