"""Alert delivery by the leader: webhook JSON, Slack-compatible webhooks, e-mail.

Incidents are rows of `syncworker.alerts`, opened and closed by one statement
(`alerts_scan`) from what the tables say: a job disabled, failing N times in a row, stale or
overrunning, and rescued runs.  Each incident gets one message when it opens and one when it
closes ("recovered"), whichever replica leads by then.  Delivery is retried with backoff per
channel, rate-limited per channel, logged and counted when it fails, and runs in a task of
its own: it never holds up a run.
"""

from __future__ import annotations

import asyncio
import logging
import os
import smtplib
import socket
import ssl
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import parseaddr
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import httpx
import psycopg
from psycopg import AsyncConnection
from psycopg.rows import TupleRow, dict_row
from psycopg_pool import AsyncConnectionPool

from worker.db.queries import Q
from worker.ops.metrics import Metrics

log = logging.getLogger("syncworker.alerts")

FIRST_RETRY = 5.0
MAX_RETRY = 600.0
GIVE_UP_AFTER = 86400.0  # seconds after which an undelivered message is given up
SEND_TIMEOUT = 10.0
SMTP_TIMEOUT = 20.0


class AlertConfigError(ValueError):
    """A SYNCWORKER_ALERT_* variable cannot be used."""


@dataclass(frozen=True)
class Smtp:
    host: str
    port: int
    user: str | None = None
    password: str | None = None
    tls: str = "starttls"  # starttls (when offered), require (STARTTLS or fail), ssl (TLS at once)


@dataclass(frozen=True)
class AlertConfig:
    webhook: str | None = None
    slack: str | None = None
    email_to: tuple[str, ...] = ()
    email_from: str = ""
    smtp: Smtp | None = None
    failures: int = 2
    rate: int = 30
    interval: float = 15.0
    no_leader: float = 60.0  # seconds without a leader before any replica raises no_leader

    @property
    def channels(self) -> list[str]:
        found = []
        if self.webhook:
            found.append("webhook")
        if self.slack:
            found.append("slack")
        if self.email_to:
            found.append("email")
        return found

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> AlertConfig:
        env = os.environ if env is None else env

        def get(name: str) -> str:
            return env.get("SYNCWORKER_ALERT_" + name, "").strip()

        email_to = tuple(a.strip() for a in get("EMAIL_TO").split(",") if a.strip())
        for address in email_to:
            _address("SYNCWORKER_ALERT_EMAIL_TO", address)
        sender = get("EMAIL_FROM") or f"syncworker@{socket.gethostname()}"
        _address("SYNCWORKER_ALERT_EMAIL_FROM", sender)
        smtp = _smtp(get("SMTP") or "smtp://localhost:25") if email_to else None
        return cls(
            webhook=_http_url("SYNCWORKER_ALERT_WEBHOOK", get("WEBHOOK")),
            slack=_http_url("SYNCWORKER_ALERT_SLACK", get("SLACK")),
            email_to=email_to,
            email_from=sender,
            smtp=smtp,
            failures=_positive("SYNCWORKER_ALERT_FAILURES", get("FAILURES"), 2),
            rate=_positive("SYNCWORKER_ALERT_RATE", get("RATE"), 30),
            interval=float(_positive("SYNCWORKER_ALERT_INTERVAL", get("INTERVAL"), 15)),
            no_leader=float(_positive("SYNCWORKER_ALERT_NO_LEADER", get("NO_LEADER"), 60)),
        )


def _http_url(name: str, value: str) -> str | None:
    if not value:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        # Never echo the value: webhook URLs carry their secret in the path.
        raise AlertConfigError(f"{name}: expected an http:// or https:// URL with a host")
    return value


def _address(name: str, value: str) -> None:
    _, address = parseaddr(value)
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain or any(c.isspace() for c in address):
        raise AlertConfigError(f"{name}: not an e-mail address: {value!r}")


def _positive(name: str, value: str, default: int) -> int:
    if not value:
        return default
    if not value.isdigit() or int(value) <= 0:
        raise AlertConfigError(f"{name}: expected a positive whole number, got {value!r}")
    return int(value)


