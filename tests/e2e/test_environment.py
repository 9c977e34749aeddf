"""Hostile environments: a pooler between the worker and Postgres, server-side timeouts set for
the database or the role, a server that takes no writes.  The worker refuses what breaks its
guarantees with one line (exit status 78), and keeps its own sessions' settings everywhere else."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from helpers import (
    ROOT,
    Cluster,
    add_job,
    db_prefix,
    die_with_parent,
    execute,
    free_port,
    one,
    rows,
    server_bindir,
    wait_for,
    worker_env,
    workers,
)

pytestmark = pytest.mark.e2e

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
needs_pgbouncer = pytest.mark.skipif(
    not os.access(PGBOUNCER, os.X_OK),
    reason=f"pgbouncer is not installed ({PGBOUNCER}; Debian package pgbouncer)",
)


def with_port(url: str, port: int, user: str | None = None) -> str:
    parts = urlsplit(url)
    netloc = f"{user or parts.username or 'postgres'}@{parts.hostname}:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


class Bouncer:
    """A real PgBouncer on a free port in front of a server, trusting postgres and `users`."""

    def __init__(
        self, url: str, mode: str, pool_size: int, ignore_options: bool, users: tuple[str, ...]
    ) -> None:
        server = urlsplit(url)
        self.port = free_port()
        self.home = Path(tempfile.mkdtemp(prefix="swtest-pgbouncer-"))
        self.ini = self.home / "pgbouncer.ini"
        (self.home / "users.txt").write_text("".join(f'"{user}" ""\n' for user in ("postgres", *users)))
        self.settings = (
            f"[databases]\n* = host={server.hostname} port={server.port or 5432}\n"
            f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {self.home / 'users.txt'}\n"
            f"default_pool_size = {pool_size}\nmax_client_conn = 500\n"
            f"logfile = {self.home / 'pgbouncer.log'}\n"
            + ("ignore_startup_parameters = options\n" if ignore_options else "")
        )
        self.ini.write_text(self.settings + f"pool_mode = {mode}\n")
        as_user: dict[str, Any] = {}
        if os.geteuid() == 0:  # pgbouncer refuses to run as root
            for path in (self.home, *self.home.iterdir()):
                shutil.chown(path, "postgres")
            as_user = {"user": "postgres", "group": "postgres", "extra_groups": []}
        self.proc = subprocess.Popen(
            [PGBOUNCER, str(self.ini)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent,  # noqa: PLW1509 - only prctl, async-signal-safe
            **as_user,
        )

    def switch(self, mode: str) -> None:
        """Another pool_mode, taken by a reload (SIGHUP) as an operator would."""
        self.ini.write_text(self.settings + f"pool_mode = {mode}\n")
        self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        shutil.rmtree(self.home, ignore_errors=True)


@contextmanager
def pgbouncer(
    url: str, mode: str, *, pool_size: int = 20, ignore_options: bool = False, users: tuple[str, ...] = ()
) -> Iterator[Bouncer]:
    bouncer = Bouncer(url, mode, pool_size, ignore_options, users)
    try:
        proc = bouncer.proc
        wait_for(lambda: _answers(bouncer.port) or proc.poll() is not None, timeout=10, what="pgbouncer")
        assert proc.poll() is None, (bouncer.home / "pgbouncer.log").read_text()
        yield bouncer
    finally:
        bouncer.stop()


def _answers(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def syncworker(url: str, *args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        env=worker_env(url, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def db_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


@pytest.fixture
def role(jobdb: str) -> Iterator[str]:
    """A login role of the test's own (a superuser, as the tests' postgres is), dropped after."""
    name = f"{db_prefix()}e{uuid.uuid4().hex[:10]}"
    execute(jobdb, f"CREATE ROLE {name} LOGIN SUPERUSER")
    try:
        yield name
    finally:
        execute(jobdb, f"DROP ROLE IF EXISTS {name}")


def set_default(url: str, level: str, role: str, setting: str, value: str) -> str:
    """`setting` = `value` for the test database, or for `role` in it; the URL to connect with."""
    if level == "database":
        execute(url, f"ALTER DATABASE {db_name(url)} SET {setting} = '{value}'")
        return url
    execute(url, f"ALTER ROLE {role} IN DATABASE {db_name(url)} SET {setting} = '{value}'")
    return with_port(url, urlsplit(url).port or 5432, user=role)


def runs(url: str, name: str) -> list[dict[str, Any]]:
    return rows(
        url,
        "SELECT r.status, r.trigger, r.error_type, r.error FROM syncworker.sync_runs r "
        "JOIN syncworker.integrations i ON i.id = r.integration_id WHERE i.name = %s ORDER BY r.id",
        (name,),
    )


# -- 2. a transaction pooler breaks the guarantees: refused at start-up -----------------------------


@needs_pgbouncer
@pytest.mark.parametrize("pool_size", [1, 2])
@pytest.mark.parametrize("ignore_options", [False, True])
def test_a_transaction_pooler_is_refused_at_start_up(
    jobdb: str, pool_size: int, ignore_options: bool
) -> None:
    with pgbouncer(jobdb, "transaction", pool_size=pool_size, ignore_options=ignore_options) as bouncer:
        pooled = with_port(jobdb, bouncer.port)
        result = syncworker(pooled, "run", timeout=60)
        checked = syncworker(pooled, "check")
    assert result.returncode == 78, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, result.stderr
    assert "transaction" in errors[0] and "pool_mode = session" in errors[0]
    assert one(jobdb, "SELECT count(*) FROM syncworker.workers") == 0
    assert checked.returncode == 1
    assert "  error: sessions: sessions do not keep their server session" in checked.stdout


@needs_pgbouncer
def test_a_session_pooler_is_accepted_and_runs_jobs(jobdb: str, tmp_path: Path) -> None:
    """PgBouncer refuses the `options` startup parameter: the worker sets its settings itself."""
    add_job(
        jobdb, "tick", "sql", {"statement": "INSERT INTO public.ticks DEFAULT VALUES"}, interval_seconds=1
    )
    with pgbouncer(jobdb, "session") as bouncer:
        pooled = with_port(jobdb, bouncer.port)
        with workers(pooled, tmp_path, 1, env=worker_env(pooled)) as procs:
            wait_for(lambda: one(jobdb, "SELECT count(*) FROM public.ticks") >= 3, timeout=30, what="3 runs")
            assert procs[0].proc.poll() is None
            output = procs[0].output()
        checked = syncworker(pooled, "check")
    assert {r["status"] for r in runs(jobdb, "tick")} <= {"success", "running"}
    assert "startup options are refused on the way to the server" in output
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "  ok: sessions: stable" in checked.stdout


@needs_pgbouncer
def test_a_listener_that_reconnects_through_a_transaction_pooler_stops_the_worker(
    jobdb: str, tmp_path: Path
) -> None:
    """The way to the server changes under a running worker (the pooler is switched to
    transaction mode): the listener's next session finds it out, and the worker stops with 78."""
    with pgbouncer(jobdb, "session") as bouncer:
        pooled = with_port(jobdb, bouncer.port)
        with workers(pooled, tmp_path, 1, env=worker_env(pooled)) as procs:
            wait_for(lambda: "started" in procs[0].output(), timeout=20, what="the worker to start")
            bouncer.switch("transaction")
            execute(
                jobdb,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name = 'syncworker listener'",
            )
            assert procs[0].proc.wait(30) == 78, procs[0].output()[-3000:]
            output = procs[0].output()
    assert "stopping: cannot run on" in output and "pool_mode = session" in output


