"""Test helpers: real worker processes, waiting on conditions with deadlines, quick queries, and
throw-away PostgreSQL clusters of the server's own version."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg.rows import dict_row

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
T = TypeVar("T")

ADMIN_URL = os.environ.get("SYNCWORKER_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("SYNCWORKER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

DB_PREFIX_VARIABLE = "SYNCWORKER_TEST_DB_PREFIX"
DEFAULT_DB_PREFIX = "swtest_"
# Lower-case letters, digits and underscores, starting with a letter: a plain identifier
# that needs no quoting, and short enough that prefix + 12 hex digits fits in 63 bytes.
_SAFE_PREFIX = re.compile(r"[a-z][a-z0-9_]{0,39}")


def db_prefix() -> str:
    """The prefix of every database the tests create (and the only ones they drop)."""
    prefix = os.environ.get(DB_PREFIX_VARIABLE, DEFAULT_DB_PREFIX)
    if not _SAFE_PREFIX.fullmatch(prefix):
        raise ValueError(
            f"{DB_PREFIX_VARIABLE}={prefix!r} is not a safe database name prefix: use 1 to 40 lower-case "
            f"letters, digits or underscores, starting with a letter (default {DEFAULT_DB_PREFIX})"
        )
    return prefix


def url_for_db(name: str) -> str:
    parts = urlsplit(ADMIN_URL)
    return urlunsplit(parts._replace(path="/" + name))


def create_database(template: str | None = None) -> tuple[str, str]:
    name = f"{db_prefix()}{uuid.uuid4().hex[:12]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        if template:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        else:
            conn.execute(f'CREATE DATABASE "{name}"')
    return name, url_for_db(name)


def drop_database(name: str) -> None:
    assert name.startswith(db_prefix()), f"refusing to drop {name}: not a test database"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def wait_for(
    condition: Callable[[], T], timeout: float = 10.0, interval: float = 0.05, what: str = "condition"
) -> T:
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def rows(url: str, sql: str, params: Any = None) -> list[dict[str, Any]]:
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        return conn.execute(sql, params).fetchall()


def one(url: str, sql: str, params: Any = None) -> Any:
    found = rows(url, sql, params)
    return next(iter(found[0].values())) if found else None


def execute(url: str, sql: str, params: Any = None) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql, params)


def add_job(
    url: str, name: str, kind: str = "sql", config: dict[str, Any] | None = None, **columns: Any
) -> int:
    from psycopg.types.json import Jsonb

    cols = {
        "name": name,
        "kind": kind,
        "config": Jsonb({} if config is None else config),
        **{k: Jsonb(v) if isinstance(v, dict) else v for k, v in columns.items()},
    }
    names = ", ".join(cols)
    marks = ", ".join(f"%({c})s" for c in cols)
    return int(one(url, f"INSERT INTO syncworker.integrations ({names}) VALUES ({marks}) RETURNING id", cols))


def worker_env(url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCWORKER_")}
    env.update({"SYNCWORKER_DATABASE_URL": url, "PYTHONPATH": str(TESTS), "PYTHONUNBUFFERED": "1"})
    # The tests connect as the superuser postgres; their sql jobs have no run_as.
    env["SYNCWORKER_ALLOW_SUPERUSER_JOBS"] = "1"
    env["SYNCWORKER_PYTHON_MODULES"] = "jobs"  # the python jobs of the tests: tests/jobs.py
    env.update(extra)
    return env


def die_with_parent() -> None:
    """In a child process: be killed when the test process dies (a timeout, a Ctrl-C), so
    that no worker outlives its test and keeps loading the machine."""
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class WorkerProcess:
    """A real `syncworker run` process whose output goes to a file."""

    def __init__(self, url: str, log_path: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "run", *args],
            env=env or worker_env(url),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            preexec_fn=die_with_parent,  # noqa: PLW1509 - only prctl, async-signal-safe
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        self._log.close()


@contextmanager
def workers(
    url: str, tmp_path: Path, count: int = 1, *args: str, env: dict[str, str] | None = None
) -> Iterator[list[WorkerProcess]]:
    procs = [WorkerProcess(url, tmp_path / f"worker{i}.log", *args, env=env) for i in range(count)]
    try:
        yield procs
    finally:
        for p in procs:
            p.stop()
        for p in procs:
            print(f"--- {p.log_path.name} ---\n{p.output()[-4000:]}")


class Supervisor:
    """`count` worker processes kept running as systemd's `Restart=always` would: one that
    exits is started again after `restart_sec`.  Every exit is kept in `deaths`."""

    def __init__(
        self,
        url: str,
        tmp_path: Path,
        count: int,
        *args: str,
        env: dict[str, str] | None = None,
        restart_sec: float = 0.1,
    ) -> None:
        self._start = lambda slot, n: WorkerProcess(url, tmp_path / f"worker{slot}.{n}.log", *args, env=env)
        self.restart_sec = restart_sec
        self.procs = [self._start(slot, 0) for slot in range(count)]
        self.all = list(self.procs)
        self.deaths: list[int] = []  # exit codes, in order
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.02):
            for slot, proc in enumerate(self.procs):
                code = proc.proc.poll()
                if code is None or self._stop.wait(self.restart_sec):
                    continue
                self.deaths.append(code)
                self.procs[slot] = self._start(slot, len(self.deaths))
                self.all.append(self.procs[slot])

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for p in self.all:
            p.stop()
        for p in self.all:
            print(f"--- {p.log_path.name} ---\n{p.output()[-3000:]}")


@contextmanager
def supervised(
    url: str, tmp_path: Path, count: int = 1, *args: str, env: dict[str, str] | None = None
) -> Iterator[Supervisor]:
    supervisor = Supervisor(url, tmp_path, count, *args, env=env)
    try:
        yield supervisor
    finally:
        supervisor.stop()


def worker_ids_live(url: str) -> int:
    return int(one(url, "SELECT count(*) FROM syncworker.workers WHERE stopped_at IS NULL") or 0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_bindir() -> str:
    """Where the PostgreSQL server's programs are (initdb, pg_ctl), from `pg_config --bindir`."""
    return subprocess.run(
        ["pg_config", "--bindir"], capture_output=True, text=True, check=True
    ).stdout.strip()


