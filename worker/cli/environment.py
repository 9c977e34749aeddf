"""`syncworker check`'s environment section: the server and the way to it, as the worker sees
them at start-up (worker/db/environment.py)."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable
from typing import Any

from worker import db
from worker.db import environment

Handler = Callable[[argparse.Namespace, db.Target], int]


def findings(target: db.Target) -> list[environment.Finding]:
    return environment.findings(asyncio.run(environment.probe(target.url)))


def report(found: list[environment.Finding]) -> list[str]:
    """The section's lines, as printed."""
    return ["environment:", *(f"  {f.level}: {f.topic}: {f.message}" for f in found)]


def as_json(found: list[environment.Finding]) -> list[dict[str, Any]]:
    return [{"level": f.level, "topic": f.topic, "message": f.message} for f in found]


def failed(found: list[environment.Finding]) -> bool:
    """Whether the worker would refuse to start here."""
    return environment.refusal(found) is not None


def with_section(check: Handler) -> Handler:
    """`check` followed by the environment section; exit status 1 if either finds an error."""

    def handler(args: argparse.Namespace, target: db.Target) -> int:
        status = check(args, target)
        found = findings(target)
        print("\n".join(report(found)))
        return max(status, 1 if failed(found) else 0)

    return handler


def require_writable(target: db.Target) -> None:
    """`migrate`: refuse a standby, a read-only session or a server too old, in one line."""
    refusal = environment.refusal([f for f in findings(target) if f.topic == "server"])
    if refusal is not None:
        raise environment.Unsuitable(f"cannot migrate {target.describe()}: {refusal}")
