"""`sql`: run one statement on a schedule (a refresh, a CALL, an INSERT … SELECT).

With `run_as` the statement runs as that role, fenced: it is executed inside a SECURITY
DEFINER function owned by the role, created for the run in the session's pg_temp and gone
with it. Postgres refuses `SET ROLE`, `RESET ROLE`, `SET SESSION AUTHORIZATION` and
`set_config('role', ...)` inside such a function, so the statement cannot take back the
worker's own role (a plain `SET LOCAL ROLE` could be undone by the job's `RESET ROLE`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import AsyncConnection, capabilities, generators, sql
from psycopg.abc import PQGen
from psycopg.pq import ExecStatus
from psycopg.pq.abc import PGconn, PGresult
from psycopg.rows import dict_row
from psycopg.waiting import Wait

from worker import db, secrets
from worker.connectors.base import (
    ConfigError,
    Connector,
    EnvironmentProblem,
    RunContext,
    RunResult,
    expect,
    reject_unknown,
    require,
)
from worker.db import message
from worker.db.queries import Q

# Role names are identifiers: at most 63 bytes (NAMEDATALEN - 1).
_MAX_ROLE_NAME = 63

# The fence: the job's statement, executed as the function's owner (the run_as role).
# search_path is pinned to the session's own, so unqualified names resolve as they would
# without run_as. Created under SET LOCAL ROLE, called as the worker's login, dropped by
# the DISCARD TEMP that follows the call (with anything else the job left in pg_temp).
_FENCE = b"""CREATE FUNCTION pg_temp.syncworker_job(statement text) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $fence$
DECLARE
  affected bigint;
BEGIN
  EXECUTE statement;
  GET DIAGNOSTICS affected = ROW_COUNT;
  RETURN affected;
END
$fence$"""


# A statement on the control database runs in the run's transaction, which only the run's
# finish may end.
_ENDED_THE_RUN = (
    "ended the run's transaction (COMMIT or ROLLBACK): what it did can no longer commit with "
    "the run's record (what it committed stays committed); a statement that manages its own "
    "transactions needs a dsn (which may name this same database)"
)


@dataclass(frozen=True)
class SqlConfig:
    statement: str
    params: dict[str, Any] | list[Any] | None
    dsn: Any  # a secret reference, or None for the control database
    run_as: str | None = None  # the role the statement runs as; None: the session's own


@dataclass(frozen=True)
class Session:
    """Who a session is, and what it may do with a job's `run_as` role (`run_as_check`)."""

    login: str
    login_superuser: bool
    found: bool = False
    member: bool = False
    role_superuser: bool = False


def refusal(run_as: str | None, session: Session, *, allow_superuser: bool) -> str | None:
    """Why `session` may not run a job with `run_as`, or None; pure.

    A superuser's session runs a statement only as another role, unless the worker was
    started with --allow-superuser-jobs.
    """
    if run_as is None:
        if session.login_superuser and not allow_superuser:
            return (
                f'not set, and the statement would run as "{session.login}", a superuser, who can do '
                "anything on the server (COPY ... TO PROGRAM included): set run_as to a role with only "
                "what the job needs, connect the worker as a role that is not a superuser, or start "
                "it with --allow-superuser-jobs (SYNCWORKER_ALLOW_SUPERUSER_JOBS=1)"
            )
        return None
    if not session.found:
        return f'role "{run_as}" does not exist'
    if not session.member:
        return (
            f'the worker\'s login "{session.login}" is not a member of role "{run_as}": '
            f'GRANT "{run_as}" TO "{session.login}"'
        )
    if session.role_superuser and not allow_superuser:
        return (
            f'role "{run_as}" is a superuser: give the job a role with only what it needs, or start '
            "the worker with --allow-superuser-jobs"
        )
    return None


async def check_session(conn: AsyncConnection[Any], run_as: str | None) -> Session:
    """Who `conn` is: read from the server's reports when no role is asked about (no round
    trip), else with `run_as_check`."""
    reported = conn.info.parameter_status("is_superuser")
    if run_as is None and reported is not None:
        return Session(conn.info.parameter_status("session_authorization") or "", reported == "on")
    cur = conn.cursor(row_factory=dict_row)
    row = await (await cur.execute(Q["run_as_check"], {"role": run_as})).fetchone()
    assert row is not None
    return Session(**row)


def check_session_sync(conn: psycopg.Connection[Any], run_as: str | None) -> Session:
    """`check_session` for the command line's sessions."""
    cur = conn.cursor(row_factory=dict_row)
    row = cur.execute(Q["run_as_check"], {"role": run_as}).fetchone()
    assert row is not None
    return Session(**row)


