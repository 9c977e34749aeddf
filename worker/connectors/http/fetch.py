"""One request of an `http` job: auth, the host's limits, retries with backoff, a size cap.

A request first takes a slot from the host's fleet-wide rate limit and asks the host's
circuit breaker; it is retried with exponential backoff and jitter (or after
`Retry-After`) on connection errors, timeouts, 429 and 5xx, and a truncated body; any
other 4xx fails at once.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import random
import time
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from datetime import UTC
from typing import Any
from urllib.parse import urlsplit

import backoff
import httpx

from worker import __version__, secrets
from worker.connectors.base import RunContext, SyncError
from worker.connectors.http.config import HttpConfig
from worker.connectors.http.limits import Host
from worker.errors import ErrorType

BACKOFF_BASE = 1.0
BACKOFF_CAP = 60.0
MAX_RETRY_AFTER = 600.0
ERROR_BODY_READ = 16 * 1024  # bytes of an error response read to quote from
ERROR_BODY_SHOWN = 500  # characters of it quoted in the error, secrets masked


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


def safe_url(url: str) -> str:
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
        where = safe_url(url)
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
