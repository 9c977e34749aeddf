"""`sql`: run one statement on a schedule (a refresh, a CALL, an INSERT … SELECT)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import psycopg

from worker import db, secrets
from worker.connectors.base import (
    ConfigError,
    Connector,
    RunContext,
    RunResult,
    expect,
    reject_unknown,
    require,
)


@dataclass(frozen=True)
class SqlConfig:
    statement: str
    params: dict[str, Any] | list[Any] | None
    dsn: Any  # a secret reference, or None for the control database


class SqlConnector(Connector):
    """Runs `statement` with optional `params`.

    Without `dsn` the statement runs in the run's own transaction on the control
    database, so its effects commit if and only if the run is recorded as done.
    With `dsn` (a secret reference) it runs on that database in its own transaction.
    `records_processed` is the number of rows the statement affected.
    """

    kind = "sql"

    def validate(self, config: Mapping[str, Any]) -> SqlConfig:
        reject_unknown(config, {"statement", "params", "dsn"})
        statement = require(config, "statement", str, "the SQL statement to run, as a string")
        if not statement.strip():
            raise ConfigError("statement", "must not be empty")
        params = expect(
            config, "params", (dict, list), "an object of named or a list of positional parameters"
        )
        dsn = config.get("dsn")
        if dsn is not None:
            try:
                secrets.check_reference(dsn, "dsn")
            except secrets.SecretError as exc:
                raise ConfigError("dsn", str(exc).removeprefix("dsn: ")) from None
        return SqlConfig(statement, params, dsn)

    async def run(self, ctx: RunContext) -> RunResult:
        config: SqlConfig = ctx.config
        query = config.statement.encode()
        if config.dsn is None:
            cur = await ctx.conn.execute(query, config.params)
            return RunResult(records_processed=max(cur.rowcount, 0))
        dsn = secrets.resolve(config.dsn, "dsn")
        ctx.log.info("running statement on %s", db.describe_target(dsn))
        async with await psycopg.AsyncConnection.connect(dsn, **db.connect_kwargs()) as conn:
            cur = await conn.execute(query, config.params)
            rowcount = max(cur.rowcount, 0)
            if ctx.dry_run:
                await conn.rollback()
        return RunResult(records_processed=rowcount)