def as_postgres_user() -> dict[str, Any]:
    """subprocess arguments that run a server program as the postgres OS user when we are root."""
    if os.geteuid() == 0:
        return {"user": "postgres", "group": "postgres", "extra_groups": []}
    return {}


def missing_server() -> str | None:
    """Why a private cluster cannot be built here (no server programs, wrong OS user), or None."""
    if shutil.which("pg_config") is None:
        return "no PostgreSQL server binaries (pg_config is not on PATH)"
    try:
        bindir = Path(server_bindir())
    except (OSError, subprocess.CalledProcessError):
        return "no PostgreSQL server binaries (pg_config --bindir failed)"
    if not (bindir / "initdb").exists() or not (bindir / "pg_ctl").exists():
        return f"no PostgreSQL server binaries (no initdb or pg_ctl in {bindir})"
    if os.geteuid() != 0 and os.environ.get("USER") != "postgres":
        return "a private cluster is run as the postgres OS user: run the tests as root or postgres"
    return None


class Cluster:
    """A throw-away PostgreSQL cluster of the server's own version, run as the postgres OS user."""

    def __init__(self, home: Path, name: str) -> None:
        self.data = home / name
        self.port = free_port()
        self.log = home / f"{name}.log"

    def pg(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(Path(server_bindir()) / tool), *args],
            capture_output=True,
            text=True,
            timeout=120,
            **as_postgres_user(),
        )

    def init(self) -> None:
        done = self.pg("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-N")
        assert done.returncode == 0, done.stderr

    def start(self, **settings: str | int) -> None:
        """Start the server; `settings` are given as `-c name=value` (wal_level="logical")."""
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.data.parent}"
        )
        options += "".join(f" -c {name}={value}" for name, value in settings.items())
        done = self.pg("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start")
        assert done.returncode == 0, done.stderr + (self.log.read_text() if self.log.exists() else "")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self.pg("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"


@contextmanager
def private_cluster(prefix: str = "swtest-cluster-", **settings: str | int) -> Iterator[Cluster]:
    """A new cluster in a temporary directory, started with `settings`; stopped and removed after."""
    home = Path(tempfile.mkdtemp(prefix=prefix))
    if os.geteuid() == 0:
        shutil.chown(home, "postgres")
    cluster = Cluster(home, "data")
    try:
        cluster.init()
        cluster.start(**settings)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(home, ignore_errors=True)
