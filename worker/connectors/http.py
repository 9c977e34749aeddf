"""`http`: a paginated JSON API into a table.

One run walks the pages, maps each record to columns and loads each page through
the staging loader.  State (the incremental cursor) is saved only when every page
has landed, in the same transaction as the data when the destination is the
control database: a crash or a failure re-reads from the old cursor, and upserts
make the repeat harmless.

Every request first takes a slot from the host's fleet-wide rate limit and asks the
host's circuit breaker (both kept in Postgres, shared by all replicas); it is
retried with exponential backoff and jitter (or after `Retry-After`) on connection
errors, timeouts, 429 and 5xx, and a truncated body; any other 4xx fails at once.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import random
import re
import time
from collections.abc import AsyncIterator, Callable, Generator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urljoin, urlsplit

import backoff
import httpx
import psycopg
from psycopg import AsyncConnection
from psycopg.rows import TupleRow

from worker import __version__, db, secrets
from worker.connectors.base import Connector, RunContext, RunResult, SyncError
from worker.connectors.config import (
    ConfigError,
    check_secret,
    expect,
    identifier,
    reject_unknown,
    require,
)
from worker.connectors.load import Destination, Loader, destination_session, parse_destination
from worker.db.queries import Q
from worker.errors import ErrorType

PAGINATION_TYPES = ("none", "page", "offset", "cursor", "next_url", "link_header")
DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_MAX_RESPONSE_BYTES = 50 * 1024 * 1024
DEFAULT_MAX_PAGES = 100_000
DEFAULT_BREAKER_FAILURES = 5
DEFAULT_BREAKER_COOLDOWN = 300.0
BACKOFF_BASE = 1.0
BACKOFF_CAP = 60.0
MAX_RETRY_AFTER = 600.0
ERROR_BODY_READ = 16 * 1024  # bytes of an error response read to quote from
ERROR_BODY_SHOWN = 500  # characters of it quoted in the error, secrets masked

Conn = AsyncConnection[TupleRow]


# -- configuration -------------------------------------------------------------------------


@dataclass(frozen=True)
class Pagination:
    type: str = "none"
    param: str = "page"  # page: page number; offset: offset; cursor: cursor parameter
    start: int = 1  # page: first page number
    size_param: str | None = None  # the page-size parameter (offset: "limit")
    size: int | None = None
    cursor_path: str = "next_cursor"  # cursor: where the next cursor is in the body
    next_url_path: str = "next"  # next_url: where the next URL is in the body
    total_path: str | None = None  # stop when this many records were read
    has_more_path: str | None = None  # stop when this is false
    max_pages: int = DEFAULT_MAX_PAGES


@dataclass(frozen=True)
class Incremental:
    cursor_field: str
    param: str
    lookback: float = 0.0
    initial: Any = None


@dataclass(frozen=True)
class HttpConfig:
    url: str
    method: str
    headers: dict[str, Any]
    params: dict[str, Any]
    body: Any
    auth: dict[str, Any] | None
    records_path: str
    mapping: dict[str, str]
    pagination: Pagination
    incremental: Incremental | None
    destination: Destination
    delete_missing: bool
    timeout: float
    max_attempts: int
    max_response_bytes: int
    rate_limit: tuple[int, float] | None  # (requests, per_seconds)
    min_interval: float
    breaker_failures: int
    breaker_cooldown: float

    @property
    def host(self) -> str:
        return urlsplit(self.url).netloc.lower()


def _number(
    config: Mapping[str, Any], key: str, what: str, default: float, prefix: str, minimum: float
) -> float:
    value = expect(config, key, (int, float), what, default, prefix=prefix)
    if value < minimum:
        name = f"{prefix}.{key}" if prefix else key
        raise ConfigError(name, f"expected {what} (at least {minimum:g}), got {value}")
    return float(value)


def _path(config: Mapping[str, Any], key: str, default: str | None, prefix: str = "") -> str | None:
    return expect(config, key, str, 'a dotted path like "meta.next"', default, prefix=prefix)  # type: ignore[no-any-return]


def _value_or_secret(value: Any, field_name: str) -> Any:
    if isinstance(value, Mapping):
        if not secrets.is_reference(value):
            raise ConfigError(
                field_name, 'expected a string, a number or a secret reference like {"env": "NAME"}'
            )
        check_secret({"v": value}, "v", field_name, required=True)
    elif not isinstance(value, str | int | float) or isinstance(value, bool):
        raise ConfigError(field_name, f"expected a string or a number, got {type(value).__name__}")
    return value


def _parse_auth(config: Mapping[str, Any]) -> dict[str, Any] | None:
    auth = expect(config, "auth", dict, 'an object like {"type": "bearer", "token": {"env": "TOKEN"}}')
    if auth is None:
        return None
    kind = auth.get("type")
    if kind == "bearer":
        reject_unknown(auth, {"type", "token"}, "auth")
        check_secret(auth, "token", "auth.token", required=True)
    elif kind == "basic":
        reject_unknown(auth, {"type", "username", "password"}, "auth")
        if "username" not in auth:
            raise ConfigError("auth.username", "is required (a string or a secret reference)")
        _value_or_secret(auth["username"], "auth.username")
        check_secret(auth, "password", "auth.password", required=True)
    elif kind == "api_key":
        reject_unknown(auth, {"type", "name", "value", "in"}, "auth")
        require(auth, "name", str, "the header or query parameter name", prefix="auth")
        check_secret(auth, "value", "auth.value", required=True)
        where = auth.get("in", "header")
        if where not in ("header", "query"):
            raise ConfigError("auth.in", f'expected "header" or "query", got {where!r:.40}')
    else:
        raise ConfigError("auth.type", f"expected bearer, basic or api_key, got {kind!r:.40}")
    return dict(auth)


def _parse_pagination(config: Mapping[str, Any]) -> Pagination:
    spec = expect(config, "pagination", dict, 'an object like {"type": "page"}', {})
    kind = spec.get("type", "none")
    if kind not in PAGINATION_TYPES:
        raise ConfigError(
            "pagination.type", f"expected one of {', '.join(PAGINATION_TYPES)}, got {kind!r:.40}"
        )
    # size / size_param: the page size, sent with the first request (and every request when
    # the URL is ours, not one the API handed back)
    common = {"type", "total_path", "has_more_path", "max_pages", "size_param", "size"}
    allowed = {
        "none": set(),
        "page": {"param", "start"},
        "offset": {"param"},
        "cursor": {"param", "cursor_path"},
        "next_url": {"next_url_path"},
        "link_header": set(),
    }[kind]
    reject_unknown(spec, common | allowed, "pagination")
    p = "pagination"
    default_param = {"page": "page", "offset": "offset", "cursor": "cursor"}.get(kind, "page")
    size = expect(spec, "size", int, "a positive number of records per page", None, prefix=p)
    if size is not None and size <= 0:
        raise ConfigError("pagination.size", f"expected a positive number of records per page, got {size}")
    if kind == "offset" and size is None:
        raise ConfigError("pagination.size", "is required for offset pagination (the page size)")
    size_param = expect(
        spec, "size_param", str, "a query parameter name", "limit" if kind == "offset" else None, prefix=p
    )
    if size is not None and size_param is None:
        raise ConfigError("pagination.size_param", "is required with pagination.size (the size parameter)")
    max_pages = expect(spec, "max_pages", int, "a positive number", DEFAULT_MAX_PAGES, prefix=p)
    if max_pages <= 0:
        raise ConfigError("pagination.max_pages", f"expected a positive number, got {max_pages}")
    return Pagination(
        type=kind,
        param=expect(spec, "param", str, "a query parameter name", default_param, prefix=p),
        start=expect(spec, "start", int, "the first page's number", 1, prefix=p),
        size_param=size_param,
        size=size,
        cursor_path=_path(spec, "cursor_path", "next_cursor", p) or "next_cursor",
        next_url_path=_path(spec, "next_url_path", "next", p) or "next",
        total_path=_path(spec, "total_path", None, p),
        has_more_path=_path(spec, "has_more_path", None, p),
        max_pages=max_pages,
    )


def _parse_incremental(config: Mapping[str, Any]) -> Incremental | None:
    spec = expect(
        config, "incremental", dict, 'an object like {"cursor_field": "updated_at", "param": "since"}'
    )
    if spec is None:
        return None
    reject_unknown(spec, {"cursor_field", "param", "lookback", "initial"}, "incremental")
    cursor_field = require(
        spec, "cursor_field", str, "the record field that orders changes", prefix="incremental"
    )
    param = require(spec, "param", str, "the query parameter that receives the cursor", prefix="incremental")
    lookback = _number(spec, "lookback", "seconds", 0, "incremental", 0)
    initial = spec.get("initial")
    if initial is not None:
        _value_or_secret(initial, "incremental.initial")
    return Incremental(cursor_field, param, lookback, initial)


SETTINGS = {
    "url",
    "method",
    "headers",
    "params",
    "body",
    "auth",
    "records_path",
    "mapping",
    "pagination",
    "incremental",
    "destination",
    "delete_missing",
    "request_timeout_seconds",
    "max_attempts",
    "max_response_bytes",
    "rate_limit",
    "min_interval_seconds",
    "circuit_breaker",
}


def _parse_url(config: Mapping[str, Any]) -> str:
    url: str = require(config, "url", str, "the API's URL, http:// or https://")
    try:
        parts = urlsplit(url)
        httpx.URL(url)
    except (ValueError, httpx.InvalidURL) as exc:
        raise ConfigError("url", f"not a valid URL ({exc}): {url!r:.80}") from None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError("url", f"expected an http:// or https:// URL, got {url!r:.80}")
    return url


def _parse_request(config: Mapping[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any], Any]:
    """method, headers, params and body (values may be secret references)."""
    method = str(expect(config, "method", str, "GET or POST", "GET")).upper()
    if method not in ("GET", "POST"):
        raise ConfigError("method", f"expected GET or POST, got {method!r:.20}")
    headers = expect(config, "headers", dict, "an object of header name to value", {})
    for name, value in headers.items():
        _value_or_secret(value, f"headers.{name}")
    params = expect(config, "params", dict, "an object of query parameter to value", {})
    for name, value in params.items():
        _value_or_secret(value, f"params.{name}")
    body = config.get("body")
    if body is not None and method != "POST":
        raise ConfigError("body", "is only sent with POST")
    return method, dict(headers), dict(params), body


def _parse_mapping(config: Mapping[str, Any], destination: Destination) -> dict[str, str]:
    """column -> record path; by default each destination column from the field of its name."""
    raw = expect(config, "mapping", dict, "an object of column name to record path", None)
    if raw is None:
        if not destination.columns:
            raise ConfigError(
                "mapping",
                "is required (an object of column name to record path) unless destination.columns is set",
            )
        raw = {c: c for c in destination.columns}
    mapping: dict[str, str] = {}
    for column, path in raw.items():
        identifier(column, "mapping")
        if not isinstance(path, str) or not path:
            raise ConfigError(f"mapping.{column}", 'expected a record path like "id" or "user.email"')
        mapping[column] = path
    missing = [k for k in destination.key if k not in mapping]
    if missing:
        raise ConfigError("mapping", f"must map the key column(s) {', '.join(missing)}")
    return mapping


def _parse_rate_limit(config: Mapping[str, Any]) -> tuple[int, float] | None:
    rate = expect(config, "rate_limit", dict, 'an object like {"requests": 1000, "per_seconds": 3600}')
    if rate is None:
        return None
    reject_unknown(rate, {"requests", "per_seconds"}, "rate_limit")
    requests = require(rate, "requests", int, "a positive number of requests", prefix="rate_limit")
    require(rate, "per_seconds", (int, float), "the window in seconds", prefix="rate_limit")
    per = _number(rate, "per_seconds", "seconds", 1, "rate_limit", 0.001)
    if requests <= 0:
        raise ConfigError("rate_limit.requests", f"expected a positive number of requests, got {requests}")
    return requests, per


def _parse_breaker(config: Mapping[str, Any]) -> tuple[int, float]:
    """The circuit breaker's failures in a row and cooldown."""
    breaker = expect(
        config, "circuit_breaker", dict, 'an object like {"failures": 5, "cooldown_seconds": 300}', {}
    )
    reject_unknown(breaker, {"failures", "cooldown_seconds"}, "circuit_breaker")
    failures = _positive_int(
        breaker, "failures", "a positive number", DEFAULT_BREAKER_FAILURES, "circuit_breaker"
    )
    cooldown = _number(breaker, "cooldown_seconds", "seconds", DEFAULT_BREAKER_COOLDOWN, "circuit_breaker", 0)
    return failures, cooldown


