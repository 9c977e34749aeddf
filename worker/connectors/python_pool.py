"""The worker's side of `"isolation": "process"`: a pool of child processes that run python jobs.

Children are started on first use through a fork server (a clean process that forks them: no
database session or event loop of the worker's is copied into a child), reused from run to run,
and replaced when they die.  A run takes an idle child or starts one, so the pool never holds
more children than runs went on at once (at most the worker's concurrency); idle children
beyond `max_idle` are stopped.  A child that dies during a run fails that run as `crashed`; a
run that is cancelled (its timeout, the worker stopping) kills its child.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import multiprocessing
import os
import pickle
import signal
import threading
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from worker.connectors.base import ConfigError, RunContext, RunResult, SyncError
from worker.connectors.python_child import MAX_MESSAGE_BYTES, Task, serve
from worker.errors import ErrorType

log = logging.getLogger("syncworker.connector.python")

MAX_IDLE = 32
_SERVER_LOCK = threading.Lock()


class ChildPool:
    """The children of one process (the worker, `run-once`); `close()` stops them all."""

    def __init__(self, max_idle: int = MAX_IDLE) -> None:
        self.max_idle = max_idle
        self._idle: list[Child] = []
        self._all: set[Child] = set()
        self._closed = False

    async def run(self, task: Task, ctx: RunContext) -> RunResult:
        """Run `task` in a child; the job's result, or its error raised here as it would be
        in the worker's own process."""
        child = await self._take()
        reusable = False
        try:
            final = await child.call(task, ctx)
            reusable = True
        finally:
            if reusable:
                self._give_back(child)
            else:
                self._discard(child)
        return _unpack(final)

    def close(self) -> None:
        self._closed = True
        for child in list(self._all):
            self._discard(child)
        self._idle.clear()

    async def _take(self) -> Child:
        while self._idle:
            child = self._idle.pop()
            if child.alive():
                return child
            self._discard(child)  # died while idle (killed from outside): replaced below
        starting = asyncio.ensure_future(asyncio.to_thread(Child.start))
        try:
            child = await asyncio.shield(starting)
        except asyncio.CancelledError:  # the run was cancelled while its child was starting
            starting.add_done_callback(self._adopt_late)
            raise
        self._all.add(child)
        return child

    def _adopt_late(self, starting: asyncio.Future[Child]) -> None:
        if not starting.cancelled() and starting.exception() is None:
            child = starting.result()
            self._all.add(child)
            self._give_back(child)

    def _give_back(self, child: Child) -> None:
        if self._closed or len(self._idle) >= self.max_idle or not child.alive():
            self._discard(child)
        else:
            self._idle.append(child)

    def _discard(self, child: Child) -> None:
        self._all.discard(child)
        child.kill()