# -- 3. server-side timeouts: the worker's sessions keep their own settings --------------------------

LEVELS = ["database", "role"]


@needs_pgbouncer
@pytest.mark.parametrize("level", LEVELS)
def test_idle_in_transaction_timeout_behind_a_pooler_does_not_cut_a_long_python_job(
    jobdb: str, tmp_path: Path, role: str, level: str
) -> None:
    """PgBouncer with `ignore_startup_parameters = options` drops the worker's startup options:
    it sets them with SET, again after every RESET ALL, so the run's session is not ended."""
    url = set_default(jobdb, level, role, "idle_in_transaction_session_timeout", "2s")
    add_job(
        jobdb, "slow", "python", {"callable": "jobs:sleep", "options": {"seconds": 5}}, interval_seconds=3600
    )
    with pgbouncer(jobdb, "session", ignore_options=True, users=(role,)) as bouncer:
        pooled = with_port(url, bouncer.port)
        with workers(pooled, tmp_path, 2, env=worker_env(pooled, SYNCWORKER_DATABASE_URL=pooled)):
            wait_for(
                lambda: runs(jobdb, "slow") and runs(jobdb, "slow")[0]["status"] != "running", timeout=30
            )
            execute(jobdb, "SELECT syncworker.trigger_sync('slow')")  # a second run on a reused session
            wait_for(
                lambda: len(runs(jobdb, "slow")) >= 2 and runs(jobdb, "slow")[1]["status"] != "running", 30
            )
    assert [(r["status"], r["trigger"]) for r in runs(jobdb, "slow")] == [
        ("success", "schedule"),
        ("success", "manual"),
    ]


