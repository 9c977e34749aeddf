"""Where the worker runs: the server it reaches and what stands between them.

`probe(url)` looks (a few round trips on two short sessions); `findings(env)` turns what it
saw into lines a person can act on, pure.  The worker refuses to start on an error
(`refusal`), logs the warnings; `syncworker check` prints them all as its environment section.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import psycopg

from worker import db
from worker.db.queries import Q

# client_connection_check_interval (ends a dead client's statement at once) came with 14.
MIN_SERVER_VERSION = 140000
MIN_SERVER_NAME = "14"
# sysexits.h EX_CONFIG, as for a schema mismatch: restarting cannot help until someone acts.
EXIT_UNSUITABLE = 78

# Server-side limits the worker's sessions override (db.SERVER_SETTINGS), when set by default.
TIMEOUTS = (
    "statement_timeout",
    "lock_timeout",
    "idle_in_transaction_session_timeout",
    "idle_session_timeout",
)

# What pg_settings.source says about a default that is not the server's built-in one.
_SOURCES = {
    "database": "for the database",
    "user": "for the role",
    "database user": "for the role in this database",
    "configuration file": "in the server's configuration",
}

# The settings that show whether startup options took (the keepalives read 0 on a local socket).
_CHECKED = ("client_connection_check_interval", *TIMEOUTS)

OptionsState = Literal["applied", "dropped", "refused"]


@dataclass(frozen=True)
class Environment:
    """What `probe` saw."""

    version: int  # server_version_num
    version_name: str
    in_recovery: bool  # pg_is_in_recovery(): a hot standby
    read_only: bool  # sessions start read-only (default_transaction_read_only)
    superuser: bool
    user: str
    # The worker's startup options: in effect, silently dropped, or refused (a pooler).
    options: OptionsState = "applied"
    stable: bool | None = True  # one server session per connection; None: not looked at
    timeouts: tuple[tuple[str, str, str], ...] = field(default=())  # (name, value, source)

    @property
    def by_set(self) -> bool:
        """The worker's sessions get their settings by SET rather than as startup options."""
        return self.options != "applied"


@dataclass(frozen=True)
class Finding:
    level: Literal["ok", "note", "warning", "error"]  # note: worth a line in the worker's log
    topic: str  # server, sessions, timeouts, role
    message: str


class Unsuitable(Exception):
    """The worker cannot work on this server or through this connection; the message says why."""

    exit_code = EXIT_UNSUITABLE


# -- looking -------------------------------------------------------------------------------------


async def _connect(url: str, **kwargs: Any) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(url, autocommit=True, **kwargs)


async def _open_own(url: str, application_name: str) -> tuple[psycopg.AsyncConnection[Any], bool]:
    """A session opened as the worker opens its own, with its startup options; without them
    if the way to the server refuses them (PgBouncer: "unsupported startup parameter")."""
    try:
        return await _connect(url, **db.session_kwargs(url, application_name)), False
    except psycopg.OperationalError as exc:
        if "unsupported startup parameter" not in str(exc):
            raise
    return await _connect(url, **db.connect_kwargs(application_name)), True


async def _ours(url: str) -> tuple[psycopg.AsyncConnection[Any], OptionsState]:
    """A session opened as the worker opens its own, and whether its startup options took."""
    conn, refused = await _open_own(url, "syncworker probe")
    if refused:
        return conn, "refused"
    cur = await conn.execute(Q["environment_settings"], {"names": list(_CHECKED)})
    seen = {str(name): str(value) for name, value in await cur.fetchall()}
    applied = all(seen.get(name) == db.SERVER_SETTINGS[name] for name in _CHECKED)
    return conn, "applied" if applied else "dropped"


async def connect_own(url: str, application_name: str) -> psycopg.AsyncConnection[Any]:
    """A session with the worker's settings, for a command that runs jobs outside the worker
    (`run-once`): startup options where the server gets them, SET as well in case a pooler
    dropped them on the way."""
    conn, _ = await _open_own(url, application_name)
    await conn.execute(db.settings_statement())
    return conn


async def _pids(conn: psycopg.AsyncConnection[Any], times: int) -> list[tuple[int, str | None]]:
    """The backend and the probe's session setting, `times` transactions in a row."""
    seen = []
    for _ in range(times):
        row = await (await conn.execute(Q["environment_backend"])).fetchone()
        assert row is not None
        seen.append((int(row[0]), row[1]))
    return seen


