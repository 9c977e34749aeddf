"""Where the database is and how to reach it; also hides passwords in DSNs."""

from __future__ import annotations

import os
import re
from typing import Any

# Dead peers (a partitioned network, a host that vanished) are noticed by the
# kernel within ~25 s even on an idle connection that runs no queries.
KEEPALIVE_KWARGS = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
}
CONNECT_TIMEOUT = 10


def database_url() -> str:
    """SYNCWORKER_DATABASE_URL, else DATABASE_URL, else "" (libpq's PG* defaults)."""
    return os.environ.get("SYNCWORKER_DATABASE_URL") or os.environ.get("DATABASE_URL") or ""


def connect_kwargs(application_name: str = "syncworker") -> dict[str, Any]:
    return {
        **KEEPALIVE_KWARGS,
        "connect_timeout": CONNECT_TIMEOUT,
        "application_name": application_name,
    }


def sqlalchemy_url(url: str) -> str:
    """The same DSN in the form SQLAlchemy wants, always over psycopg 3."""
    if not url:
        return "postgresql+psycopg://"
    if "://" not in url:
        # A key=value libpq string: let libpq parse it.
        from urllib.parse import quote

        return "postgresql+psycopg:///?" + "&".join(
            f"{k}={quote(v)}" for k, v in _parse_keyvalue(url).items()
        )
    scheme, rest = url.split("://", 1)
    if scheme in ("postgres", "postgresql", "postgresql+psycopg"):
        return "postgresql+psycopg://" + rest
    raise ValueError(f"not a PostgreSQL URL: {redact_dsn(url)}")


def _parse_keyvalue(dsn: str) -> dict[str, str]:
    from psycopg.conninfo import conninfo_to_dict

    return {k: str(v) for k, v in conninfo_to_dict(dsn).items()}


_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)([^@\s]*)(@)")
_KV_PASSWORD = re.compile(r"(?<![?&\w])(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
_QUERY_PASSWORD = re.compile(r"([?&]password=)([^&\s]+)", re.IGNORECASE)


def redact_dsn(text: str) -> str:
    """Replace any password in a URL or key=value DSN inside `text` with ***."""
    text = _URL_PASSWORD.sub(r"\1***\3", text)
    text = _KV_PASSWORD.sub(r"\1***", text)
    return _QUERY_PASSWORD.sub(r"\1***", text)


def describe_target(url: str) -> str:
    """host:port/dbname of a DSN, for messages; never the password."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        info = conninfo_to_dict(url)
    except Exception:
        return redact_dsn(url)
    host = info.get("host") or os.environ.get("PGHOST") or "local socket"
    port = info.get("port") or os.environ.get("PGPORT") or "5432"
    name = info.get("dbname") or os.environ.get("PGDATABASE") or "(default database)"
    return f"{host}:{port}/{name}"


def connection_problem(exc: BaseException) -> str:
    """The first line of a connection error, passwords masked: enough for a one-line message."""
    text = redact_dsn(str(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__
