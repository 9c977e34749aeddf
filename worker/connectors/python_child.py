"""The process that runs `python` jobs with `"isolation": "process"`, one run after another.

The worker starts it through a fork server (`python_pool.py`), so it inherits neither the
worker's database sessions nor its event loop.  It speaks to the worker over one pipe:

    worker -> child   ("run", Task)            ("checkpointed",)
    child -> worker   ("log", level, logger, text)
                      ("record_error", key, message, options)
                      ("checkpoint", state)     (waits for "checkpointed")
                      ("done", RunResult)       ("failed", type name, text, error_type, traceback)

A job that kills this process (os._exit, a segfault, the OOM killer) ends here, not in the
worker: the worker sees the pipe close and fails the run as `crashed`.

No message may be larger than MAX_MESSAGE_BYTES pickled: a result or a checkpoint's state
that is fails the run as `bad_result` here, before it is sent (a log line is cut short), and
the worker reads no more than that of any message (it stops a child that sends more).
"""

from __future__ import annotations

import asyncio
import faulthandler
import inspect
import logging
import multiprocessing
import os
import select
import signal
import threading
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from typing import Any, NoReturn

from worker import logs
from worker.connectors.base import ConfigError, RunContext, SyncError
from worker.connectors.python import PythonConfig, as_result, exit_error, load_callable
from worker.errors import ErrorType
from worker.run.outcome import classify

# The most one message between a job's process and the worker may hold, pickled.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# A log line longer than this is cut short.
MAX_LOG_TEXT = 64 * 1024

_WHAT = {
    "done": "the job's result",
    "checkpoint": "the state of a checkpoint",
    "record_error": "a record error",
}


def pack(message: tuple[Any, ...]) -> memoryview:
    """`message` pickled for the pipe; a SyncError (bad_result) if it is too large to send."""
    payload = ForkingPickler.dumps(message)
    if len(payload) > MAX_MESSAGE_BYTES:
        what = _WHAT.get(message[0], "a message")
        raise SyncError(
            f"{what} is {len(payload) / 2**20:.0f} MiB pickled, more than the"
            f" {MAX_MESSAGE_BYTES // 2**20} MiB a job's process may send to the worker",
            error_type=ErrorType.BAD_RESULT,
        )
    return payload


@dataclass(frozen=True)
class Task:
    """One run, as the child gets it: only what can be pickled (no session, no loop)."""

    target: str
    options: dict[str, Any]
    state: dict[str, Any]
    name: str
    run_id: int
    integration_id: int
    trigger: str
    dry_run: bool
    period_seconds: float | None
    log_level: int


def serve(conn: Connection, worker: int) -> None:
    """The child's life: run one task after another until the worker closes the pipe.

    multiprocessing has given it the worker's sys.path and working directory already.
    """
    _prepare()
    _die_with_worker(worker)
    channel = _Channel(conn)
    root = logging.getLogger()
    root.handlers[:] = [_Forward(channel)]
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        channel.reply(run_task(message[1], channel))


def _prepare() -> None:
    # The worker starts this process as a daemon (it must never outlive the worker); a job in
    # it may still start processes of its own, as it could in the worker.
    multiprocessing.current_process().daemon = False
    # Ctrl-C at a terminal reaches the whole process group: the worker decides when runs stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    faulthandler.enable()  # a native crash leaves its stack on stderr, in the worker's log


def _die_with_worker(worker: int) -> None:
    """End this process when the worker ends: the run of a worker killed with SIGKILL must
    not go on beside its rescued rerun.  (The fork server is this process's parent, and it
    outlives the worker while any child holds its pipe: the worker itself is watched.)"""
    threading.Thread(target=_watch, args=(worker,), name="watch the worker", daemon=True).start()


def _watch(worker: int) -> None:
    try:
        fd = os.pidfd_open(worker)
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):  # not Linux 5.3 or newer: the pipe's end stops it between runs
        return
    select.select([fd], [], [])  # readable once the worker has exited
    os._exit(1)


