"""Alert delivery: incidents from the tables, one message each way, retries, rate limits, channels."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from email import message_from_bytes
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiosmtpd.controller import Controller
from psycopg_pool import AsyncConnectionPool

from helpers import add_job, execute, one, rows, wait_for, worker_env, workers
from worker.ops.alerts import AlertConfig, AlertConfigError, AlertLoop, LeaderWatch
from worker.ops.metrics import Metrics


class Receiver:
    """A local webhook endpoint: records every JSON body; fails the first `fail` requests."""

    def __init__(self) -> None:
        self.bodies: dict[str, list[dict[str, Any]]] = {"webhook": [], "slack": []}
        self.fail = 0
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        if self.fail > 0:
            self.fail -= 1
            return web.Response(status=500, text="down")
        self.bodies[request.match_info["channel"]].append(await request.json())
        return web.Response(text="ok")

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[Receiver]:
        app = web.Application()
        app.router.add_post("/{channel}/secret-path", self.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            yield self
        finally:
            await runner.cleanup()

    def url(self, channel: str) -> str:
        return f"http://127.0.0.1:{self.port}/{channel}/secret-path"


class Mailbox:
    def __init__(self) -> None:
        self.messages: list[Any] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(message_from_bytes(envelope.content))
        return "250 OK"


@pytest.fixture
def mailbox() -> Iterator[tuple[Mailbox, int]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    box = Mailbox()
    controller = Controller(box, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield box, port
    finally:
        controller.stop()


def run(coro: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(coro())


@asynccontextmanager
async def loop_for(url: str, config: AlertConfig) -> AsyncIterator[AlertLoop]:
    async with AsyncConnectionPool(url, min_size=1, max_size=2, kwargs={"autocommit": True}) as pool:
        yield AlertLoop(pool, config, Metrics(1))


def incidents(url: str) -> list[dict[str, Any]]:
    return rows(
        url,
        "SELECT kind, closed_at IS NOT NULL AS closed, sent_at IS NOT NULL AS sent, "
        "recovery_sent_at IS NOT NULL AS recovered FROM syncworker.alerts ORDER BY id",
    )


def test_a_disabled_job_is_told_once_and_its_recovery_once(db: str, mailbox: tuple[Mailbox, int]) -> None:
    box, smtp_port = mailbox
    add_job(db, "orders", "sql", {"statement": "select 1"}, interval_seconds=60)
    add_job(db, "fine", "sql", {"statement": "select 1"}, interval_seconds=60)
    execute(db, "SELECT syncworker.disable_job('orders', '4 failures in a row: HTTP 500')")

    async def scenario() -> None:
        async with Receiver().serving() as receiver:
            config = AlertConfig(
                webhook=receiver.url("webhook"),
                slack=receiver.url("slack"),
                email_to=("ops@example.com",),
                email_from="syncworker@example.com",
                smtp=AlertConfig.from_env(
                    {
                        "SYNCWORKER_ALERT_EMAIL_TO": "x@example.com",
                        "SYNCWORKER_ALERT_SMTP": f"smtp://127.0.0.1:{smtp_port}",
                    }
                ).smtp,
            )
            async with loop_for(db, config) as alerts:
                assert await alerts.run_once() == 3
                assert await alerts.run_once() == 0  # one message per incident
                (body,) = receiver.bodies["webhook"]
                assert body["event"] == "open" and body["kind"] == "disabled"
                assert body["integration"] == "orders" and body["integration_id"] > 0
                assert body["summary"] == "orders is disabled: 4 failures in a row: HTTP 500"
                (slack,) = receiver.bodies["slack"]
                assert slack == {"text": "ALERT: orders is disabled: 4 failures in a row: HTTP 500"}
                (mail,) = box.messages
                assert mail["Subject"] == "[syncworker] orders is disabled"
                assert mail["To"] == "ops@example.com" and "HTTP 500" in mail.get_payload()

                execute(db, "SELECT syncworker.enable_job('orders')")
                assert await alerts.run_once() == 3
                recovered = receiver.bodies["webhook"][1]
                assert recovered["event"] == "recovered" and recovered["closed_at"]
                assert receiver.bodies["slack"][1]["text"].startswith(
                    "RECOVERED: orders is no longer disabled"
                )
                assert box.messages[1]["Subject"] == "[syncworker] recovered: orders is no longer disabled"
                assert await alerts.run_once() == 0
                sent = alerts.metrics.alerts_sent
                assert sent.labels(channel="email", event="recovered")._value.get() == 1
        assert incidents(db) == [{"kind": "disabled", "closed": True, "sent": True, "recovered": True}]

    run(scenario)


def test_failing_stale_overrunning_and_rescued(db: str) -> None:
    flaky = add_job(db, "flaky", "sql", {"statement": "select 1"}, interval_seconds=60)
    add_job(db, "old", "sql", {"statement": "select 1"}, interval_seconds=60)
    slow = add_job(db, "slow", "sql", {"statement": "select 1"}, interval_seconds=600)
    execute(
        db, "UPDATE syncworker.integrations SET retry_count = 1, last_error = 'timeout' WHERE name = 'flaky'"
    )
    execute(
        db,
        "UPDATE syncworker.integrations SET last_status = 'success', created_at = now() - interval '1 day', "
        "last_success_at = now() - interval '1 hour' WHERE name = 'old'",
    )
    run_id = one(
        db,
        "INSERT INTO syncworker.sync_runs (integration_id, started_at) "
        "VALUES (%s, now() - interval '9 minutes') RETURNING id",
        [slow],
    )
    execute(db, "UPDATE syncworker.integrations SET running_run_id = %s WHERE id = %s", [run_id, slow])
    lost = one(db, "INSERT INTO syncworker.sync_runs (integration_id) VALUES (%s) RETURNING id", [flaky])
    execute(
        db,
        "SELECT syncworker.abandon_run(%s, 'the worker running it died or lost its database session')",
        [lost],
    )
    handed = one(db, "INSERT INTO syncworker.sync_runs (integration_id) VALUES (%s) RETURNING id", [flaky])
    execute(db, "SELECT syncworker.abandon_run(%s, 'the worker shut down before the run finished')", [handed])

    async def scenario() -> None:
        async with (
            Receiver().serving() as receiver,
            loop_for(db, AlertConfig(webhook=receiver.url("webhook"), failures=2)) as alerts,
        ):
            await alerts.run_once()
            got = {(b["kind"], b["integration"]) for b in receiver.bodies["webhook"]}
            # flaky failed once: below the threshold of 2; the graceful hand-back is no incident.
            assert got == {("stale", "old"), ("overrunning", "slow"), ("rescued", "flaky")}
            rescued = next(b for b in receiver.bodies["webhook"] if b["kind"] == "rescued")
            assert rescued["run_id"] == lost and "died or lost its database session" in rescued["summary"]

            execute(db, "UPDATE syncworker.integrations SET retry_count = 2 WHERE name = 'flaky'")
            execute(db, "UPDATE syncworker.integrations SET last_success_at = now() WHERE name = 'old'")
            await alerts.run_once()
            latest = [(b["event"], b["kind"], b["integration"]) for b in receiver.bodies["webhook"][3:]]
            assert sorted(latest) == [("open", "failing", "flaky"), ("recovered", "stale", "old")]
            assert (
                "flaky has failed 2 times in a row: "
                in receiver.bodies["webhook"][3]["summary"] + (receiver.bodies["webhook"][4]["summary"])
            )
            await alerts.run_once()
            assert len(receiver.bodies["webhook"]) == 5

    run(scenario)


def test_a_failed_delivery_is_retried_with_backoff_and_counted(
    db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_job(db, "orders", "sql", {"statement": "select 1"}, interval_seconds=60, enabled=False)
    monkeypatch.setattr("worker.ops.alerts.FIRST_RETRY", 0.2)

    async def scenario() -> None:
        async with Receiver().serving() as receiver:
            receiver.fail = 2
            config = AlertConfig(webhook=receiver.url("webhook"), slack=receiver.url("slack"))
            async with loop_for(db, config) as alerts:
                # The first attempt fails on the webhook (500) and again on slack (500).
                assert await alerts.run_once() == 0
                failed = alerts.metrics.alerts_failed
                assert failed.labels(channel="webhook")._value.get() == 1
                assert failed.labels(channel="slack")._value.get() == 1
                assert await alerts.run_once() == 0  # backing off: not tried again yet
                assert await sent_after_backoff(alerts) == 2
                assert await alerts.run_once() == 0
                assert len(receiver.bodies["webhook"]) == 1 and len(receiver.bodies["slack"]) == 1
        row = rows(db, "SELECT attempts, last_error, sent_at IS NOT NULL AS sent FROM syncworker.alerts")[0]
        assert row["sent"] and row["attempts"] == 1
        assert "HTTP 500 from 127.0.0.1" in row["last_error"] and "secret-path" not in row["last_error"]

    run(scenario)


async def sent_after_backoff(alerts: AlertLoop) -> int:
    """What the first `run_once` that sends anything sends, asked until the backoff is over."""
    async with asyncio.timeout(10):
        while not (sent := await alerts.run_once()):  # noqa: ASYNC110 - run_once checks the deadline
            await asyncio.sleep(0.05)
    return sent


def test_one_channel_that_fails_does_not_resend_the_other(db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    add_job(db, "orders", "sql", {"statement": "select 1"}, interval_seconds=60, enabled=False)
    monkeypatch.setattr("worker.ops.alerts.FIRST_RETRY", 0.1)

    async def scenario() -> None:
        async with Receiver().serving() as receiver:
            config = AlertConfig(webhook=receiver.url("webhook"), slack="http://127.0.0.1:1/nothing-listens")
            async with loop_for(db, config) as alerts:
                slack = alerts.metrics.alerts_failed.labels(channel="slack")
                async with asyncio.timeout(10):
                    while slack._value.get() < 2:  # a first attempt and a retry after its backoff
                        await alerts.run_once()
                        await asyncio.sleep(0.05)
                assert len(receiver.bodies["webhook"]) == 1
                assert alerts.metrics.alerts_failed.labels(channel="slack")._value.get() >= 2

    run(scenario)


def test_messages_are_rate_limited_per_channel(db: str) -> None:
    for name in ("a", "b", "c"):
        add_job(db, name, "sql", {"statement": "select 1"}, interval_seconds=60, enabled=False)

    async def scenario() -> None:
        async with (
            Receiver().serving() as receiver,
            loop_for(db, AlertConfig(webhook=receiver.url("webhook"), rate=2)) as alerts,
        ):
            assert await alerts.run_once() == 2
            assert await alerts.run_once() == 0  # the third waits for the next minute
            assert len(receiver.bodies["webhook"]) == 2
        assert [r["sent"] for r in incidents(db)] == [True, True, False]

    run(scenario)


def test_an_incident_over_before_it_was_told_sends_nothing(db: str) -> None:
    add_job(db, "blip", "sql", {"statement": "select 1"}, interval_seconds=60, enabled=False)

    async def scenario() -> None:
        async with (
            Receiver().serving() as receiver,
            loop_for(db, AlertConfig(webhook=receiver.url("webhook"), rate=1)) as alerts,
        ):
            await alerts.pool.wait()
            async with alerts.pool.connection() as conn:
                await conn.execute(
                    "INSERT INTO syncworker.alerts (kind, integration_id, summary, closed_at) "
                    "SELECT 'failing', id, 'x', now() FROM syncworker.integrations"
                )
            await alerts.run_once()
            await alerts.run_once()
            assert [b["kind"] for b in receiver.bodies["webhook"]] == ["disabled"]
        assert {(r["kind"], r["sent"], r["recovered"]) for r in incidents(db)} == {
            ("failing", True, True),
            ("disabled", True, False),
        }

    run(scenario)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SYNCWORKER_ALERT_WEBHOOK": "ftp://example.com/x"}, "SYNCWORKER_ALERT_WEBHOOK: expected an http"),
        ({"SYNCWORKER_ALERT_SLACK": "hooks.slack.com/T0/B0/xyz"}, "SYNCWORKER_ALERT_SLACK: expected an http"),
        ({"SYNCWORKER_ALERT_EMAIL_TO": "ops"}, "SYNCWORKER_ALERT_EMAIL_TO: not an e-mail address: 'ops'"),
        (
            {"SYNCWORKER_ALERT_EMAIL_TO": "a@b.c", "SYNCWORKER_ALERT_SMTP": "mail.example.com"},
            "SYNCWORKER_ALERT_SMTP: expected smtp://",
        ),
        ({"SYNCWORKER_ALERT_FAILURES": "0"}, "SYNCWORKER_ALERT_FAILURES: expected a positive whole number"),
        ({"SYNCWORKER_ALERT_RATE": "lots"}, "SYNCWORKER_ALERT_RATE: expected a positive whole number"),
    ],
)
def test_malformed_settings_are_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(AlertConfigError) as err:
        AlertConfig.from_env(env)
    assert message in str(err.value)
    assert "xyz" not in str(err.value)


def test_settings_from_the_environment() -> None:
    config = AlertConfig.from_env(
        {
            "SYNCWORKER_ALERT_WEBHOOK": "https://hooks.example.com/a",
            "SYNCWORKER_ALERT_EMAIL_TO": "a@example.com, b@example.com",
            "SYNCWORKER_ALERT_SMTP": "smtps://me%40x:p%3Ass@mail.example.com",
            "SYNCWORKER_ALERT_FAILURES": "3",
        }
    )
    assert config.channels == ["webhook", "email"]
    assert config.email_to == ("a@example.com", "b@example.com")
    assert config.smtp is not None
    assert (config.smtp.host, config.smtp.port, config.smtp.user, config.smtp.password, config.smtp.tls) == (
        "mail.example.com",
        465,
        "me@x",
        "p:ss",
        "ssl",
    )
    assert config.failures == 3 and AlertConfig.from_env({}).channels == []


@pytest.mark.e2e
def test_the_leader_of_a_running_worker_delivers(jobdb: str, tmp_path: Path) -> None:
    """A real worker: its leader sends the webhook of a job that fails into disabled; a malformed
    setting stops another worker at start-up with one line."""
    import subprocess
    import sys

    from helpers import ROOT

    add_job(jobdb, "broken", "sql", {"statement": "SELECT 1/0"}, interval_seconds=60, max_retries=0)
    received: list[dict[str, Any]] = []

    async def scenario() -> None:
        async with Receiver().serving() as receiver:
            env = worker_env(
                jobdb, SYNCWORKER_ALERT_WEBHOOK=receiver.url("webhook"), SYNCWORKER_ALERT_INTERVAL="1"
            )
            with workers(jobdb, tmp_path, 1, env=env):
                for _ in range(300):
                    if receiver.bodies["webhook"]:
                        break
                    await asyncio.sleep(0.1)
                # The leader marks the alert sent once the webhook has answered: stopping the
                # worker before then would leave it unmarked (and sent again by the next leader).
                sent = "SELECT count(*) FROM syncworker.alerts WHERE sent_at IS NOT NULL"
                await asyncio.to_thread(wait_for, lambda: one(jobdb, sent), 10.0)
            received.extend(receiver.bodies["webhook"])

    run(scenario)
    assert {(b["kind"], b["integration"]) for b in received} >= {("disabled", "broken")}
    assert wait_for(lambda: one(jobdb, "SELECT count(*) FROM syncworker.alerts WHERE sent_at IS NOT NULL"))

    bad = subprocess.run(
        [sys.executable, "-m", "worker", "run"],
        env=worker_env(jobdb, SYNCWORKER_ALERT_EMAIL_TO="nobody"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    errors = [line for line in bad.stderr.splitlines() if line.startswith("syncworker: error:")]
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert len(errors) == 1 and "SYNCWORKER_ALERT_EMAIL_TO: not an e-mail address" in errors[0]
    assert json.dumps(received)  # the bodies are plain JSON


def test_a_fleet_without_a_leader_is_told_by_one_replica_and_the_next_leader_sends_the_recovery(
    db: str,
) -> None:
    """No worker leads: after no_leader seconds the first watching replica opens the incident
    and delivers it; a second replica sends nothing; a leader's scan closes it and recovers."""

    async def scenario() -> None:
        async with Receiver().serving() as receiver:
            config = AlertConfig(webhook=receiver.url("webhook"), no_leader=0.3)
            async with loop_for(db, config) as one_replica, loop_for(db, config) as another:
                first, second = LeaderWatch(one_replica), LeaderWatch(another)
                await first.run_once()
                await second.run_once()
                assert receiver.bodies["webhook"] == []  # not yet: 0.3 s without a leader first
                await asyncio.sleep(0.35)
                await first.run_once()
                await second.run_once()
                await first.run_once()
                sent = receiver.bodies["webhook"]
                assert [(b["event"], b["kind"], b["integration"]) for b in sent] == [
                    ("open", "no_leader", None)
                ]
                assert sent[0]["summary"].startswith("no replica has led the fleet for")
                assert incidents(db) == [
                    {"kind": "no_leader", "closed": False, "sent": True, "recovered": False}
                ]

                await one_replica.run_once()  # this replica now leads: its scan closes the incident
                latest = receiver.bodies["webhook"][1:]
                assert [(b["event"], b["kind"]) for b in latest] == [("recovered", "no_leader")]
                assert latest[0]["text"].startswith("RECOVERED: a replica leads again")
                assert incidents(db) == [
                    {"kind": "no_leader", "closed": True, "sent": True, "recovered": True}
                ]

    run(scenario)


