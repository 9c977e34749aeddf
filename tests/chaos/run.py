"""Run the chaos suite, print its figures next to their targets, and record them.

    .venv/bin/python -m tests.chaos                 # the full suite, a 5-minute kill storm
    .venv/bin/python -m tests.chaos --minutes 10    # a longer storm (and fuzzer)
    .venv/bin/python -m tests.chaos --short         # about a minute and a half in all
    .venv/bin/python -m tests.chaos --only storm,leaks --no-save

Every scenario creates and drops its own database on SYNCWORKER_TEST_DATABASE_URL's server
and starts real `python -m worker run` replicas.  The Postgres restart happens only when
SYNCWORKER_TEST_RESTART_POSTGRES=1.  The table goes to bench/RESULTS.md (the section
between the chaos markers) unless --no-save.  The exit status is 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import blocked, freeze, fuzz, leaks, sessions, storm
from .harness import Figure


@dataclass(frozen=True)
class Plan:
    """How long the timed parts of the scenarios last."""

    storm_seconds: float
    fuzz_seconds: float
    freeze_seconds: float
    cap: float  # how long to wait for a rescue or a takeover before calling it missed

    @classmethod
    def short(cls) -> Plan:
        return cls(storm_seconds=16, fuzz_seconds=8, freeze_seconds=4, cap=10)

    @classmethod
    def full(cls, minutes: float) -> Plan:
        return cls(
            storm_seconds=minutes * 60, fuzz_seconds=max(30.0, minutes * 12), freeze_seconds=10, cap=30
        )


SCENARIOS: dict[str, Callable[[Path, Plan], list[Figure]]] = {
    "storm": lambda d, p: storm.run(d, p.storm_seconds),
    "blocked": lambda d, p: blocked.run(d, p.cap),
    "freeze": lambda d, p: freeze.run(d, p.freeze_seconds, p.cap),
    "sessions": lambda d, p: sessions.run(d, p.cap),
    "fuzz": lambda d, p: fuzz.run(d, p.fuzz_seconds),
    "leaks": lambda d, p: leaks.run(d),
}


def run_scenario(name: str, workdir: Path, plan: Plan) -> list[Figure]:
    """One scenario's figures; a scenario that breaks down is one missed figure, not a crash."""
    began = time.monotonic()
    try:
        figures = SCENARIOS[name](workdir, plan)
    except Exception as exc:
        traceback.print_exc()
        figures = [Figure(name, "the scenario ran to its end", f"error: {exc}"[:200], "yes", False)]
    figures.append(Figure(figures[0].scenario, "scenario time (s)", f"{time.monotonic() - began:.0f}"))
    return figures


def table(figures: list[Figure]) -> list[str]:
    """A markdown table: scenario, measure, result, target, met."""
    head = ("scenario", "measure", "result", "target", "met")
    cells = [head] + [(f.scenario, f.measure, f.value, f.target, f.verdict) for f in figures]
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]

    def line(row: tuple[str, ...]) -> str:
        return "| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |"

    return [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in cells[1:])]


def code_version() -> str:
    """The commit the workers ran, and whether worker/ or migrations/ differed from it."""
    from helpers import ROOT

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("log", "-1", "--format=%h (%cs)")
    if not commit:
        return "not a git checkout"
    dirty = git("status", "--porcelain", "--", "worker", "migrations")
    return commit + (", with uncommitted changes in worker/ or migrations/" if dirty else "")


def machine() -> list[str]:
    import psutil
    import psycopg

    from helpers import ADMIN_URL, one

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return [
        f"- machine: {cpu}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
        f"{platform.system()} {platform.release()}",
        f"- Python {platform.python_version()}, psycopg {psycopg.__version__}, "
        f"PostgreSQL {one(ADMIN_URL, 'SHOW server_version')}",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average "
        f"{' / '.join(f'{x:.1f}' for x in os.getloadavg())} (1 / 5 / 15 min) at the end",
        f"- code: {code_version()}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="length of the kill storm (default 5)")
    parser.add_argument("--short", action="store_true", help="the ~1.5-minute version (what CI runs)")
    parser.add_argument("--only", help=f"comma-separated scenarios, of: {', '.join(SCENARIOS)}")
    parser.add_argument("--no-save", action="store_true", help="do not write bench/RESULTS.md")
    parser.add_argument(
        "--logs", type=Path, help="keep the worker logs here (default: a temporary directory)"
    )
    args = parser.parse_args(argv)

    names = args.only.split(",") if args.only else list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(unknown)}")
    plan = Plan.short() if args.short else Plan.full(args.minutes)
    workdir = args.logs or Path(tempfile.mkdtemp(prefix="syncworker-chaos-"))
    began = time.monotonic()
    figures: list[Figure] = []
    for name in names:
        print(f"==> {name}", flush=True)
        found = run_scenario(name, workdir / name, plan)
        for figure in found:
            print(
                f"    {figure.measure}: {figure.value}  [{figure.target or '-'}] {figure.verdict}", flush=True
            )
        figures += found
    missed = [f for f in figures if f.ok is False]
    mode = "short (--short)" if args.short else f"full, a {args.minutes:g}-minute kill storm"
    lines = [
        *machine(),
        f"- run: {mode}, scenarios {', '.join(names)}, {time.monotonic() - began:.0f} s in all",
        "",
        *table(figures),
        "",
        f"Targets missed: {len(missed)}"
        + (" (" + "; ".join(f"{f.scenario}: {f.measure}" for f in missed) + ")" if missed else "."),
        "Command: `.venv/bin/python -m tests.chaos` (`--short` for the CI version, "
        "`tests/chaos/test_chaos_short.py`).",
    ]
    print()
    print("\n".join(lines))
    print(f"\nworker logs: {workdir}")
    if not args.no_save:
        from bench.core import save_section

        save_section("chaos", "Chaos", lines)
    return 1 if missed else 0
