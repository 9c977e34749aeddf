"""Where the database is and how to reach it; also hides passwords in DSNs."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

# Dead peers (a partitioned network, a host that vanished) are noticed by the
# kernel within ~25 s even on an idle connection that runs no queries.
KEEPALIVE_KWARGS = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
}
CONNECT_TIMEOUT = 10


# Where a database URL may come from, in order; none of them set means libpq's defaults.
URL_VARIABLES = ("SYNCWORKER_DATABASE_URL", "DATABASE_URL")
FLAG = "--database-url"
# The libpq variables that choose a server and database when no URL is given.
LIBPQ_VARIABLES = ("PGHOST", "PGHOSTADDR", "PGPORT", "PGUSER", "PGDATABASE", "PGSERVICE")

_NONE_SET = f"no {FLAG}, {', '.join(URL_VARIABLES[:-1])} or {URL_VARIABLES[-1]} is set"
_DRIVER_SUFFIX = re.compile(r"^(postgres(?:ql)?)\+(?:psycopg2?|asyncpg|pg8000)://", re.IGNORECASE)


def libpq_url(url: str) -> str:
    """`url` as libpq reads it: SQLAlchemy driver suffixes (postgresql+psycopg://) removed.

    Every URL that enters syncworker (flag, environment) goes through here.
    """
    url = url.strip()
    return _DRIVER_SUFFIX.sub(lambda m: m.group(1).lower() + "://", url, count=1)


@dataclass(frozen=True)
class Target:
    """The control database and how it was chosen: a flag, a variable, or libpq's defaults."""

    url: str  # a libpq URL or key=value string; "" for libpq's defaults
    source: str  # "--database-url", "SYNCWORKER_DATABASE_URL", "DATABASE_URL" or "" (libpq defaults)

    @property
    def explicit(self) -> bool:
        """Whether the user named this database (a flag or a URL variable), not libpq's defaults."""
        return bool(self.source)

    def how(self) -> str:
        """How the database was chosen, for messages."""
        if self.source:
            return f"from {self.source}"
        used = [name for name in LIBPQ_VARIABLES if os.environ.get(name)]
        return "libpq defaults" + (f" from {', '.join(used)}" if used else "") + f"; {_NONE_SET}"

    def describe(self) -> str:
        """host:port/dbname (how it was chosen), for messages; never the password."""
        return f"{describe_target(self.url)} ({self.how()})"


def choose_database(flag: str | None = None, env: Mapping[str, str] | None = None) -> Target:
    """--database-url, else SYNCWORKER_DATABASE_URL, else DATABASE_URL, else libpq's PG* defaults."""
    env = os.environ if env is None else env
    if flag is not None:
        return Target(libpq_url(flag), FLAG)
    for name in URL_VARIABLES:
        if env.get(name):
            return Target(libpq_url(env[name]), name)
    return Target("", "")


def database_url() -> str:
    """SYNCWORKER_DATABASE_URL, else DATABASE_URL, else "" (libpq's PG* defaults)."""
    return choose_database().url


def read_json(row: dict[str, Any], *columns: str) -> str | None:
    """Parse `row`'s jsonb `columns`, which queries send as text, in place.

    A value Python cannot read (nested thousands of levels deep) leaves `{}` there and
    returns why, so that the one row fails alone rather than the query that read it.
    """
    problem = None
    for column in columns:
        text = row.get(column)
        if isinstance(text, str):
            try:
                row[column] = json.loads(text)
            except (ValueError, RecursionError) as exc:
                row[column] = {}
                problem = problem or f"{column} could not be read ({type(exc).__name__}: {str(exc)[:200]})"
    return problem


def connect_kwargs(application_name: str = "syncworker") -> dict[str, Any]:
    return {
        **KEEPALIVE_KWARGS,
        "connect_timeout": CONNECT_TIMEOUT,
        "application_name": application_name,
    }


# Server-side settings of the worker's own sessions (PostgreSQL 14 or newer).  The server
# notices a client that vanished within a second even while it runs a statement for it, and
# a partitioned client's idle session within ~25 s, so the locks such a session holds are
# released at once, not when its statement ends or after the kernel's two hours.  They are
# startup options, so `RESET ALL` (run after every job, which may SET what it likes) returns
# to them.  Timeouts a database or role may set by default do not apply to these sessions:
# the worker's bookkeeping must not be cancelled half-way, its idle sessions (the liveness
# lock, LISTEN) must not be closed, and a job is bounded by its own timeout_seconds.
SERVER_SETTINGS = {
    "client_connection_check_interval": "1s",
    "tcp_keepalives_idle": "10",
    "tcp_keepalives_interval": "5",
    "tcp_keepalives_count": "3",
    "statement_timeout": "0",
    "lock_timeout": "0",
    "idle_in_transaction_session_timeout": "0",
    "idle_session_timeout": "0",
}


def session_kwargs(
    url: str, application_name: str, *, by_set: bool = False, **settings: str
) -> dict[str, Any]:
    """connect_kwargs for one of the worker's own sessions on its database, with SERVER_SETTINGS
    and `settings` as startup options (after any `options` the URL or PGOPTIONS already has).

    `by_set`: the server does not get startup options (a pooler refuses or drops them), so
    none are sent; the session runs `settings_statement` once connected instead.
    """
    if by_set:
        return connect_kwargs(application_name)
    try:
        given = str(psycopg.conninfo.conninfo_to_dict(libpq_url(url)).get("options") or "")
    except psycopg.ProgrammingError:
        given = ""
    given = given or os.environ.get("PGOPTIONS", "")
    ours = " ".join(f"-c {name}={value}" for name, value in {**SERVER_SETTINGS, **settings}.items())
    return {**connect_kwargs(application_name), "options": f"{given} {ours}".strip()}


def _settings_for_any_server() -> bytes:
    # (Not client_connection_check_interval: a server on a system without POLLRDHUP refuses
    # any value but 0, and the keepalives find a vanished client there too.)
    portable = {k: v for k, v in SERVER_SETTINGS.items() if k != "client_connection_check_interval"}
    values = ", ".join(f"('{name}', '{value}')" for name, value in portable.items())
    return (
        f"SELECT set_config(s.name, v.value, false) FROM (VALUES {values}) AS v (name, value)"
        " JOIN pg_settings s USING (name)"
    ).encode()


# SERVER_SETTINGS as one statement for a session of a connector's on another server (a source,
# a destination, a source's LISTEN), of any version: a setting the server does not have
# (before PostgreSQL 14) is skipped.  A source's own statement_timeout or
# idle_in_transaction_session_timeout would otherwise cut a long COPY, or the snapshot a run
# holds while it writes, every time: the job's timeout_seconds bounds the run.
SETTINGS_FOR_ANY_SERVER = _settings_for_any_server()


def settings_statement(**settings: str) -> bytes:
    """One statement that gives the session SERVER_SETTINGS and `settings`, for sessions whose
    startup options never reached the server.  Such a session's `RESET ALL` returns to the
    database's and role's defaults, so it runs this again after every `RESET ALL`."""
    pairs = ", ".join(
        f"set_config('{name}', '{value}', false)" for name, value in {**SERVER_SETTINGS, **settings}.items()
    )
    return f"SELECT {pairs}".encode()


def sqlalchemy_url(url: str) -> str:
    """The same DSN in the form SQLAlchemy wants, always over psycopg 3."""
    url = libpq_url(url)
    if not url:
        return "postgresql+psycopg://"
    if "://" not in url:
        # A key=value libpq string: let libpq parse it.
        from urllib.parse import quote

        return "postgresql+psycopg:///?" + "&".join(
            f"{k}={quote(v)}" for k, v in _parse_keyvalue(url).items()
        )
    scheme, rest = url.split("://", 1)
    if scheme in ("postgres", "postgresql"):
        return "postgresql+psycopg://" + rest
    raise ValueError(f"not a PostgreSQL URL: {redact_dsn(url)}")


def _parse_keyvalue(dsn: str) -> dict[str, str]:
    from psycopg.conninfo import conninfo_to_dict

    return {k: str(v) for k, v in conninfo_to_dict(dsn).items()}


_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)([^@\s]*)(@)")
_KV_PASSWORD = re.compile(r"(?<![?&\w])(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
_QUERY_PASSWORD = re.compile(r"([?&]password=)([^&\s]+)", re.IGNORECASE)


_MAY_HOLD_PASSWORD = re.compile(r"@|password", re.IGNORECASE).search


def redact_dsn(text: str) -> str:
    """Replace any password in a URL or key=value DSN inside `text` with ***."""
    if not _MAY_HOLD_PASSWORD(text):  # each pattern below needs one or the other
        return text
    text = _URL_PASSWORD.sub(r"\1***\3", text)
    text = _KV_PASSWORD.sub(r"\1***", text)
    return _QUERY_PASSWORD.sub(r"\1***", text)


def describe_target(url: str) -> str:
    """host:port/dbname of a DSN, for messages; never the password.

    Parts the DSN leaves out are filled in the way libpq fills them: PG* variables, then
    the local socket, port 5432, and a database named after the user.
    """
    from psycopg.conninfo import conninfo_to_dict

    try:
        info = conninfo_to_dict(url)
    except Exception:
        return redact_dsn(url)
    env = os.environ
    host = info.get("host") or info.get("hostaddr") or env.get("PGHOST") or env.get("PGHOSTADDR")
    port = info.get("port") or env.get("PGPORT") or "5432"
    user = info.get("user") or env.get("PGUSER") or _os_user()
    name = info.get("dbname") or env.get("PGDATABASE") or user or "(default database)"
    return f"{host or 'local socket'}:{port}/{name}"


def _os_user() -> str | None:
    import getpass

    try:
        return getpass.getuser()
    except Exception:
        return None


def connection_problem(exc: BaseException) -> str:
    """The first line of a connection error, passwords masked: enough for a one-line message."""
    text = redact_dsn(str(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# -- database errors, as one line a person can act on --------------------------------------------

# SQLSTATE classes and codes that mean "could not reach or log in to the database":
# connection exceptions, authorization, unknown database, the server shutting down.
_CONNECTION_STATES = ("08", "28", "3D", "57P01", "57P02", "57P03", "57P04", "57P05")
_NO_SCHEMA_STATES = ("3F000", "42P01")  # invalid_schema_name, undefined_table
_OUTDATED_STATES = ("42883", "42703")  # undefined_function, undefined_column


def no_schema(target: Target) -> str:
    """The message for a database without the syncworker schema."""
    where = f"no syncworker schema in {target.describe()}"
    if target.explicit:
        return f"{where}: run `syncworker migrate` first"
    return (
        f"{where}: name the database you mean with {FLAG} or {URL_VARIABLES[0]}, then run "
        "`syncworker migrate` (or `syncworker migrate --yes` if this one is right)"
    )


def database_error(exc: psycopg.Error, target: Target) -> str:
    """One line for any database error, chosen by its class; the server's hint is kept.

    Connection failures name the database and the libpq problem; a missing or old schema
    says to migrate; anything the server raised (our SQL functions' errors among them)
    is its message, the database, and `hint: ...` when there is one.
    """
    state = exc.sqlstate or ""
    if state.startswith(_CONNECTION_STATES) or (not state and isinstance(exc, psycopg.OperationalError)):
        return f"cannot connect to {target.describe()}: {connection_problem(exc)}"
    if not state and isinstance(exc, psycopg.ProgrammingError | psycopg.InterfaceError):
        # libpq could not parse the URL, or the connection is unusable
        return f"cannot use the database URL ({target.how()}): {connection_problem(exc)}"
    message = " ".join(redact_dsn(exc.diag.message_primary or connection_problem(exc)).split())
    if state in _NO_SCHEMA_STATES and "syncworker" in message:
        return no_schema(target)
    if state in _OUTDATED_STATES and "syncworker" in message:
        return (
            f"the syncworker schema in {target.describe()} is out of date ({message}): "
            "run `syncworker migrate`"
        )
    hint = " ".join(redact_dsn(exc.diag.message_hint or "").split())
    return f"{message}; database {target.describe()}" + (f"; hint: {hint}" if hint else "")


Pool = AsyncConnectionPool[AsyncConnection[TupleRow]]