def _positive_int(config: Mapping[str, Any], key: str, what: str, default: int, prefix: str = "") -> int:
    value: int = expect(config, key, int, what, default, prefix=prefix)
    if value <= 0:
        raise ConfigError(f"{prefix}.{key}" if prefix else key, f"expected {what}, got {value}")
    return value


class HttpConnector(Connector):
    kind = "http"

    def validate(self, config: Mapping[str, Any]) -> HttpConfig:
        reject_unknown(config, SETTINGS)
        url = _parse_url(config)
        method, headers, params, body = _parse_request(config)
        destination = parse_destination(config)
        incremental = _parse_incremental(config)
        delete_missing = expect(config, "delete_missing", bool, "true or false", False)
        if delete_missing and incremental is not None:
            raise ConfigError("delete_missing", "needs a full read every run; it cannot go with incremental")
        breaker_failures, breaker_cooldown = _parse_breaker(config)
        return HttpConfig(
            url=url,
            method=method,
            headers=headers,
            params=params,
            body=body,
            auth=_parse_auth(config),
            records_path=expect(config, "records_path", str, 'a dotted path like "data.items"', ""),
            mapping=_parse_mapping(config, destination),
            pagination=_parse_pagination(config),
            incremental=incremental,
            destination=destination,
            delete_missing=delete_missing,
            timeout=_number(config, "request_timeout_seconds", "seconds", DEFAULT_TIMEOUT, "", 0.001),
            max_attempts=_positive_int(
                config, "max_attempts", "a positive number of attempts", DEFAULT_MAX_ATTEMPTS
            ),
            max_response_bytes=_positive_int(
                config, "max_response_bytes", "a positive size in bytes", DEFAULT_MAX_RESPONSE_BYTES
            ),
            rate_limit=_parse_rate_limit(config),
            min_interval=_number(config, "min_interval_seconds", "seconds", 0, "", 0),
            breaker_failures=breaker_failures,
            breaker_cooldown=breaker_cooldown,
        )

    async def run(self, ctx: RunContext) -> RunResult:
        cfg: HttpConfig = ctx.config
        async with (
            Host(ctx.conn, cfg) as host,
            Fetcher(cfg, host, ctx) as fetcher,
            destination_session(ctx, cfg.destination) as dest,
        ):
            return await Sync(ctx, cfg, fetcher, dest).run()