def test_a_running_replica_raises_no_leader_while_another_session_holds_the_leadership(
    jobdb: str, tmp_path: Path
) -> None:
    import psycopg

    received: list[dict[str, Any]] = []

    async def scenario() -> None:
        async with Receiver().serving() as receiver:
            env = worker_env(
                jobdb,
                SYNCWORKER_ALERT_WEBHOOK=receiver.url("webhook"),
                SYNCWORKER_ALERT_INTERVAL="1",
                SYNCWORKER_ALERT_NO_LEADER="2",
            )
            with psycopg.connect(jobdb, autocommit=True) as holder:
                holder.execute("SELECT pg_advisory_lock(syncworker.lock_key('leader'), 0)")
                with workers(jobdb, tmp_path, 1, env=env):
                    for _ in range(300):
                        if receiver.bodies["webhook"]:
                            break
                        await asyncio.sleep(0.1)
                    holder.execute("SELECT pg_advisory_unlock(syncworker.lock_key('leader'), 0)")
                    for _ in range(300):  # the worker leads now, and its scan sends the recovery
                        if len(receiver.bodies["webhook"]) > 1:
                            break
                        await asyncio.sleep(0.1)
            received.extend(receiver.bodies["webhook"])

    run(scenario)
    assert [(b["event"], b["kind"]) for b in received] == [("open", "no_leader"), ("recovered", "no_leader")]