@needs_pgbouncer
@pytest.mark.parametrize("level", LEVELS)
def test_statement_timeout_behind_a_pooler_cancels_neither_a_long_job_nor_the_standby(
    jobdb: str, tmp_path: Path, role: str, level: str
) -> None:
    url = set_default(jobdb, level, role, "statement_timeout", "1s")
    add_job(jobdb, "long", "sql", {"statement": "SELECT pg_sleep(3)"}, interval_seconds=3600)
    with pgbouncer(jobdb, "session", ignore_options=True, users=(role,)) as bouncer:
        pooled = with_port(url, bouncer.port)
        with workers(pooled, tmp_path, 2, "--mode", "single", env=worker_env(pooled)) as procs:
            wait_for(
                lambda: runs(jobdb, "long") and runs(jobdb, "long")[0]["status"] != "running", timeout=30
            )
            # the standby has waited for leadership (one statement) for longer than the timeout
            wait_for(
                lambda: (
                    one(jobdb, "SELECT count(*) FROM syncworker.workers WHERE heartbeat_at IS NOT NULL") == 2
                ),
                timeout=10,
            )
            output = "".join(p.output() for p in procs)
    assert [r["status"] for r in runs(jobdb, "long")] == ["success"]
    assert "statement timeout" not in output
    assert "Traceback" not in output and "session lost" not in output


@needs_pgbouncer
@pytest.mark.parametrize("level", LEVELS)
def test_lock_timeout_behind_a_pooler_does_not_cancel_the_wait_for_the_runs_lock(
    jobdb: str, tmp_path: Path, role: str, level: str
) -> None:
    """Someone holds the job's lock for 3 s (a run-once elsewhere): the run waits for it."""
    url = set_default(jobdb, level, role, "lock_timeout", "500ms")
    job_id = add_job(jobdb, "locked", "sql", {"statement": "SELECT 1"}, next_sync_at=None)
    with psycopg.connect(jobdb, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(syncworker.lock_key('integration'), %s)", (job_id,))
        with pgbouncer(jobdb, "session", ignore_options=True, users=(role,)) as bouncer:
            pooled = with_port(url, bouncer.port)
            with workers(pooled, tmp_path, 1, env=worker_env(pooled)):
                execute(jobdb, "SELECT syncworker.trigger_sync('locked')")
                wait_for(lambda: runs(jobdb, "locked"), timeout=15, what="the run")
                wait_for(
                    lambda: one(
                        jobdb, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                    ),
                    timeout=15,
                    what="the run to wait for its lock",
                )
                holder.execute("SELECT pg_sleep(1.5)")  # longer than the lock_timeout
                holder.execute("SELECT pg_advisory_unlock_all()")
                wait_for(lambda: runs(jobdb, "locked")[-1]["status"] != "running", timeout=15)
    assert [r["status"] for r in runs(jobdb, "locked")] == ["success"]


def test_run_once_keeps_the_workers_session_settings(jobdb: str) -> None:
    execute(jobdb, f"ALTER DATABASE {db_name(jobdb)} SET idle_in_transaction_session_timeout = '1s'")
    add_job(jobdb, "slow", "python", {"callable": "jobs:sleep", "options": {"seconds": 3}}, next_sync_at=None)
    result = syncworker(jobdb, "run-once", "slow")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["status"] for r in runs(jobdb, "slow")] == ["success"]