# -- JSON paths and cursor values ----------------------------------------------------------------

_MISSING = object()


def dig(data: Any, path: str | None) -> Any:
    """The value at a dotted path ("data.items", "links.0.href"); _MISSING if absent."""
    if not path:
        return data
    for part in path.split("."):
        if isinstance(data, Mapping) and part in data:
            data = data[part]
        elif isinstance(data, list) and part.isdigit() and int(part) < len(data):
            data = data[int(part)]
        else:
            return _MISSING
    return data


def column_value(value: Any) -> Any:
    """A JSON value as the loader takes it: objects and arrays as JSON text."""
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    return value


def _as_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not re.match(r"^\d{4}-\d{2}-\d{2}", value):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def cursor_key(value: Any) -> tuple[int, Any]:
    """A sort key that orders times as times and numbers as numbers."""
    if isinstance(value, bool):
        return (2, str(value))
    if isinstance(value, int | float):
        return (0, value)
    moment = _as_time(value)
    if moment is not None:
        return (1, moment)
    return (2, str(value))


def with_lookback(value: Any, seconds: float) -> Any:
    """The cursor value to send: `seconds` earlier for times and numbers."""
    if not seconds:
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value - seconds if isinstance(value, float) else value - int(seconds)
    moment = _as_time(value)
    if moment is not None:
        earlier = moment - timedelta(seconds=seconds)
        return earlier.isoformat().replace("+00:00", "Z") if str(value).endswith("Z") else earlier.isoformat()
    return value


