"""`python`: call a function of yours ("module:function"), sync or async, on a schedule."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import importlib
import inspect
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from worker.connectors.base import (
    ConfigError,
    Connector,
    EnvironmentProblem,
    RunContext,
    RunResult,
    SyncError,
    expect,
    require,
)
from worker.errors import ErrorType

_CALLABLE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


@dataclass(frozen=True)
class PythonConfig:
    target: str
    func: Callable[..., Any]
    options: dict[str, Any]


class PythonConnector(Connector):
    """Calls `callable` with the run's context.

    The function receives a `RunContext` (config, state, log, record_error and,
    for async functions, `conn`: the run's transaction on the control database)
    and returns a `RunResult`, a dict with the same keys, or None.  Sync functions
    run in a thread; a timeout fails the run but cannot stop the thread itself.
    """

    kind = "python"

    def validate(self, config: Mapping[str, Any]) -> PythonConfig:
        target = require(config, "callable", str, '"module:function"')
        if not _CALLABLE.match(target):
            raise ConfigError("callable", f'expected "module:function", got {target!r}')
        options = expect(config, "options", dict, "an object passed to the function", {})
        # Importing here lets `syncworker check` catch a typo before the first run.
        return PythonConfig(target, self._load(target), dict(options))

    def _load(self, target: str) -> Callable[..., Any]:
        module_name, _, path = target.partition(":")
        try:
            obj: Any = importlib.import_module(module_name)
        except ImportError as exc:  # perhaps only not on this process's path
            raise EnvironmentProblem("callable", f"cannot load {target}: {exc!r}") from exc
        except Exception as exc:
            raise ConfigError("callable", f"cannot load {target}: {exc!r}") from exc
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError as exc:
            raise ConfigError("callable", f"cannot load {target}: {exc!r}") from exc
        if not callable(obj):
            raise ConfigError("callable", f"{target} is not callable")
        return obj  # type: ignore[no-any-return]

    async def run(self, ctx: RunContext) -> RunResult:
        config: PythonConfig = ctx.config
        func = config.func
        try:
            if inspect.iscoroutinefunction(func):
                returned = await func(ctx)
            else:
                returned = await _in_daemon_thread(func, ctx)
            if inspect.isawaitable(returned):
                returned = await returned
        except (SystemExit, KeyboardInterrupt) as exc:
            # A job calling sys.exit() must not take the whole worker down with it.
            raise SyncError(
                f"{config.target} raised {type(exc).__name__}({exc})", error_type=ErrorType.EXCEPTION
            ) from None
        return _as_result(returned, config.target)


async def _in_daemon_thread(func: Callable[..., Any], *args: Any) -> Any:
    """`func(*args)` in a thread of its own, awaited.

    A daemon thread: a function that never returns (or outlives its timeout, which cannot
    stop a thread) does not keep a worker that is stopping alive, as a thread of asyncio's
    default executor would.  Context variables (the log's job and run) go with it.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Any] = loop.create_future()
    context = contextvars.copy_context()

    def settle(outcome: Callable[[], None]) -> None:
        if not done.done():
            outcome()

    def call() -> None:
        try:
            result = context.run(func, *args)
        except BaseException as exc:
            report = functools.partial(settle, functools.partial(done.set_exception, exc))
        else:
            report = functools.partial(settle, functools.partial(done.set_result, result))
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(report)

    threading.Thread(target=call, name=f"job {getattr(func, '__name__', func)}", daemon=True).start()
    return await done


def _as_result(returned: Any, target: str) -> RunResult:
    if returned is None:
        return RunResult()
    if isinstance(returned, RunResult):
        return returned
    if isinstance(returned, Mapping):
        allowed = {"state", "records_processed", "inserted", "updated", "deleted"}
        unknown = set(returned) - allowed
        if unknown:
            raise SyncError(
                f"{target} returned unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}",
                error_type=ErrorType.BAD_RESULT,
            )
        state = returned.get("state")
        if state is not None and not isinstance(state, dict):
            raise SyncError(f"{target} returned a state that is not a dict", error_type=ErrorType.BAD_RESULT)
        return RunResult(**returned)
    raise SyncError(
        f"{target} returned {type(returned).__name__}; expected a RunResult, dict or None",
        error_type=ErrorType.BAD_RESULT,
    )