@pytest.mark.parametrize("cut", ["statement_timeout", "lock_timeout"])
def test_a_statement_the_server_cancels_on_a_timeout_fails_the_run_as_server_timeout(
    jobdb: str, tmp_path: Path, cut: str
) -> None:
    """The database's timeout reaches the session a job opens with a dsn of its own: the run
    fails (counted toward max_retries), with an error_type that says who stopped it."""
    execute(jobdb, f"ALTER DATABASE {db_name(jobdb)} SET {cut} = '300ms'")
    statement = "SELECT pg_sleep(3)" if cut == "statement_timeout" else "SELECT pg_advisory_lock(4242)"
    add_job(jobdb, "cut", "sql", {"statement": statement, "dsn": {"env": "SW_TEST_DSN"}}, max_retries=0)
    with psycopg.connect(jobdb, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(4242)")
        with workers(jobdb, tmp_path, 1, env=worker_env(jobdb, SW_TEST_DSN=jobdb)):
            wait_for(lambda: not one(jobdb, "SELECT enabled FROM syncworker.integrations"), timeout=20)
    assert [(r["status"], r["error_type"]) for r in runs(jobdb, "cut")] == [("failed", "server_timeout")]
    assert cut.replace("_", " ") in runs(jobdb, "cut")[0]["error"]


def test_a_run_session_the_server_ends_on_an_idle_timeout_records_server_timeout(
    jobdb: str, tmp_path: Path
) -> None:
    """The job set the timeout itself: the run's session is ended under it.  Whether the
    runner (the run fails) or a rescuer (the run is abandoned, and counted toward
    max_abandons) notices first, each such run says why: a server_timeout error."""
    add_job(
        jobdb,
        "idler",
        "python",
        {"callable": "jobs:idles_in_its_transaction", "options": {"seconds": 2}},
        interval_seconds=3600,
        max_retries=0,
    )

    def explained() -> list[dict[str, Any]]:
        return rows(
            jobdb,
            "SELECT r.id, r.status, e.message FROM syncworker.sync_runs r JOIN syncworker.sync_errors e "
            "ON e.run_id = r.id AND e.error_type = 'server_timeout' ORDER BY r.id",
        )

    with workers(jobdb, tmp_path, 1):
        wait_for(lambda: len(explained()) >= 2, timeout=30, what="two runs ended by the server")
    found = explained()
    assert [r["id"] for r in found[:2]] == [1, 2]
    assert {r["status"] for r in found} <= {"failed", "abandoned"}
    assert all("idle-in-transaction timeout" in r["message"] for r in found)


# -- 4. where it may run -----------------------------------------------------------------------------


def test_a_read_only_server_is_refused_by_run_and_migrate_and_reported_by_check(
    jobdb: str, role: str
) -> None:
    """What a hot standby looks like to a session (pg_is_in_recovery() itself is unit-tested)."""
    url = set_default(jobdb, "role", role, "default_transaction_read_only", "on")
    result = syncworker(url, "run")
    migrated = syncworker(url, "migrate")
    checked = syncworker(url, "check", "--json")
    for done in (result, migrated):
        assert done.returncode == 78, done.stderr
        errors = [line for line in done.stderr.splitlines() if "error" in line]
        assert len(errors) == 1 and "read-only" in errors[0], done.stderr
    report = json.loads(checked.stdout)
    assert checked.returncode == 1
    assert any(f["level"] == "error" and "read-only" in f["message"] for f in report["environment"])


def test_check_reports_the_environment_and_start_up_warns_of_a_superuser(jobdb: str, tmp_path: Path) -> None:
    execute(jobdb, f"ALTER DATABASE {db_name(jobdb)} SET statement_timeout = '7s'")
    checked = syncworker(jobdb, "check")
    assert checked.returncode == 0, checked.stderr
    section = checked.stdout[checked.stdout.index("environment:") :]
    assert "  ok: server: PostgreSQL 1" in section
    assert "  ok: sessions: stable" in section
    assert (
        "  note: timeouts: statement_timeout = 7s for the database: the worker's own sessions override it"
        in section
    )
    assert "  warning: role: connected as postgres, a superuser" in section
    with workers(jobdb, tmp_path, 1) as procs:
        wait_for(lambda: "started" in procs[0].output(), timeout=20, what="the worker to start")
        output = procs[0].output()
    assert "connected as postgres, a superuser" in output
    assert "statement_timeout = 7s for the database" in output


@pytest.fixture
def standby() -> Iterator[str]:
    """A real hot standby: a fresh primary, pg_basebackup -R of it, started on a port of its own."""
    if shutil.which("pg_config") is None or not (Path(server_bindir()) / "pg_basebackup").exists():
        pytest.skip("no PostgreSQL server binaries (pg_config --bindir) to build a standby with")
    if os.geteuid() != 0 and os.environ.get("USER") != "postgres":
        pytest.skip("a standby is built as the postgres OS user: run the tests as root or postgres")
    home = Path(tempfile.mkdtemp(prefix="swtest-standby-"))
    if os.geteuid() == 0:
        shutil.chown(home, "postgres")
    primary, replica = Cluster(home, "primary"), Cluster(home, "standby")
    try:
        primary.init()
        primary.start()
        from worker.db.migrate import upgrade

        upgrade(primary.url())  # the standby of a primary the workers ran on
        done = replica.pg(
            "pg_basebackup", "-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres",
            "-D", str(replica.data), "-R", "-X", "stream", "-c", "fast",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        replica.start()
        yield replica.url()
    finally:
        replica.stop()
        primary.stop()
        shutil.rmtree(home, ignore_errors=True)


def test_a_hot_standby_is_refused_by_run_and_migrate(standby: str) -> None:
    assert one(standby, "SELECT pg_is_in_recovery()") is True
    for args in (("run",), ("migrate",)):
        done = syncworker(standby, *args)
        assert done.returncode == 78, done.stderr
        errors = [line for line in done.stderr.splitlines() if "error" in line]
        assert len(errors) == 1 and "hot standby" in errors[0], done.stderr