# -- the host: rate limit and circuit breaker, shared through Postgres ---------------------------


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


# -- requests ----------------------------------------------------------------------------------


class Retryable(SyncError):
    """A failure worth another attempt; `retry_after` is the server's wish, if any."""

    def __init__(self, message: str, *, error_type: str, retry_after: float | None = None) -> None:
        super().__init__(message, error_type=error_type)
        self.retry_after = retry_after


def retry_after_seconds(header: str | None, now: float | None = None) -> float | None:
    """`Retry-After` as seconds: a number, or an HTTP date."""
    if not header:
        return None
    header = header.strip()
    if header.isdigit():
        return float(header)
    try:
        moment = email.utils.parsedate_to_datetime(header)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, moment.timestamp() - (time.time() if now is None else now))


def retry_waits(
    base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP, rand: Callable[[], float] = random.random
) -> Generator[float | None, Any, None]:
    """Waits between attempts, as a `backoff` wait generator that is sent each exception.

    Exponential from `base` with full jitter, capped; a server's `Retry-After` wins
    (capped at MAX_RETRY_AFTER), unjittered, so we never come back early.
    """
    exc = yield None
    attempt = 0
    while True:
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            delay = min(float(retry_after), MAX_RETRY_AFTER)
        else:
            delay = rand() * min(cap, base * 2**attempt)
        attempt += 1
        exc = yield delay