def run_task(task: Task, channel: _Channel) -> tuple[Any, ...]:
    """Load and call the job's function; "done" with its result or "failed" with its error."""
    logging.getLogger().setLevel(task.log_level)
    logs.bind(task.name, task.run_id)
    ctx = _ChildContext(
        integration_id=task.integration_id,
        name=task.name,
        kind="python",
        run_id=task.run_id,
        config=None,
        state=dict(task.state),
        conn=_NoConnection(),  # type: ignore[arg-type]
        log=logging.getLogger("syncworker.connector.python"),
        trigger=task.trigger,
        dry_run=task.dry_run,
        period_seconds=task.period_seconds,
        commit_state=channel.checkpoint,
    )
    ctx.channel = channel
    try:
        func = load_callable(task.target)
        ctx.config = PythonConfig(task.target, func, dict(task.options), "process")
        return ("done", call_here(func, ctx, task.target))
    except BaseException as exc:
        return ("failed", *describe(exc))
    finally:
        logs.bind(None, None)


def call_here(func: Any, ctx: RunContext, target: str) -> Any:
    """`func(ctx)` in this process: an async function in an event loop of its own."""
    try:
        if inspect.iscoroutinefunction(func):
            returned = asyncio.run(func(ctx))
        else:
            returned = func(ctx)
            if inspect.isawaitable(returned):
                returned = asyncio.run(_awaited(returned))
    except (SystemExit, KeyboardInterrupt) as exc:
        raise exit_error(exc, target) from None
    return as_result(returned, target)


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def describe(exc: BaseException) -> tuple[str, str, str, str]:
    """What the worker needs to raise the job's error again: its type's name, its text, its
    error_type (as the worker would classify it) and the traceback here."""
    error_type = classify(exc, timed_out=False).error_type
    trace = "".join(traceback.format_exception(exc))
    return type(exc).__name__, str(exc), str(error_type), trace


class _Channel:
    """The pipe to the worker; sends from any thread of the job, one message at a time."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()

    def send(self, message: tuple[Any, ...]) -> None:
        payload = pack(message)
        with self.lock:
            self.conn.send_bytes(payload)

    def reply(self, final: tuple[Any, ...]) -> None:
        """The run's last message; a result that cannot be pickled, or is too large, fails
        the run instead."""
        try:
            self.send(final)
        except SyncError as exc:
            self.send(("failed", "SyncError", str(exc), str(ErrorType.BAD_RESULT), ""))
        except Exception as exc:
            problem = f"the job's result cannot be sent to the worker: {exc!r}"
            self.send(("failed", "SyncError", problem, str(ErrorType.BAD_RESULT), ""))

    async def checkpoint(self, state: dict[str, Any]) -> None:
        """`ctx.checkpoint`: the worker commits `state` on the run's session, then answers."""
        payload = pack(("checkpoint", state))
        with self.lock:
            self.conn.send_bytes(payload)
            self.conn.recv()


class _Forward(logging.Handler):
    """Every log record of the child goes to the worker, which logs it with the run's name and id."""

    def __init__(self, channel: _Channel) -> None:
        super().__init__()
        self.channel = channel

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
            if len(text) > MAX_LOG_TEXT:
                text = f"{text[:MAX_LOG_TEXT]}... ({len(text) - MAX_LOG_TEXT} more characters cut)"
            self.channel.send(("log", record.levelno, record.name, text))
        except Exception:
            self.handleError(record)


class _ChildContext(RunContext):
    """The run's context in the child: record_error goes to the worker at once, so that the
    errors reach the run even if this process dies later."""

    channel: _Channel

    def record_error(
        self,
        record_key: object,
        message: str,
        *,
        error_type: str = "record_invalid",
        detail: str | None = None,
        context: Mapping[str, Any] | None = None,
    ) -> None:
        key = None if record_key is None else str(record_key)
        options = {"error_type": error_type, "detail": detail, "context": dict(context or {})}
        try:
            self.channel.send(("record_error", key, str(message), options))
        except Exception:  # a context that cannot be pickled: keep what it said
            options["context"] = {"context": repr(context)[:1000]}
            self.channel.send(("record_error", key, str(message), options))


class _NoConnection:
    """`ctx.conn` under isolation: the run's transaction stays in the worker."""

    def __getattr__(self, name: str) -> NoReturn:
        raise ConfigError(
            "isolation",
            'ctx.conn (the run\'s transaction) is not available with "isolation": "process"; '
            "open a connection of your own in the job, or run it in the worker's process",
        )