class SqlConnector(Connector):
    """Runs `statement` with optional `params`.

    Without `dsn` the statement runs in the run's own transaction on the control
    database, so its effects commit if and only if the run is recorded as done.
    With `dsn` (a secret reference) it runs on that database in its own transaction.
    With `run_as` it runs as that role (see the module's docstring).
    `records_processed` is the number of rows the statement returned or affected (all its
    statements together); returned rows are counted as they stream in, never kept.
    """

    kind = "sql"

    def validate(self, config: Mapping[str, Any]) -> SqlConfig:
        reject_unknown(config, {"statement", "params", "dsn", "run_as"})
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
        run_as = expect(config, "run_as", str, "the name of a role the worker's login is a member of")
        if run_as is not None and not 0 < len(run_as.encode()) <= _MAX_ROLE_NAME:
            raise ConfigError("run_as", f"expected a role name of 1 to {_MAX_ROLE_NAME} bytes")
        return SqlConfig(statement, params, dsn, run_as)

    def contained(self, config: Any) -> bool:
        return config.dsn is None  # on the control database, in the run's transaction

    async def run(self, ctx: RunContext) -> RunResult:
        config: SqlConfig = ctx.config
        allow = ctx.allow_superuser_jobs
        if config.dsn is None:
            count = await execute(ctx.conn, config, allow_superuser=allow, in_run=True)
            return RunResult(records_processed=count)
        dsn = secrets.resolve(config.dsn, "dsn")
        ctx.log.info("running statement on %s", db.describe_target(dsn))
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True, **db.connect_kwargs()) as conn:
            # On its own the statement is its own transaction there (a procedure may COMMIT);
            # run_as needs a transaction block for its fence, a dry run one to roll back.
            block = ctx.dry_run or config.run_as is not None
            if block:
                await conn.execute(b"BEGIN")
            rowcount = await execute(conn, config, allow_superuser=allow)
            if block:
                await (conn.rollback() if ctx.dry_run else conn.commit())
        return RunResult(records_processed=rowcount)


async def execute(
    conn: AsyncConnection[Any], config: SqlConfig, *, allow_superuser: bool, in_run: bool = False
) -> int:
    """Run the job's statement on `conn` (in its open transaction); the rows it affected.

    Refused (EnvironmentProblem, before anything runs) when `refusal` says so.
    """
    session = await check_session(conn, config.run_as)
    problem = refusal(config.run_as, session, allow_superuser=allow_superuser)
    if problem is not None:
        raise EnvironmentProblem("run_as", problem)
    if config.run_as is None:
        return await _counted(conn, config.statement, config.params, in_run=in_run)
    return await _fenced(conn, config.run_as, config.statement, config.params)


# Rows a statement returns arrive in chunks of this many (one at a time where libpq is older
# than 17), are counted, and are dropped.
_CHUNK = 1000


async def _counted(conn: AsyncConnection[Any], statement: str, params: Any, *, in_run: bool) -> int:
    """Run `statement` (one or more statements; `params` bound into it as literals) in the
    session's open transaction, and return the rows it returned or affected, all statements
    together.  The rows are never kept: a statement that returns a hundred million rows costs
    the run time, not the worker's memory."""
    text = psycopg.AsyncClientCursor(conn).mogrify(statement, params) if params is not None else statement
    count, error, tags = await conn.wait(_count_rows(conn.pgconn, text.encode(conn.info.encoding)))
    if tags & {b"DEALLOCATE ALL", b"DEALLOCATE"}:
        # The job dropped prepared statements of the session, maybe the worker's: psycopg and
        # the run's own must prepare theirs again (neither sees what ran around it).
        _forget_prepared(conn)
    if error is not None:
        if in_run and b"PREPARE" in tags:  # a PREPARE outlives the transaction that failed
            await conn.rollback()
            await _clean_up(conn, {b"PREPARE"})
        raise psycopg.errors.error_from_result(error, encoding=conn.info.encoding)
    if in_run and (_ended(tags) or conn.info.transaction_status != psycopg.pq.TransactionStatus.INTRANS):
        raise ConfigError("statement", _ENDED_THE_RUN)
    if in_run:
        await _clean_up(conn, tags)
    return count


# What a job can leave on its session past its run, by the command tag that shows it did, and
# the statement that takes it away again (the next run on the session, in the same chain, may
# do the same: `prepared statement "q" already exists`).
_LEFT_BEHIND = {b"PREPARE": b"DEALLOCATE ALL", b"DECLARE CURSOR": b"CLOSE ALL", b"LISTEN": b"UNLISTEN *"}


async def _clean_up(conn: AsyncConnection[Any], tags: set[bytes]) -> None:
    """Take away what the job's statement left on the run's session (see _LEFT_BEHIND)."""
    for tag, statement in _LEFT_BEHIND.items():
        if tag in tags:
            await conn.execute(statement)
    if b"PREPARE" in tags:
        _forget_prepared(conn)  # DEALLOCATE ALL took the worker's own statements too


def _forget_prepared(conn: AsyncConnection[Any]) -> None:
    conn._prepared.clear()  # psycopg has no public call for this
    message.forget(conn)