def _safe_url(url: str) -> str:
    """The URL without its query string (which may hold an API key)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


@dataclass
class Page:
    url: str
    body: Any
    headers: httpx.Headers
    digest: str


class Fetcher:
    """GET/POST with auth, limits, retries and a size cap; returns parsed JSON pages."""

    def __init__(self, cfg: HttpConfig, host: Host, ctx: RunContext) -> None:
        self.cfg = cfg
        self.host = host
        self.ctx = ctx
        self.requests = 0
        self.client: httpx.AsyncClient | None = None
        self._get = backoff.on_exception(
            retry_waits,  # type: ignore[arg-type]  # a generator that is sent each exception
            Retryable,
            max_tries=cfg.max_attempts,
            jitter=None,
            on_backoff=self._log_retry,
            raise_on_giveup=True,
            logger=None,  # _log_retry says it once, in our words
        )(self._attempt)

    async def __aenter__(self) -> Fetcher:
        headers = {"User-Agent": f"syncworker/{__version__}", "Accept": "application/json"}
        headers.update({k: str(self._resolve(v, f"headers.{k}")) for k, v in self.cfg.headers.items()})
        auth: httpx.Auth | None = None
        self.auth_params: dict[str, str] = {}
        spec = self.cfg.auth or {}
        if spec.get("type") == "bearer":
            headers["Authorization"] = "Bearer " + secrets.resolve(spec["token"], "auth.token")
        elif spec.get("type") == "basic":
            username = str(self._resolve(spec["username"], "auth.username"))
            password = secrets.resolve(spec["password"], "auth.password")
            secrets.remember_credentials(username, password)  # the header carries base64(user:password)
            auth = httpx.BasicAuth(username, password)
        elif spec.get("type") == "api_key":
            value = secrets.resolve(spec["value"], "auth.value")
            if spec.get("in", "header") == "header":
                headers[spec["name"]] = value
            else:
                self.auth_params[spec["name"]] = value
        self.client = httpx.AsyncClient(
            headers=headers, auth=auth, timeout=self.cfg.timeout, follow_redirects=True
        )
        self.base_params = {k: self._resolve(v, f"params.{k}") for k, v in self.cfg.params.items()}
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.client is not None:
            await self.client.aclose()

    @staticmethod
    def _resolve(value: Any, field_name: str) -> Any:
        return secrets.resolve(value, field_name) if isinstance(value, Mapping) else value

    async def get(self, url: str, params: Mapping[str, Any]) -> Page:
        try:
            return await self._get(url, params)
        except Retryable as exc:
            raise SyncError(
                f"{exc} (gave up after {self.cfg.max_attempts} attempts)", error_type=exc.error_type
            ) from None

    def _log_retry(self, details: Any) -> None:
        exc = details.get("exception")
        self.ctx.log.warning(
            "request failed (%s), attempt %s of %s; retrying in %.1fs",
            exc,
            details["tries"],
            self.cfg.max_attempts,
            details["wait"],
        )

    async def _attempt(self, url: str, params: Mapping[str, Any]) -> Page:
        assert self.client is not None
        await self.host.allow()
        await self.host.take_slot()
        query = {**params, **self.auth_params}
        where = _safe_url(url)
        self.requests += 1
        try:
            async with self.client.stream(
                self.cfg.method,
                url,
                params=query or None,
                json=self.cfg.body if self.cfg.method == "POST" else None,
            ) as response:
                if response.status_code == 429 or response.status_code >= 500:
                    await self.host.record(response.status_code == 429, f"HTTP {response.status_code}")
                    raise Retryable(
                        f"{where}: HTTP {response.status_code}",
                        error_type=ErrorType.UPSTREAM_HTTP,
                        retry_after=retry_after_seconds(response.headers.get("Retry-After")),
                    )
                if response.status_code >= 400:
                    await self.host.record(True)
                    raise SyncError(
                        f"{where}: HTTP {response.status_code}: {await _error_body(response)}".strip(),
                        error_type=ErrorType.UPSTREAM_HTTP,
                    )
                raw = await self._read_capped(response, where)
        except (httpx.TimeoutException, httpx.TransportError) as exc:
            kind = "timeout" if isinstance(exc, httpx.TimeoutException) else "connection"
            what = "timed out" if kind == "timeout" else f"{type(exc).__name__}: {exc}"
            message = secrets.redact(f"{where}: {what}")
            await self.host.record(False, message)
            raise Retryable(message, error_type=kind) from None
        try:
            body = json.loads(raw)
        except ValueError as exc:
            await self.host.record(False, "malformed JSON")
            raise Retryable(
                f"{where}: the response is not valid JSON ({exc})", error_type=ErrorType.UPSTREAM_INVALID
            ) from None
        await self.host.record(True)
        self.ctx.log.debug("fetched %s (%s bytes)", where, len(raw))
        return Page(str(response.url), body, response.headers, hashlib.sha256(raw).hexdigest())

    async def _read_capped(self, response: httpx.Response, where: str) -> bytes:
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > self.cfg.max_response_bytes:
            raise SyncError(
                f"{where}: response of {declared} bytes is over "
                f"max_response_bytes ({self.cfg.max_response_bytes})",
                error_type=ErrorType.RESPONSE_TOO_LARGE,
            )
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > self.cfg.max_response_bytes:
                raise SyncError(
                    f"{where}: response over max_response_bytes ({self.cfg.max_response_bytes})",
                    error_type=ErrorType.RESPONSE_TOO_LARGE,
                )
            chunks.append(chunk)
        return b"".join(chunks)


async def _error_body(response: httpx.Response) -> str:
    """The start of an error response, on one line, secrets masked: it may echo the request."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size > ERROR_BODY_READ:
            break
    text = b"".join(chunks)[:ERROR_BODY_READ].decode(errors="replace")
    return secrets.redact_excerpt(text, ERROR_BODY_SHOWN, cut=size > ERROR_BODY_READ)


