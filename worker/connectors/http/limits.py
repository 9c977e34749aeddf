"""Per-host limits of `http` jobs, kept in Postgres so that every replica sees the same:
the fleet-wide rate limit (and minimum gap between requests) and the circuit breaker."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import TupleRow

from worker import db
from worker.connectors.base import SyncError
from worker.connectors.http.config import HttpConfig
from worker.db.queries import Q
from worker.errors import ErrorType

Conn = AsyncConnection[TupleRow]


class CircuitOpen(SyncError):
    error_type = ErrorType.CIRCUIT_OPEN


class Host:
    """Per-host limits, on a session of their own so that every replica sees them at once."""

    def __init__(self, run_conn: Conn, cfg: HttpConfig) -> None:
        self.run_conn = run_conn
        self.cfg = cfg
        self.name = cfg.host
        self.conn: Conn | None = None

    async def __aenter__(self) -> Host:
        info = self.run_conn.info
        self.conn = await psycopg.AsyncConnection.connect(
            info.dsn, password=info.password, autocommit=True, **db.connect_kwargs("syncworker http limits")
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.conn is not None:
            await self.conn.close()

    async def _value(self, query: str, params: dict[str, Any]) -> Any:
        assert self.conn is not None
        cur = await self.conn.execute(Q[query], params)
        row = await cur.fetchone()
        assert row is not None
        return row[0]

    async def take_slot(self) -> None:
        """Wait until the fleet-wide rate limit and the minimum gap allow one more request."""
        if self.cfg.rate_limit is None and not self.cfg.min_interval:
            return
        # Spread evenly (no burst): `requests` per `per_seconds` then holds in every window of
        # that length, whichever way the API counts.
        emission = 0.0
        if self.cfg.rate_limit is not None:
            requests, per = self.cfg.rate_limit
            emission = per / requests
        while True:
            wait = await self._value(
                "take_request_slot",
                {"host": self.name, "emission": emission, "burst": 0.0, "gap": self.cfg.min_interval},
            )
            if wait <= 0:
                return
            await asyncio.sleep(min(float(wait), 60.0))

    async def allow(self) -> None:
        state = await self._value("circuit_allow", {"host": self.name, "cooldown": self.cfg.breaker_cooldown})
        if state == "open":
            raise CircuitOpen(
                f"circuit breaker for {self.name} is open after repeated failures; requests resume after "
                f"the cool-down ({self.cfg.breaker_cooldown:g}s; see syncworker.circuit_breakers)",
            )

    async def record(self, ok: bool, error: str | None = None) -> None:
        await self._value(
            "circuit_record",
            {"host": self.name, "ok": ok, "threshold": self.cfg.breaker_failures, "error": error},
        )