class Child:
    """One child process and the worker's end of its pipe."""

    def __init__(self, process: BaseProcess, conn: Connection) -> None:
        self.process = process
        self.conn = conn

    @classmethod
    def start(cls) -> Child:
        """A new child (blocking: the worker calls it in a thread)."""
        context = _context()
        here, there = context.Pipe()
        process = context.Process(
            target=serve, args=(there, os.getpid()), name="syncworker python job", daemon=True
        )
        process.start()
        there.close()  # the child's end lives in the child only: its death closes the pipe
        return cls(process, here)

    def alive(self) -> bool:
        return self.process.exitcode is None

    async def call(self, task: Task, ctx: RunContext) -> tuple[Any, ...]:
        """Send the run and serve the child's requests until its final message."""
        try:
            self.conn.send(("run", task))
        except OSError:
            raise await self._crashed(task.target) from None
        while True:
            message = await self._receive()
            if message is None:
                raise await self._crashed(task.target)
            if message[0] in ("done", "failed"):
                return tuple(message)
            await self._serve(message, task, ctx)
            await asyncio.sleep(0)  # a chatty job does not starve the worker's other work

    async def _serve(self, message: tuple[Any, ...], task: Task, ctx: RunContext) -> None:
        tag = message[0]
        if tag == "log":
            _, level, logger, text = message
            extra = {"integration": task.name, "run_id": task.run_id}
            logging.getLogger(logger).log(level, "%s", text, extra=extra)
        elif tag == "record_error":
            _, key, text, options = message
            ctx.record_error(key, text, **options)
        elif tag == "checkpoint":
            await ctx.checkpoint(message[1])
            self.conn.send(("checkpointed",))

    async def _receive(self) -> Any:
        """The child's next message, or None once it is dead.  A message larger than a child
        may send is not read: the run fails, and the child is stopped (its pipe is out of step)."""
        loop = asyncio.get_running_loop()
        while True:
            if self.conn.poll():
                try:
                    return pickle.loads(self.conn.recv_bytes(MAX_MESSAGE_BYTES))
                except OSError as exc:
                    if exc.args == ("bad message length",) and self.alive():
                        raise SyncError(
                            f"the job's process sent a message of more than {MAX_MESSAGE_BYTES // 2**20} MiB;"
                            " it was stopped",
                            error_type=ErrorType.BAD_RESULT,
                        ) from None
                    return None
                except EOFError:
                    return None
            if not self.alive():
                return None
            await _readable(loop, self.conn.fileno(), self.process.sentinel)

    async def _crashed(self, target: str) -> SyncError:
        """The run's error once the child died under it, saying how it died."""
        loop = asyncio.get_running_loop()
        try:  # the pipe closes a moment before the exit status is known
            async with asyncio.timeout(5):
                while self.alive():
                    await _readable(loop, self.process.sentinel)
        except TimeoutError:
            pass
        how = exit_description(self.process.exitcode)
        log.error("the process running the job died (%s)", how)
        return SyncError(
            f"{target}: the process running the job died ({how}); the worker goes on, "
            "the next run gets a new process",
            error_type=ErrorType.CRASHED,
        )

    def kill(self) -> None:
        """SIGKILL (if still alive), then reap it in the background."""
        if self.alive():
            self.process.kill()
        self.conn.close()
        threading.Thread(target=_reap, args=(self.process,), name="reap python child", daemon=True).start()


def exit_description(code: int | None) -> str:
    """How a child ended, from its exit status (negative: the signal that killed it)."""
    if code is None:
        return "it stopped answering"
    if code >= 0:
        return f"it exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    if -code == signal.SIGKILL:
        return f"killed by {name}: out of memory, or killed from outside"
    return f"killed by {name}"


def _unpack(final: tuple[Any, ...]) -> RunResult:
    if final[0] == "done":
        result: RunResult = final[1]
        return result
    _, type_name, text, error_type, trace = final
    cause = ChildTraceback(trace)
    if error_type == ErrorType.CONFIG_INVALID:
        raise ConfigError("", text) from cause
    raise _named(type_name)(text, error_type=error_type) from cause


class ChildTraceback(Exception):
    """The traceback of a job's error in its child, kept as the cause of the error raised here."""

    def __str__(self) -> str:
        return f"\n{self.args[0]}" if self.args and self.args[0] else ""


class JobError(SyncError):
    """A job's error in its child, raised again in the worker under the name of its type."""


@functools.cache
def _named(type_name: str) -> type[JobError]:
    # Named after the job's exception, so that the run's error reads as it does when the job
    # runs in the worker's process ("ValueError: ..."); the error_type is the child's.
    return type(type_name, (JobError,), {"__module__": "job"})


def _context() -> Any:
    """The fork server's context; it preloads the child module, so that a child starts at once."""
    context = multiprocessing.get_context("forkserver")
    with _SERVER_LOCK:
        context.set_forkserver_preload(["worker.connectors.python_child"])
    return context


async def _readable(loop: asyncio.AbstractEventLoop, *fds: int) -> None:
    """Until one of `fds` can be read (data, end of file, or a process's exit)."""
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    for fd in fds:
        loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        for fd in fds:
            loop.remove_reader(fd)


def _reap(process: BaseProcess) -> None:
    process.join(30)
    if process.exitcode is not None:
        process.close()
