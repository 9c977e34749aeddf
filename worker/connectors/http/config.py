"""The `http` job's config: parsed and checked once, before any run (`validate`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from worker import secrets
from worker.connectors.config import (
    ConfigError,
    check_secret,
    expect,
    identifier,
    reject_unknown,
    require,
)
from worker.connectors.load import Destination, parse_destination

PAGINATION_TYPES = ("none", "page", "offset", "cursor", "next_url", "link_header")
DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_MAX_RESPONSE_BYTES = 50 * 1024 * 1024
DEFAULT_MAX_PAGES = 100_000
DEFAULT_BREAKER_FAILURES = 5
DEFAULT_BREAKER_COOLDOWN = 300.0


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


def parse_config(config: Mapping[str, Any]) -> HttpConfig:
    """`config` checked and parsed (the connector's `validate`)."""
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
