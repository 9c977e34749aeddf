"""Python jobs used by the tests (importable by worker processes through PYTHONPATH)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import psycopg

from worker.connectors.base import RunContext, RunResult


def _note(ctx: RunContext, event: str) -> None:
    """Record an event outside the run's transaction, visible at once to the test."""
    url = os.environ.get("SYNCWORKER_DATABASE_URL") or ctx.config.options["url"]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO public.job_events (integration, run_id, event, pid) VALUES (%s, %s, %s, %s)",
            (ctx.name, ctx.run_id, event, os.getpid()),
        )


def count_up(ctx: RunContext) -> dict[str, Any]:
    """Sync job: increments a counter in its state."""
    return {"records_processed": 3, "state": {"n": int(ctx.state.get("n", 0)) + 1}}


async def fail(ctx: RunContext) -> RunResult:
    raise RuntimeError(ctx.config.options.get("message", "upstream said no"))


async def some_records_fail(ctx: RunContext) -> RunResult:
    ctx.record_error("order-17", "amount is not a number")
    ctx.record_error("order-23", "missing customer id")
    return RunResult(records_processed=10, state={"cursor": "c10"})


async def sleep(ctx: RunContext) -> RunResult:
    """Sleeps `seconds`, noting start and end in public.job_events."""
    await asyncio.to_thread(_note, ctx, "start")
    await asyncio.sleep(float(ctx.config.options.get("seconds", 1)))
    await asyncio.to_thread(_note, ctx, "end")
    return RunResult(records_processed=1, state={"done": True})


def sleep_blocking(ctx: RunContext) -> RunResult:
    _note(ctx, "start")
    time.sleep(float(ctx.config.options.get("seconds", 1)))
    _note(ctx, "end")
    return RunResult(records_processed=1)


async def write_then_sleep(ctx: RunContext) -> RunResult:
    """Writes a row through the run's transaction, checkpoints state, then sleeps."""
    await ctx.conn.execute("INSERT INTO public.job_rows (run_id) VALUES (%s)", (ctx.run_id,))
    await asyncio.to_thread(_note, ctx, "start")
    await asyncio.sleep(float(ctx.config.options.get("seconds", 1)))
    await ctx.conn.execute("INSERT INTO public.job_rows (run_id) VALUES (%s)", (ctx.run_id,))
    return RunResult(records_processed=2, state={"last_run": ctx.run_id})


def not_a_result(ctx: RunContext) -> int:
    return 42


NOT_CALLABLE = 5


async def abandoned_midway(ctx: RunContext) -> RunResult:
    """Writes through its transaction, then finds its run abandoned by someone else."""
    await ctx.conn.execute("INSERT INTO public.job_rows (run_id) VALUES (%s)", (ctx.run_id,))
    url = ctx.config.options["url"]
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as other:
        await other.execute("SELECT syncworker.abandon_run(%s, 'taken away by the test')", (ctx.run_id,))
    return RunResult(records_processed=1, state={"should": "not land"})


def exits(ctx: RunContext) -> None:
    raise SystemExit(3)


def die(ctx: RunContext) -> None:
    """A poison job: ends the whole process, as a segfault or the OOM killer would."""
    os._exit(3)


# -- jobs for "isolation": "process" (each run in a child process of the worker) -----------


def segfault(ctx: RunContext) -> None:
    os.kill(os.getpid(), signal.SIGSEGV)


def where_am_i(ctx: RunContext) -> dict[str, Any]:
    """Logs a line, reports one bad record, and returns its pid with counts and a grown state."""
    ctx.log.info("where_am_i says hello from pid %s", os.getpid())
    ctx.record_error("rec-1", "not a number")
    state = {"n": int(ctx.state.get("n", 0)) + 1, "pid": os.getpid(), "seen": ctx.config.options}
    return {"records_processed": 5, "inserted": 2, "updated": 1, "state": state}


async def where_am_i_async(ctx: RunContext) -> RunResult:
    await asyncio.sleep(0)
    return RunResult(records_processed=1, state={"pid": os.getpid(), "loop": id(asyncio.get_running_loop())})


async def uses_conn(ctx: RunContext) -> RunResult:
    await ctx.conn.execute("SELECT 1")
    return RunResult()


async def idles_in_its_transaction(ctx: RunContext) -> RunResult:
    """Sets a short idle_in_transaction_session_timeout on the run's session, then works
    longer than that without a statement: the server ends the session under the run."""
    await ctx.conn.execute("SET idle_in_transaction_session_timeout = '300ms'")
    await asyncio.sleep(float(ctx.config.options.get("seconds", 2)))
    await ctx.conn.execute("SELECT 1")
    return RunResult(records_processed=1)


def huge_result(ctx: RunContext) -> dict[str, Any]:
    """A state of 65 MiB: more than a job's process may send to the worker."""
    return {"state": {"blob": "x" * (65 * 2**20)}}


async def huge_checkpoint(ctx: RunContext) -> RunResult:
    await ctx.checkpoint({"blob": "x" * (65 * 2**20)})
    return RunResult(records_processed=1)


def huge_log_line(ctx: RunContext) -> dict[str, Any]:
    ctx.log.warning("%s", "y" * 200_000)
    return {"records_processed": 1}