# -- one run -----------------------------------------------------------------------------------


@dataclass
class Sync:
    ctx: RunContext
    cfg: HttpConfig
    fetcher: Fetcher
    conn: Conn
    read: int = 0
    cursor: Any = None
    seen_requests: set[str] = field(default_factory=set)
    seen_pages: set[str] = field(default_factory=set)

    async def run(self) -> RunResult:
        cfg = self.cfg
        columns = list(cfg.mapping)
        loader = Loader(self.conn, cfg.destination, columns, self.ctx, track_seen=cfg.delete_missing)
        await loader.prepare()
        start_cursor = None
        if cfg.incremental is not None:
            start_cursor = self.ctx.state.get("cursor", cfg.incremental.initial)
            if isinstance(start_cursor, Mapping):
                start_cursor = secrets.resolve(start_cursor, "incremental.initial")
            self.cursor = start_cursor
        try:
            async for records in self.pages(start_cursor):
                rows = [row for row in map(self.to_row, records) if row is not None]
                self.read += len(records)
                if rows:
                    await loader.write_batch(rows)
            if cfg.delete_missing:
                await loader.delete_unseen()  # every page landed: what is missing is gone
        finally:
            await loader.close()
        state = dict(self.ctx.state)
        if cfg.incremental is not None and self.cursor is not None:
            state["cursor"] = self.cursor
        self.ctx.log.info(
            "%s records from %s requests: %s inserted, %s updated, %s deleted",
            self.read,
            self.fetcher.requests,
            loader.counts.inserted,
            loader.counts.updated,
            loader.counts.deleted,
        )
        return loader.counts.result(self.ctx, self.read, state)

    def to_row(self, record: Any) -> tuple[Any, ...] | None:
        """A record as a row of the mapped columns; None (and a record error) if it cannot be."""
        if not isinstance(record, Mapping):
            self.ctx.record_error(None, f"a record is not a JSON object: {json.dumps(record)[:200]}")
            return None
        key_values = [dig(record, self.cfg.mapping[k]) for k in self.cfg.destination.key]
        if any(v is _MISSING or v is None for v in key_values):
            shown = ",".join("?" if v is _MISSING else str(v) for v in key_values)
            paths = ", ".join(self.cfg.mapping[k] for k in self.cfg.destination.key)
            self.ctx.record_error(
                shown,
                f"record has no key value ({paths})",
                context={"record": _preview(record)},
            )
            return None
        if self.cfg.incremental is not None:
            value = dig(record, self.cfg.incremental.cursor_field)
            present = value is not _MISSING and value is not None
            if present and (self.cursor is None or cursor_key(value) > cursor_key(self.cursor)):
                self.cursor = value
        row = []
        for path in self.cfg.mapping.values():
            value = dig(record, path)
            row.append(None if value is _MISSING else column_value(value))
        return tuple(row)

    async def pages(self, start_cursor: Any) -> AsyncIterator[list[Any]]:
        """Every page's records, following the configured pagination until a stop condition."""
        p = self.cfg.pagination
        params: dict[str, Any] = dict(self.fetcher.base_params)
        if self.cfg.incremental is not None and start_cursor is not None:
            params[self.cfg.incremental.param] = with_lookback(start_cursor, self.cfg.incremental.lookback)
        if p.size is not None and p.size_param:
            params[p.size_param] = p.size
        url: str | None = self.cfg.url
        number = p.start if p.type == "page" else 0
        read = 0
        for index in range(p.max_pages + 1):
            if index == p.max_pages:
                raise SyncError(
                    f"stopped after pagination.max_pages ({p.max_pages}) pages",
                    error_type=ErrorType.PAGINATION_LOOP,
                )
            assert url is not None
            if p.type in ("page", "offset"):
                params[p.param] = number if p.type == "page" else read
            page, records = await self._fetch(url, params)
            read += len(records)
            yield records
            if not records or p.type == "none" or self._read_all(page, read):
                return
            number += 1
            url, params = self._next(page, url, params)
            if url is None:
                return

    async def _fetch(self, url: str, params: dict[str, Any]) -> tuple[Page, list[Any]]:
        """One page and its records; a page asked for or answered twice is a pagination loop."""
        request_id = url + "?" + json.dumps(params, sort_keys=True, default=str)
        if request_id in self.seen_requests:
            raise SyncError(
                f"{_safe_url(url)}: the same page was requested twice", error_type=ErrorType.PAGINATION_LOOP
            )
        self.seen_requests.add(request_id)
        page = await self.fetcher.get(url, params)
        records = dig(page.body, self.cfg.records_path)
        if records is _MISSING or not isinstance(records, list):
            raise SyncError(
                f"{_safe_url(url)}: no list of records at records_path {self.cfg.records_path!r}",
                error_type=ErrorType.UPSTREAM_INVALID,
            )
        if records and page.digest in self.seen_pages:
            raise SyncError(
                f"{_safe_url(url)}: the same page came back twice", error_type=ErrorType.PAGINATION_LOOP
            )
        self.seen_pages.add(page.digest)
        return page, records

    def _read_all(self, page: Page, read: int) -> bool:
        """Does the page say there is no more (has_more_path false, total_path reached)?"""
        p = self.cfg.pagination
        if p.has_more_path is not None and not dig(page.body, p.has_more_path):
            return True
        total = dig(page.body, p.total_path) if p.total_path is not None else None
        return isinstance(total, int | float) and read >= total

    def _next(self, page: Page, url: str, params: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        """Where the next page is (the URL, or None when there is none) and its parameters."""
        p = self.cfg.pagination
        if p.type == "cursor":
            cursor = dig(page.body, p.cursor_path)
            if cursor is _MISSING or cursor in (None, ""):
                return None, params
            return url, {**params, p.param: cursor}
        if p.type in ("next_url", "link_header"):
            nxt = dig(page.body, p.next_url_path) if p.type == "next_url" else _link_next(page.headers)
            if nxt is _MISSING or not nxt:
                return None, params
            url = urljoin(page.url, str(nxt))
            # the next URL carries its own query: keep only what must go with every request
            return url, dict(self.fetcher.base_params) if urlsplit(url).query == "" else {}
        return url, params


def _link_next(headers: httpx.Headers) -> str | None:
    for part in headers.get_list("Link", split_commas=True):
        match = re.match(r"\s*<([^>]*)>\s*;(.*)", part)
        if match and re.search(r'rel\s*=\s*"?([^";]*\s)?next(\s[^";]*)?"?', match.group(2)):
            return match.group(1)
    return None


def _preview(record: Mapping[str, Any]) -> str:
    text = json.dumps(record, default=str)
    return text if len(text) <= 300 else text[:300] + "…"


__all__ = ["HttpConnector", "cursor_key", "dig", "retry_after_seconds", "retry_waits", "with_lookback"]
