"""`python`: call a function of yours ("module:function"), sync or async, on a schedule."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import importlib
import importlib.util
import inspect
import logging
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

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
from worker.daemon.settings import PYTHON_MODULES, SettingsError, python_modules
from worker.errors import ErrorType

if TYPE_CHECKING:
    from worker.connectors.python_pool import ChildPool

_CALLABLE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
ISOLATIONS = ("thread", "process")


@dataclass(frozen=True)
class PythonConfig:
    target: str
    func: Callable[..., Any] | None  # None with isolation "process": the child loads it
    options: dict[str, Any]
    isolation: str = "thread"


class PythonConnector(Connector):
    """Calls `callable` with the run's context.

    The function receives a `RunContext` (config, state, log, record_error and,
    for async functions, `conn`: the run's transaction on the control database)
    and returns a `RunResult`, a dict with the same keys, or None.  Sync functions
    run in a thread; a timeout fails the run but cannot stop the thread itself.
    With `"isolation": "process"` the function runs in a child process instead
    (`python_pool.py`): a crash there fails the run, a timeout kills the child.

    Only modules allowed by SYNCWORKER_PYTHON_MODULES (or registered by a plugin)
    may be called; that is checked before the module is imported.
    """

    kind = "python"

    def __init__(self) -> None:
        self._children: ChildPool | None = None

    def validate(self, config: Mapping[str, Any]) -> PythonConfig:
        target = require(config, "callable", str, '"module:function"')
        if not _CALLABLE.match(target):
            raise ConfigError("callable", f'expected "module:function", got {target!r}')
        options = expect(config, "options", dict, "an object passed to the function", {})
        isolation = expect(config, "isolation", str, '"thread" or "process"', "thread")
        if isolation not in ISOLATIONS:
            raise ConfigError("isolation", f'expected "thread" or "process", got {isolation!r:.60}')
        module = target.partition(":")[0]
        check_allowed(module)  # before anything of the module runs
        if isolation == "process":
            # Nothing of the job runs in the worker: only whether its package can be found.
            _find(module, target)
            return PythonConfig(target, None, dict(options), isolation)
        # Importing here lets `syncworker check` catch a typo before the first run.
        return PythonConfig(target, load_callable(target), dict(options))

    async def run(self, ctx: RunContext) -> RunResult:
        config: PythonConfig = ctx.config
        if config.isolation == "process":
            return await self._in_child(ctx)
        func = config.func
        assert func is not None
        try:
            if inspect.iscoroutinefunction(func):
                returned = await func(ctx)
            else:
                returned = await _in_daemon_thread(func, ctx)
            if inspect.isawaitable(returned):
                returned = await returned
        except (SystemExit, KeyboardInterrupt) as exc:
            raise exit_error(exc, config.target) from None
        return as_result(returned, config.target)

    async def _in_child(self, ctx: RunContext) -> RunResult:
        from worker.connectors.python_child import Task
        from worker.connectors.python_pool import ChildPool

        if self._children is None:
            self._children = ChildPool()
        config: PythonConfig = ctx.config
        task = Task(
            target=config.target,
            options=config.options,
            state=ctx.state,
            name=ctx.name,
            run_id=ctx.run_id,
            integration_id=ctx.integration_id,
            trigger=ctx.trigger,
            dry_run=ctx.dry_run,
            period_seconds=ctx.period_seconds,
            log_level=logging.getLogger().getEffectiveLevel(),
        )
        return await self._children.run(task, ctx)

    def close(self) -> None:
        """Stop the child processes of isolated jobs (the worker is stopping)."""
        if self._children is not None:
            self._children.close()
            self._children = None


def check_allowed(module: str) -> None:
    """EnvironmentProblem unless `module` is within SYNCWORKER_PYTHON_MODULES or a plugin's module.

    A prefix allows the module itself and its submodules: `reports` allows `reports` and
    `reports.daily`, not `reportsx`.  The list is this process's (the worker's environment).
    """
    try:
        allowed = python_modules()
    except SettingsError as exc:
        raise EnvironmentProblem("callable", f"{PYTHON_MODULES.env}: {exc}") from None
    if within(module, allowed) or within(module, plugin_modules()):
        return
    fix = f"set {PYTHON_MODULES.env}={','.join([*allowed, module])}"
    if allowed:
        problem = f"module {module} is not among the modules python jobs may call; to allow it, {fix}"
    else:
        problem = (
            f"python jobs may only call modules listed in {PYTHON_MODULES.env}, which is not set; "
            f"to allow this one, {fix}"
        )
    raise EnvironmentProblem("callable", problem)


def within(module: str, prefixes: Iterable[str]) -> bool:
    """Is `module` one of `prefixes` or a submodule of one?"""
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def plugin_modules() -> list[str]:
    """The modules plugins register in the `syncworker.connectors` entry point group."""
    from worker.connectors import ENTRY_POINT_GROUP

    return [ep.module for ep in entry_points(group=ENTRY_POINT_GROUP)]


def _find(module: str, target: str) -> None:
    """EnvironmentProblem if the module's top-level package cannot be found (nothing is run)."""
    top = module.partition(".")[0]
    try:
        found = importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise EnvironmentProblem("callable", f"cannot load {target}: no module named {top!r}")


def load_callable(target: str) -> Callable[..., Any]:
    """Import "module:function" and return the function (ConfigError if it cannot be)."""
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


def exit_error(exc: BaseException, target: str) -> SyncError:
    """A job calling sys.exit() must not take the whole worker (or its child) down with it."""
    return SyncError(f"{target} raised {type(exc).__name__}({exc})", error_type=ErrorType.EXCEPTION)


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


def as_result(returned: Any, target: str) -> RunResult:
    """What the job returned, as a RunResult (bad_result if it is not one)."""
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
