"""The worker's SQL, loaded by name from queries.sql: one home for every statement."""

from __future__ import annotations

import re
from importlib import resources
from typing import LiteralString, cast

_BLOCK = re.compile(r"^-- name: (\w+)\n((?:--[^\n]*\n)*)(.*?)(?=^-- name: |\Z)", re.M | re.S)


def _load() -> dict[str, LiteralString]:
    text = resources.files("worker.db").joinpath("queries.sql").read_text()
    found: dict[str, LiteralString] = {}
    for name, _comment, body in _BLOCK.findall(text):
        if name in found:
            raise RuntimeError(f"query {name!r} is defined twice in queries.sql")
        found[name] = cast(LiteralString, body.strip().rstrip(";"))
    return found


Q = _load()