def _smtp(value: str) -> Smtp:
    parts = urlsplit(value)
    if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
        raise AlertConfigError(
            "SYNCWORKER_ALERT_SMTP: expected smtp://[user:password@]host[:port] or smtps://..."
        )
    try:
        port = parts.port or (465 if parts.scheme == "smtps" else 25)
    except ValueError:
        raise AlertConfigError("SYNCWORKER_ALERT_SMTP: the port is not a number from 1 to 65535") from None
    starttls = parse_qs(parts.query).get("starttls", [""])[-1]
    if starttls not in ("", "require"):
        raise AlertConfigError("SYNCWORKER_ALERT_SMTP: starttls may only be `require`")
    tls = "ssl" if parts.scheme == "smtps" else "require" if starttls else "starttls"
    return Smtp(
        parts.hostname,
        port,
        unquote(parts.username) if parts.username else None,
        unquote(parts.password) if parts.password else None,
        tls,
    )


# -- messages -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    alert_id: int
    event: str  # open | recovered
    kind: str
    integration: str | None  # None: an incident of the whole fleet (no_leader)
    integration_id: int | None
    run_id: int | None
    summary: str
    opened_at: datetime
    closed_at: datetime | None

    @property
    def subject(self) -> str:
        if self.integration is None:
            return "[syncworker] " + (
                "a replica leads again" if self.event == "recovered" else "no replica leads"
            )
        if self.event == "recovered":
            return f"[syncworker] recovered: {self.integration} is no longer {self.kind}"
        if self.kind == "rescued":
            return f"[syncworker] rescued run of {self.integration}"
        return f"[syncworker] {self.integration} is {self.kind}"

    @property
    def text(self) -> str:
        if self.event == "recovered":
            lasted = _duration(((self.closed_at or self.opened_at) - self.opened_at).total_seconds())
            if self.integration is None:
                return f"RECOVERED: a replica leads again ({lasted} without a leader)"
            return (
                f"RECOVERED: {self.integration} is no longer {self.kind} "
                f"(since {self.opened_at.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC, {lasted})"
            )
        return f"ALERT: {self.summary}"

    def payload(self) -> dict[str, Any]:
        return {
            "source": "syncworker",
            "event": self.event,
            "kind": self.kind,
            "integration": self.integration,
            "integration_id": self.integration_id,
            "run_id": self.run_id,
            "summary": self.summary,
            "text": self.text,
            "opened_at": self.opened_at.isoformat(),
            "closed_at": self.closed_at.isoformat() if self.closed_at else None,
            "alert_id": self.alert_id,
        }


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h {seconds % 3600 // 60}m"
    if seconds >= 60:
        return f"{seconds // 60}m {seconds % 60}s"
    return f"{seconds}s"


class DeliveryError(Exception):
    """A channel did not take a message (the text never carries the channel's URL)."""


class Channels:
    """Sends one message to one channel."""

    def __init__(self, config: AlertConfig) -> None:
        self.config = config

    async def send(self, channel: str, message: Message) -> None:
        if channel == "webhook":
            assert self.config.webhook is not None
            await self._post(self.config.webhook, message.payload())
        elif channel == "slack":
            assert self.config.slack is not None
            await self._post(self.config.slack, {"text": message.text})
        elif channel == "email":
            await asyncio.to_thread(self._mail, message)
        else:  # pragma: no cover - the channels come from the config
            raise DeliveryError(f"unknown channel {channel}")

    async def _post(self, url: str, body: dict[str, Any]) -> None:
        try:
            async with httpx.AsyncClient(timeout=SEND_TIMEOUT, follow_redirects=False) as client:
                response = await client.post(url, json=body)
        except httpx.HTTPError as exc:
            raise DeliveryError(f"{type(exc).__name__}: no answer from {urlsplit(url).hostname}") from None
        if response.status_code >= 300:
            raise DeliveryError(f"HTTP {response.status_code} from {urlsplit(url).hostname}")

    def _mail(self, message: Message) -> None:
        smtp = self.config.smtp
        assert smtp is not None
        mail = EmailMessage()
        mail["Subject"] = message.subject
        mail["From"] = self.config.email_from
        mail["To"] = ", ".join(self.config.email_to)
        mail.set_content(
            f"{message.text}\n\nintegration: {message.integration}\nincident: {message.kind}\n"
            f"opened: {message.opened_at.isoformat()}\n"
            + (f"closed: {message.closed_at.isoformat()}\n" if message.closed_at else "")
            + (f"run: {message.run_id}\n" if message.run_id else "")
            + "\nsyncworker status / syncworker errors show more.\n"
        )
        try:
            client: smtplib.SMTP
            if smtp.tls == "ssl":
                client = smtplib.SMTP_SSL(
                    smtp.host, smtp.port, timeout=SMTP_TIMEOUT, context=ssl.create_default_context()
                )
            else:
                client = smtplib.SMTP(smtp.host, smtp.port, timeout=SMTP_TIMEOUT)
            with client:
                client.ehlo()
                if smtp.tls != "ssl" and (smtp.tls == "require" or client.has_extn("starttls")):
                    client.starttls(context=ssl.create_default_context())
                    client.ehlo()
                if smtp.user:
                    client.login(smtp.user, smtp.password or "")
                client.send_message(mail)
        except (OSError, smtplib.SMTPException) as exc:
            raise DeliveryError(f"SMTP {smtp.host}:{smtp.port}: {type(exc).__name__}: {exc}") from None


# -- the leader's loop ----------------------------------------------------------------------------


@dataclass
class _Pending:
    done: set[str] = field(default_factory=set)
    attempts: int = 0
    next_try: float = 0.0
    delay: float = field(default_factory=lambda: FIRST_RETRY)
    error: str | None = None


class _RateLimit:
    """At most `rate` messages per channel in any 60 seconds."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.sent: dict[str, deque[float]] = {}

    def allow(self, channel: str, now: float) -> bool:
        window = self.sent.setdefault(channel, deque())
        while window and now - window[0] >= 60:
            window.popleft()
        if len(window) >= self.rate:
            return False
        window.append(now)
        return True


class AlertLoop:
    """The leader's alert service: look for incidents, deliver what is due, sleep."""

    def __init__(
        self,
        pool: AsyncConnectionPool[AsyncConnection[TupleRow]],
        config: AlertConfig,
        metrics: Metrics,
        *,
        retention_days: int = 30,
        channels: Channels | None = None,
    ) -> None:
        self.pool = pool
        self.config = config
        self.metrics = metrics
        self.retention_days = retention_days
        self.channels = channels or Channels(config)
        self.limit = _RateLimit(config.rate)
        self.pending: dict[tuple[int, str], _Pending] = {}

    async def run(self) -> None:
        log.info("delivering alerts to %s", ", ".join(self.config.channels))
        while True:
            try:
                await self.run_once()
            except psycopg.OperationalError as exc:
                log.warning("could not look for alerts: %s", exc)
            await asyncio.sleep(self._sleep())

    def _sleep(self) -> float:
        soonest = min((p.next_try for p in self.pending.values()), default=math_inf)
        return max(0.5, min(self.config.interval, soonest - time.monotonic()))

    async def run_once(self) -> int:
        """Open and close incidents, then deliver what is due; returns messages delivered."""
        async with self.pool.connection() as conn:
            await conn.execute(
                Q["alerts_scan"], {"failures": self.config.failures, "retention_days": self.retention_days}
            )
            cur = conn.cursor(row_factory=dict_row)
            rows = await (await cur.execute(Q["alerts_pending"])).fetchall()
        delivered = 0
        seen: set[tuple[int, str]] = set()
        for row in rows:
            event = row["event"]
            seen.add((row["id"], event))
            if event == "skip":  # over before anyone was told: nothing to say
                await self._mark(row["id"], opened=True, recovered=True, attempts=0, error=None)
                continue
            delivered += await self.deliver(row, event)
        for key in set(self.pending) - seen:
            del self.pending[key]
        return delivered

    async def deliver(self, row: dict[str, Any], event: str) -> int:
        """Send one incident's event on every channel that has not had it; how many sent."""
        key = (int(row["id"]), event)
        state = self.pending.setdefault(key, _Pending())
        now = time.monotonic()
        if state.next_try > now:
            return 0
        message = _message(row, event)
        sent = 0
        failed: list[str] = []
        waiting = False
        for channel in self.config.channels:
            if channel in state.done:
                continue
            if not self.limit.allow(channel, now):
                waiting = True
                continue
            try:
                await self.channels.send(channel, message)
            except Exception as exc:
                problem = str(exc) if isinstance(exc, DeliveryError) else f"{type(exc).__name__}: {exc}"
                failed.append(f"{channel}: {problem}")
                self.metrics.alerts_failed.labels(channel=channel).inc()
                continue
            state.done.add(channel)
            sent += 1
            self.metrics.alerts_sent.labels(channel=channel, event=event).inc()
        if failed:
            await self._not_delivered(key, row, message, state, failed)
        elif not waiting:
            await self._finish(key, row, event, state)
        return sent

    async def _not_delivered(
        self, key: tuple[int, str], row: dict[str, Any], message: Message, state: _Pending, failed: list[str]
    ) -> None:
        """Some channels failed: retry later with backoff, or give up on an old incident."""
        event = message.event
        state.attempts += 1
        state.error = "; ".join(failed)[:1000]
        state.next_try = time.monotonic() + state.delay
        state.delay = min(state.delay * 2, MAX_RETRY)
        started = row["closed_at"] if event == "recovered" else row["opened_at"]
        if (datetime.now(UTC) - started).total_seconds() > GIVE_UP_AFTER:
            log.error(
                "giving up alert %s (%s, %s): %s", message.alert_id, message.subject, event, state.error
            )
            await self._finish(key, row, event, state)
            return
        log.warning(
            "alert %s (%s) not delivered, retrying in %.0fs: %s",
            message.alert_id,
            message.subject,
            state.delay / 2,
            state.error,
        )
        await self._mark(int(row["id"]), opened=False, recovered=False, attempts=1, error=state.error)

    async def _finish(self, key: tuple[int, str], row: dict[str, Any], event: str, state: _Pending) -> None:
        rescued = row["kind"] == "rescued"
        await self._mark(
            int(row["id"]),
            opened=event == "open",
            recovered=event == "recovered" or rescued,
            attempts=0,
            error=state.error,
        )
        self.pending.pop(key, None)

    async def _mark(
        self, alert_id: int, *, opened: bool, recovered: bool, attempts: int, error: str | None
    ) -> None:
        async with self.pool.connection() as conn:
            await conn.execute(
                Q["alert_delivered"],
                {
                    "id": alert_id,
                    "opened": opened,
                    "recovered": recovered,
                    "attempts": attempts,
                    "error": error,
                },
            )


math_inf = float("inf")


def leaderless_for(since: float | None, now: float, led: bool) -> float | None:
    """When the fleet has been without a leader since (None: it has one now)."""
    if led:
        return None
    return now if since is None else since


class LeaderWatch:
    """Every replica's watch for a fleet without a leader.  The leader delivers alerts, so
    this one alert cannot wait for it: after `no_leader` seconds with no live replica saying
    it leads, each replica tries to open the fleet's `no_leader` incident, and the one whose
    insert opened it delivers it (retrying while the fleet stays without a leader).  The next
    leader's scan closes the incident and sends the recovery."""

    def __init__(self, loop: AlertLoop) -> None:
        self.loop = loop
        self.since: float | None = None
        self.opened: dict[str, Any] | None = None  # the incident this replica must deliver

    async def run(self) -> None:
        while True:
            try:
                await self.run_once()
            except psycopg.OperationalError as exc:
                log.warning("could not look for a leader: %s", exc)
            await asyncio.sleep(min(self.loop.config.interval, self.loop.config.no_leader / 2))

    async def run_once(self) -> None:
        async with self.loop.pool.connection() as conn:
            led = bool((await (await conn.execute(Q["leader_seen"])).fetchone() or (True,))[0])
        self.since = leaderless_for(self.since, time.monotonic(), led)
        if self.since is None:
            self.opened = None
            return
        waited = time.monotonic() - self.since
        if waited < self.loop.config.no_leader:
            return
        if self.opened is None:
            summary = (
                f"no replica has led the fleet for {waited:.0f} s: job alerts, pruning and "
                "real-time sources wait for a leader"
            )
            async with self.loop.pool.connection() as conn:
                cur = conn.cursor(row_factory=dict_row)
                opened = await (await cur.execute(Q["open_no_leader"], {"summary": summary})).fetchone()
            self.opened = opened or {}  # {}: another replica opened it, or it is open already
        if self.opened:
            await self.loop.deliver(self.opened, "open")
            if (int(self.opened["id"]), "open") not in self.loop.pending:
                self.opened = {}  # delivered (or given up): nothing more to do


def _message(row: dict[str, Any], event: str) -> Message:
    """The message of one incident's event, from its `syncworker.alerts` row."""
    return Message(
        alert_id=int(row["id"]),
        event=event,
        kind=row["kind"],
        integration=row["integration"],
        integration_id=row["integration_id"],
        run_id=row["run_id"],
        summary=row["summary"],
        opened_at=row["opened_at"],
        closed_at=row["closed_at"],
    )
