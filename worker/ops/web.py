"""`--http`: a small read-only HTTP server per replica, in the worker's event loop.

/healthz (liveness: the event loop answers), /readyz (database reachable, schema at this
code's revision, listener connected), /health (JSON), /metrics (Prometheus), and a status
page at / fed by /api/status.  Built on aiohttp; bounded: requests in flight, their size and
how long each may take.  With SYNCWORKER_HTTP_TOKEN every path but /healthz needs it (as a
bearer token, or as the password of HTTP basic auth, which browsers ask for); without one
it binds only a loopback address unless --http-insecure.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from worker import db
from worker.daemon.settings import Settings
from worker.db import Pool
from worker.ops import statuspage
from worker.ops.address import is_loopback, parse_address
from worker.ops.metrics import HEALTH_WORDS, Metrics, Snapshot
from worker.services.leadership import Leadership
from worker.services.listener import Listener


class Replica(Protocol):
    """What the server reads of the worker it runs in."""

    url: str
    pool: Pool
    metrics: Metrics
    settings: Settings
    listener: Listener
    leadership: Leadership
    stopping: bool


log = logging.getLogger("syncworker.http")

TOKEN_VARIABLE = "SYNCWORKER_HTTP_TOKEN"
MAX_IN_FLIGHT = 16  # requests handled at once; more get 503 at once
REQUEST_TIMEOUT = 10.0  # seconds a request may take
MAX_REQUEST_BYTES = 16 * 1024  # no endpoint takes a body
KEEPALIVE_TIMEOUT = 15.0
READY_TTL = 2.0  # seconds a readiness check is reused
PUBLIC = frozenset({"/healthz"})
# Health words that make /health say `failing` / `degraded`.
FAILING_WORDS = frozenset({"disabled", "failing"})
DEGRADED_WORDS = frozenset({"stale", "overrunning", "late", "degraded"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HttpError(Exception):
    """The server cannot start: a bad address, a port in use, a token required."""


class HttpServer:
    def __init__(
        self, worker: Replica, address: str, *, insecure: bool = False, token: str | None = None
    ) -> None:
        self.worker = worker
        try:
            self.host, self.port = parse_address(address)
        except ValueError as exc:
            raise HttpError(f"--http: {exc}") from None
        self.token = (os.environ.get(TOKEN_VARIABLE) if token is None else token) or None
        if self.token is None and not is_loopback(self.host) and not insecure:
            raise HttpError(
                f"--http {address}: not a loopback address and {TOKEN_VARIABLE} is not set; set a token, "
                "bind 127.0.0.1, or pass --http-insecure to serve it to anyone who can reach it"
            )
        self._in_flight = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._ready: tuple[float, dict[str, str]] | None = None
        self._ready_lock = asyncio.Lock()
        self._runner: web.AppRunner | None = None

    # -- start and stop ---------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_REQUEST_BYTES, middlewares=[self._guard])
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/api/status", self.api_status)
        app.router.add_get("/", self.page)
        app.router.add_get("/app.js", self.script)
        app.router.add_get("/app.css", self.style)
        return app

    async def bind(self) -> None:
        """Listen now: a port in use or an address that cannot be bound is an HttpError."""
        runner = web.AppRunner(
            self.app(), access_log=None, handle_signals=False, keepalive_timeout=KEEPALIVE_TIMEOUT
        )
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, backlog=64, shutdown_timeout=1.0)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
            raise HttpError(f"--http {self.host}:{self.port}: cannot listen: {reason}") from None
        self._runner = runner
        log.info(
            "http server on %s (token %s)",
            self.url,
            "required" if self.token else "not required",
        )

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    async def run(self) -> None:
        """Serve until cancelled (the worker's shutdown); bind again if the first bind is gone."""
        try:
            if self._runner is None:
                await self.bind()
            await asyncio.Event().wait()
        finally:
            await self.close()

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # -- the guard: limits, auth, counting ---------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path if request.match_info.route.resource is not None else "other"
        response: web.StreamResponse
        if path == "/healthz":  # liveness answers even when the other endpoints are busy
            response = await handler(request)
        elif self._in_flight.locked():
            response = _text("busy\n", 503, headers={"Retry-After": "1"})
        elif path not in PUBLIC and not self._authorized(request):
            # Browsers ask for basic auth (the token is the password); API clients send a bearer token.
            scheme = "Basic" if path in ("/", "/app.js", "/app.css") else "Bearer"
            response = _text(
                "a token is required\n", 401, headers={"WWW-Authenticate": f'{scheme} realm="syncworker"'}
            )
        else:
            async with self._in_flight:
                try:
                    async with asyncio.timeout(REQUEST_TIMEOUT):
                        response = await handler(request)
                except TimeoutError:
                    response = _text("timed out\n", 503)
                except web.HTTPException as exc:
                    response = exc
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        self.worker.metrics.http_requests.labels(path=path, code=str(response.status)).inc()
        return response

    def _authorized(self, request: web.Request) -> bool:
        if self.token is None:
            return True
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        given = ""
        if scheme.lower() == "bearer":
            given = value.strip()
        elif scheme.lower() == "basic":
            try:
                given = base64.b64decode(value.strip(), validate=True).decode().partition(":")[2]
            except (binascii.Error, UnicodeDecodeError):
                return False
        return bool(given) and hmac.compare_digest(given.encode(), self.token.encode())

    # -- endpoints ----------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.StreamResponse:
        return _text("ok\n")

    async def readyz(self, request: web.Request) -> web.StreamResponse:
        checks = await self.readiness()
        ready = all(value.startswith("ok") for value in checks.values())
        body = "".join(f"{name}: {value}\n" for name, value in checks.items())
        return _text(body, 200 if ready else 503)

    async def readiness(self) -> dict[str, str]:
        """database, schema, listener, worker: "ok ..." or what is wrong (cached READY_TTL)."""
        async with self._ready_lock:
            now = time.monotonic()
            if self._ready is not None and now - self._ready[0] < READY_TTL:
                found = dict(self._ready[1])
            else:
                found = await self._check_database()
                self._ready = (now, dict(found))
        w = self.worker
        found["listener"] = "ok: connected" if w.listener.connected.is_set() else "not connected"
        found["worker"] = (
            "stopping" if w.stopping else "starting" if w.listener.worker_id is None else "ok: running"
        )
        return found

    async def _check_database(self) -> dict[str, str]:
        from worker.db.migrate import schema_status_async

        where = db.describe_target(self.worker.url)
        try:
            async with self.worker.pool.connection(timeout=3) as conn, conn.transaction():
                await conn.execute("SET LOCAL statement_timeout = '3s'")
                status = await schema_status_async(conn, where)
        except Exception as exc:
            problem = " ".join(str(exc).split())[:300] or type(exc).__name__
            return {"database": f"unreachable: {problem}", "schema": "unknown"}
        schema = f"ok: revision {status.head}" if status.ok else status.describe(where)
        return {"database": "ok", "schema": schema}

    async def _snapshot(self) -> Snapshot | None:
        return await self.worker.metrics.fleet.refresh(self.worker.pool)

    async def health(self, request: web.Request) -> web.StreamResponse:
        report = summarize(await self._snapshot(), self._replica())
        return web.json_response(report, status=503 if report["status"] == "failing" else 200)

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        await self._snapshot()  # a failed read shows as syncworker_fleet_up 0
        body = generate_latest(self.worker.metrics.registry) + self.worker.metrics.fleet.text
        response = web.Response(body=body)
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def api_status(self, request: web.Request) -> web.StreamResponse:
        snap = await self._snapshot()
        report = summarize(snap, self._replica())
        fleet = self.worker.metrics.fleet
        report["jobs"] = snap.jobs if snap is not None else []
        report["workers"] = snap.workers if snap is not None else []
        report["db_now"] = snap.db_now if snap is not None else None
        report["problem"] = fleet.error if snap is None else None
        return web.json_response(report)

    async def page(self, request: web.Request) -> web.StreamResponse:
        return _static(statuspage.HTML, "text/html")

    async def script(self, request: web.Request) -> web.StreamResponse:
        return _static(statuspage.SCRIPT, "text/javascript")

    async def style(self, request: web.Request) -> web.StreamResponse:
        return _static(statuspage.STYLE, "text/css")

    def _replica(self) -> dict[str, Any]:
        w = self.worker
        return {
            "worker_id": w.listener.worker_id,
            "role": "leader" if w.leadership.is_leader else "standby",
            "mode": w.settings.mode,
            "running": w.metrics.in_progress,
            "concurrency": w.settings.concurrency,
            "listener_connected": w.listener.connected.is_set(),
            "stopping": w.stopping,
        }


def summarize(snap: Snapshot | None, replica: dict[str, Any]) -> dict[str, Any]:
    """The /health report: healthy, degraded or failing, and why."""
    if snap is None:
        return {
            "status": "failing",
            "reasons": ["the database cannot be read"],
            "replica": replica,
        }
    by_health = {word: 0 for word in HEALTH_WORDS}
    runs = ok_runs = 0.0
    duration_weight = duration_sum = 0.0
    last_success: float | None = None
    for job in snap.jobs:
        word = str(job.get("health"))
        by_health[word] = by_health.get(word, 0) + 1
        n = float(job.get("runs_24h") or 0)
        runs += n
        if job.get("success_rate_24h") is not None:
            ok_runs += n * float(job["success_rate_24h"])
        if job.get("mean_duration_ms_24h") is not None:
            duration_weight += n
            duration_sum += n * float(job["mean_duration_ms_24h"])
        if job.get("last_success_epoch") is not None:
            last_success = max(last_success or 0.0, float(job["last_success_epoch"]))
    reasons = [f"{by_health[w]} job(s) {w}" for w in HEALTH_WORDS if w in FAILING_WORDS and by_health[w]]
    worse = [f"{by_health[w]} job(s) {w}" for w in HEALTH_WORDS if w in DEGRADED_WORDS and by_health[w]]
    alive = [w for w in snap.workers if w.get("alive")]
    if not any(w.get("leader") for w in alive):
        worse.append("no live replica is the leader")
    if not replica["listener_connected"]:
        worse.append("this replica's listener is not connected")
    status = "failing" if reasons else "degraded" if worse else "healthy"
    return {
        "status": status,
        "reasons": reasons + worse,
        "success_rate_24h": round(ok_runs / runs, 3) if runs else None,
        "mean_duration_ms_24h": round(duration_sum / duration_weight) if duration_weight else None,
        "runs_24h": int(runs),
        "jobs_total": len(snap.jobs),
        "jobs_by_health": by_health,
        "last_success_at": _iso(last_success),
        "workers_alive": len(alive),
        "replica": replica,
    }


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    from datetime import UTC, datetime

    return datetime.fromtimestamp(epoch, UTC).isoformat()


def _text(body: str, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(text=body, status=status, content_type="text/plain", headers=headers)


def _static(body: str, content_type: str) -> web.Response:
    response = web.Response(text=body, content_type=content_type)
    response.headers["Content-Security-Policy"] = (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    response.headers["Referrer-Policy"] = "no-referrer"
    return response