# Command tags that matter to the run (the others are not kept).
_TAGS = frozenset(
    {
        *_LEFT_BEHIND,
        b"DEALLOCATE ALL",
        b"DEALLOCATE",
        b"COMMIT",
        b"PREPARE TRANSACTION",
        b"ROLLBACK",
        b"SAVEPOINT",
        b"BEGIN",
        b"START TRANSACTION",
    }
)


def _ended(tags: set[bytes]) -> bool:
    """Whether the statement ended the transaction it ran in, by its command tags, where it
    opened another one after (`COMMIT; BEGIN`; `END` and `COMMIT` share a tag).  `ROLLBACK`
    is also the tag of `ROLLBACK TO SAVEPOINT`: without a SAVEPOINT before it, or with a
    BEGIN after it, it was the transaction's."""
    if tags & {b"COMMIT", b"PREPARE TRANSACTION"}:
        return True
    return b"ROLLBACK" in tags and (b"SAVEPOINT" not in tags or bool(tags & {b"BEGIN", b"START TRANSACTION"}))


def _count_rows(pgconn: PGconn, query: bytes) -> PQGen[tuple[int, PGresult | None, set[bytes]]]:
    """Send `query` and read every result it brings back, counting rows and keeping none:
    (count, the first error or None, the command tags of _TAGS it ran).
    COPY TO STDOUT is read and dropped like rows; COPY FROM STDIN is ended at once with an
    error (a job has no data to send)."""
    pgconn.send_query(query)
    if capabilities.has_stream_chunked():
        pgconn.set_chunked_rows_mode(_CHUNK)
    else:
        pgconn.set_single_row_mode()
    yield from generators.send(pgconn)
    count = 0
    error: PGresult | None = None
    tags: set[bytes] = set()
    while (res := (yield from generators.fetch(pgconn))) is not None:
        status = res.status
        if status in (ExecStatus.SINGLE_TUPLE, ExecStatus.TUPLES_CHUNK, ExecStatus.TUPLES_OK):
            count += res.ntuples  # a result set's closing TUPLES_OK holds no rows
        elif status == ExecStatus.COMMAND_OK:
            count += res.command_tuples or 0
            if res.command_status in _TAGS:
                tags.add(res.command_status)
        elif status == ExecStatus.COPY_OUT:
            yield from _drop_copy_data(pgconn)
        elif status == ExecStatus.COPY_IN:
            while pgconn.put_copy_end(b"a sql job has no data to COPY FROM STDIN") == 0:
                yield Wait.W
            yield from generators.send(pgconn)
        elif status == ExecStatus.FATAL_ERROR and error is None:
            error = res
    return count, error, tags


def _drop_copy_data(pgconn: PGconn) -> PQGen[None]:
    """Read a COPY TO STDOUT to its end, keeping nothing (its row count comes after)."""
    while (got := pgconn.get_copy_data(1)[0]) >= 0:
        if got == 0:  # nothing buffered yet
            yield Wait.R
            pgconn.consume_input()


async def _fenced(conn: AsyncConnection[Any], role: str, statement: str, params: Any) -> int:
    """`statement` run as `role` inside the fence (a SECURITY DEFINER function of the role's)."""
    # The parameters become literals: the statement travels as one text argument.
    text = psycopg.AsyncClientCursor(conn).mogrify(statement, params) if params is not None else statement
    try:
        async with conn.pipeline():
            await conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(role)))
            await conn.execute(_FENCE)
            await conn.execute(b"RESET ROLE")
    except psycopg.errors.InsufficientPrivilege as exc:
        raise EnvironmentProblem(
            "run_as",
            f'role "{role}" may not create the temporary function the job runs in '
            f'({exc.diag.message_primary}): GRANT TEMPORARY ON DATABASE ... TO "{role}"',
        ) from None
    cur = await conn.execute(b"SELECT pg_temp.syncworker_job(%s)", [text])
    row = await cur.fetchone()
    # The fence, and whatever the job created in pg_temp (nothing it made may outlive the
    # run on the worker's session, where a temporary table could shadow another one), and any
    # statement it prepared (its dynamic SQL may PREPARE under a name the worker EXECUTEs, to
    # run as the worker).
    await conn.execute(b"DISCARD TEMP; DEALLOCATE ALL")
    _forget_prepared(conn)
    return max(int(row[0]) if row and row[0] is not None else 0, 0)


def on_control_session(kind: object, config: object) -> tuple[str | None] | None:
    """For a valid `sql` job whose statement runs on the control database: its run_as, in a
    1-tuple; None for any other job. What `check` and `run-once` ask the session about."""
    if kind != SqlConnector.kind or not isinstance(config, Mapping) or config.get("dsn") is not None:
        return None
    run_as = config.get("run_as")
    return (run_as if isinstance(run_as, str) else None,)