async def probe(url: str) -> Environment:
    """Look at the server behind `url` and at what stands between (see `findings`).

    Sessions are stable when two sessions open at once keep their own backend each across
    transactions, and a session setting set in one transaction is there in the next.  A
    transaction pooler hands each transaction to a free server connection: with one, or
    handing out the one used last (PgBouncer's default), both sessions get the same backend;
    handing them out in turn, one session's consecutive transactions get different ones.
    Either way the sequence below tells, without relying on luck.
    """
    plain = await _connect(url, **db.connect_kwargs("syncworker probe"))
    try:
        cur = await plain.execute(Q["environment_server"])
        row = await cur.fetchone()
        assert row is not None
        version, name, recovery, read_only, superuser, user, first = row
        name = str(name).split()[0]
        found = await (await plain.execute(Q["environment_timeouts"], {"names": list(TIMEOUTS)})).fetchall()
        timeouts = tuple((str(n), str(v), str(s)) for n, v, s in found)
        env = Environment(
            int(version),
            str(name),
            bool(recovery),
            bool(read_only),
            bool(superuser),
            str(user),
            timeouts=timeouts,
        )
        if env.version < MIN_SERVER_VERSION:
            return replace(env, stable=None)
        token = secrets.token_hex(8)
        await plain.execute(Q["environment_mark"], {"token": token})
        ours, options = await _ours(url)
        try:
            a = [(int(first), token), *await _pids(plain, 2)]
            b = await _pids(ours, 2)
            a += await _pids(plain, 1)
        finally:
            await ours.close()
    finally:
        await plain.close()
    # `a` starts with the first backend and the mark: one value means both stayed.
    stable = len(set(a)) == 1 and len(set(b)) == 1 and a[0][0] != b[0][0]
    return replace(env, options=options, stable=stable)


# -- judging (pure) --------------------------------------------------------------------------------


def findings(env: Environment) -> list[Finding]:
    """What `env` means for the worker, one line each: errors stop it, warnings are logged."""
    return [
        _version(env),
        _standby(env),
        _sessions(env),
        *_options(env),
        *_timeouts(env),
        _role(env),
    ]


def _version(env: Environment) -> Finding:
    if env.version < MIN_SERVER_VERSION:
        return Finding(
            "error",
            "server",
            f"PostgreSQL {env.version_name} is too old: syncworker needs {MIN_SERVER_NAME} or newer "
            "(client_connection_check_interval)",
        )
    return Finding("ok", "server", f"PostgreSQL {env.version_name} ({MIN_SERVER_NAME} or newer is needed)")


def _standby(env: Environment) -> Finding:
    if env.in_recovery:
        return Finding(
            "error",
            "server",
            "the server is a hot standby (read-only, pg_is_in_recovery()): connect to the primary",
        )
    if env.read_only:
        return Finding(
            "error",
            "server",
            "sessions are read-only (default_transaction_read_only is on for this server, database "
            "or role): connect to a writable primary, or turn it off for the worker's role",
        )
    return Finding("ok", "server", "a primary, writable")


def _sessions(env: Environment) -> Finding:
    if env.stable is None:
        return Finding("warning", "sessions", "not checked (the server is too old)")
    if not env.stable:
        return Finding(
            "error",
            "sessions",
            "sessions do not keep their server session from one transaction to the next (a pooler "
            "in transaction or statement mode, such as PgBouncer pool_mode = transaction): the "
            "worker's advisory locks and LISTEN need one; connect directly to PostgreSQL or through "
            "PgBouncer with pool_mode = session",
        )
    return Finding("ok", "sessions", "stable (a direct connection, or a pooler in session mode)")


def _options(env: Environment) -> list[Finding]:
    if env.options == "applied":
        return []
    how = "refused" if env.options == "refused" else "dropped"
    return [
        Finding(
            "note",
            "sessions",
            f"startup options are {how} on the way to the server (a pooler): the worker sets its "
            "session settings with SET instead",
        )
    ]


def _timeouts(env: Environment) -> list[Finding]:
    return [
        Finding(
            "note",
            "timeouts",
            f"{name} = {value} {_SOURCES.get(source, f'({source})')}: the worker's own sessions "
            "override it (sessions a job opens with a dsn of its own do not)",
        )
        for name, value, source in env.timeouts
    ]


def _role(env: Environment) -> Finding:
    if env.superuser:
        return Finding(
            "warning",
            "role",
            f"connected as {env.user}, a superuser: jobs' SQL may run with superuser rights; "
            "connect as a login granted syncworker_runner instead",
        )
    return Finding("ok", "role", f"connected as {env.user} (not a superuser)")


def refusal(found: list[Finding]) -> str | None:
    """Why the worker must not start here, as one line (None: it may)."""
    errors = [f.message for f in found if f.level == "error"]
    return "; ".join(errors) if errors else None
