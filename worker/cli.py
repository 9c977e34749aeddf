"""The `syncworker` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, NoReturn

import psycopg
from psycopg.rows import dict_row

from worker import __version__, db
from worker.connectors.base import ConfigError
from worker.queries import Q
from worker.settings import SETTINGS, Settings, SettingsError


class CliError(Exception):
    """An expected failure: printed as one line, exit status 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument(
        "--database-url",
        metavar="URL",
        help="PostgreSQL URL (default: SYNCWORKER_DATABASE_URL, DATABASE_URL, or PG* variables)",
    )
    parser = _Parser(prog="syncworker", description="Run data sync jobs defined as rows in Postgres.")
    parser.add_argument("--version", action="version", version=f"syncworker {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    sub.add_parser("migrate", parents=[common], help="create or upgrade the syncworker schema")

    run = sub.add_parser("run", parents=[common], help="run the worker daemon")
    for setting in SETTINGS:
        run.add_argument(
            setting.flag,
            dest=setting.name,
            metavar=setting.name.split("_")[-1].upper(),
            help=f"{setting.help} (env {setting.env}, default {setting.default})",
        )

    status = sub.add_parser("status", parents=[common], help="one line per integration")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")

    trigger = sub.add_parser("trigger", parents=[common], help="run an integration now")
    trigger.add_argument("name")

    history = sub.add_parser("history", parents=[common], help="the latest runs of an integration")
    history.add_argument("name")
    history.add_argument("--limit", type=_positive, default=20)

    errors = sub.add_parser("errors", parents=[common], help="unresolved errors, newest first")
    errors.add_argument("name", nargs="?", help="only this integration")
    errors.add_argument("--limit", type=_positive, default=50)

    once = sub.add_parser("run-once", parents=[common], help="run one integration now, in the foreground")
    once.add_argument("name")
    once.add_argument("--dry-run", action="store_true", help="show what would change; write nothing")
    once.add_argument("--log-format", choices=["text", "json"], default="text")

    install = sub.add_parser(
        "install-trigger",
        parents=[common],
        help="install the real-time trigger on a postgres job's source table",
    )
    install.add_argument("name")

    verify = sub.add_parser(
        "verify",
        parents=[common],
        help="compare a postgres job's source and destination (row counts, checksum of key and updated_at)",
    )
    verify.add_argument("name")

    sub.add_parser(
        "check",
        parents=[common],
        help="validate every integration's kind, config and schedule without running anything",
    )
    return parser


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    url = args.database_url if args.database_url is not None else db.database_url()
    handler: Callable[[argparse.Namespace, str], int] = COMMANDS[args.command]
    try:
        return handler(args, url)
    except (CliError, SettingsError) as exc:
        _fail(str(exc))
    except psycopg.errors.UndefinedTable:
        _fail(f"no syncworker schema in {db.describe_target(url)}: run `syncworker migrate` first")
    except psycopg.errors.UndefinedFunction:
        _fail(f"the syncworker schema in {db.describe_target(url)} is out of date: run `syncworker migrate`")
    except psycopg.OperationalError as exc:
        _fail(f"cannot connect to {db.describe_target(url)}: {db.connection_problem(exc)}")
    except psycopg.Error as exc:
        message = (exc.diag.message_primary or str(exc)).strip()
        hint = f" ({exc.diag.message_hint})" if exc.diag.message_hint else ""
        _fail(message + hint)
    except KeyboardInterrupt:
        return 130


def _fail(message: str) -> NoReturn:
    print(f"syncworker: error: {message}", file=sys.stderr)
    raise SystemExit(1)


def _connect(url: str) -> psycopg.Connection[dict[str, Any]]:
    return psycopg.connect(url, autocommit=True, row_factory=dict_row, **db.connect_kwargs("syncworker cli"))


# -- commands -----------------------------------------------------------------------------


def cmd_migrate(args: argparse.Namespace, url: str) -> int:
    from worker.migrate import head_revision, upgrade

    with _connect(url):
        pass  # a clear "cannot connect" before alembic's longer traceback-shaped errors
    upgrade(url)
    print(f"schema syncworker is at revision {head_revision()} in {db.describe_target(url)}")
    return 0


def cmd_run(args: argparse.Namespace, url: str) -> int:
    from worker import logs
    from worker.daemon import StartupError, Worker

    settings = Settings.load({s.name: getattr(args, s.name) for s in SETTINGS}, database_url=url)
    logs.setup(settings.log_format, settings.log_level)
    try:
        return asyncio.run(Worker(settings).run())
    except StartupError as exc:
        raise CliError(str(exc)) from None


def cmd_status(args: argparse.Namespace, url: str) -> int:
    with _connect(url) as conn:
        rows = conn.execute(Q["status"]).fetchall()
    if args.json:
        print(json.dumps(rows, default=str, indent=2))
        return 0
    if not rows:
        print(
            "no integrations yet: INSERT INTO syncworker.integrations (name, kind, config, ...) VALUES (...)"
        )
        return 0
    now = datetime.now(UTC)
    table = [
        [
            r["name"],
            r["kind"],
            r["health"],
            r["schedule"],
            "running" if r["running"] else (r["last_status"] or "-"),
            _ago(r["last_sync_at"], now),
            _until(r["next_sync_at"], now),
            str(r["retry_count"]),
            str(r["runs_24h"]),
            _percent(r["success_rate_24h"]),
            _ms(r["mean_duration_ms_24h"]),
            str(r["unresolved_errors"]),
            _short(r["problem"]),
        ]
        for r in rows
    ]
    print(
        _table(
            [
                "NAME",
                "KIND",
                "HEALTH",
                "SCHEDULE",
                "LAST",
                "LAST RUN",
                "NEXT RUN",
                "RETRIES",
                "RUNS 24H",
                "OK 24H",
                "AVG",
                "ERRORS",
                "PROBLEM",
            ],
            table,
        )
    )
    return 0


def cmd_trigger(args: argparse.Namespace, url: str) -> int:
    with _connect(url) as conn:
        row = conn.execute(Q["trigger_sync"], {"name": args.name}).fetchone()
    assert row is not None
    print(f"{args.name}: {row['result']}")
    return 0


def _integration(conn: psycopg.Connection[dict[str, Any]], name: str) -> dict[str, Any]:
    row = conn.execute(Q["integration_by_name"], {"name": name}).fetchone()
    if row is None:
        raise CliError(f'no integration named "{name}"')
    return row


def cmd_history(args: argparse.Namespace, url: str) -> int:
    with _connect(url) as conn:
        job = _integration(conn, args.name)
        rows = conn.execute(Q["history"], {"integration_id": job["id"], "limit": args.limit}).fetchall()
    if not rows:
        print(f"{args.name} has not run yet")
        return 0
    now = datetime.now(UTC)
    print(
        _table(
            [
                "RUN",
                "STATUS",
                "TRIGGER",
                "ATTEMPT",
                "STARTED",
                "DURATION",
                "RECORDS",
                "FAILED",
                "ERROR",
            ],
            [
                [
                    str(r["id"]),
                    r["status"],
                    r["trigger"],
                    str(r["attempt"]),
                    _ago(r["started_at"], now),
                    _ms(r["duration_ms"]),
                    str(r["records_processed"]),
                    str(r["records_failed"]),
                    _short(r["error"] and f"{r['error_type']}: {r['error']}"),
                ]
                for r in rows
            ],
        )
    )
    return 0


def cmd_errors(args: argparse.Namespace, url: str) -> int:
    with _connect(url) as conn:
        if args.name is not None:
            _integration(conn, args.name)
        rows = conn.execute(Q["unresolved_errors"], {"name": args.name, "limit": args.limit}).fetchall()
    if not rows:
        print("no unresolved errors")
        return 0
    now = datetime.now(UTC)
    print(
        _table(
            ["ID", "INTEGRATION", "WHEN", "TYPE", "RECORD", "RUN", "MESSAGE"],
            [
                [
                    str(r["id"]),
                    r["name"],
                    _ago(r["created_at"], now),
                    r["error_type"],
                    r["record_key"] or "-",
                    str(r["run_id"] or "-"),
                    _short(r["message"], 80),
                ]
                for r in rows
            ],
        )
    )
    return 0


def cmd_check(args: argparse.Namespace, url: str) -> int:
    from worker.validate import problems

    with _connect(url) as conn:
        rows = conn.execute(Q["all_integrations"]).fetchall()
    found = [(row["name"], problem) for row in rows if (problem := problems(row))]
    for name, problem in found:
        print(f"{name}: {problem}")
    if found:
        print(f"{len(found)} of {len(rows)} integrations are invalid", file=sys.stderr)
        return 1
    print(f"all {len(rows)} integrations are valid")
    return 0


def cmd_run_once(args: argparse.Namespace, url: str) -> int:
    from worker import logs
    from worker.oneshot import OneShotError, run_once

    logs.setup(args.log_format, "info")
    try:
        outcome = asyncio.run(run_once(url, args.name, dry_run=args.dry_run))
    except OneShotError as exc:
        raise CliError(str(exc)) from None
    except ConfigError as exc:
        raise CliError(f"{args.name}: invalid configuration: {exc}") from None
    if args.dry_run:
        result = outcome.result
        assert result is not None
        print(
            f"dry run of {args.name}: would insert {result.inserted}, update {result.updated}, "
            f"delete {result.deleted} ({result.records_processed} records read, "
            f"{outcome.failed_records} failed); nothing was written"
        )
        past = {"insert": "inserted", "update": "updated", "delete": "deleted"}
        for change, keys in (result.preview or {}).items():
            if keys:
                print(
                    f"  keys that would be {past.get(change, change)} (first {len(keys)}): {', '.join(keys)}"
                )
        print(f"state after the run would be: {json.dumps(outcome.state, default=str)}")
        return 0
    print(f"{args.name}: run {outcome.run_id} {outcome.status or 'was given up'}")
    return 0 if outcome.status in ("success", "partial") else 1


def _postgres_job(url: str, name: str) -> Any:
    from worker.mirror_tools import postgres_config

    with _connect(url) as conn:
        job = _integration(conn, name)
    return postgres_config(job["kind"], job["config"], name)


def cmd_install_trigger(args: argparse.Namespace, url: str) -> int:
    from worker.mirror_tools import ToolError, install_trigger

    try:
        print(f"{args.name}: {install_trigger(_postgres_job(url, args.name))}")
    except ToolError as exc:
        raise CliError(str(exc)) from None
    return 0


def cmd_verify(args: argparse.Namespace, url: str) -> int:
    from worker.mirror_tools import ToolError, describe, verify

    try:
        cfg = _postgres_job(url, args.name)
        report = verify(cfg, url)
    except ToolError as exc:
        raise CliError(str(exc)) from None
    for line in describe(report, cfg):
        print(f"{args.name}: {line}")
    return 0 if report.ok else 1


COMMANDS: dict[str, Callable[[argparse.Namespace, str], int]] = {
    "migrate": cmd_migrate,
    "run": cmd_run,
    "status": cmd_status,
    "trigger": cmd_trigger,
    "history": cmd_history,
    "errors": cmd_errors,
    "check": cmd_check,
    "run-once": cmd_run_once,
    "install-trigger": cmd_install_trigger,
    "verify": cmd_verify,
}


# -- formatting ---------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(str(cell).ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in [header, *rows]
    ]
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    seconds = abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def _ago(when: datetime | None, now: datetime) -> str:
    return "-" if when is None else f"{_duration((now - when).total_seconds())} ago"


def _until(when: datetime | None, now: datetime) -> str:
    if when is None:
        return "-"
    delta = (when - now).total_seconds()
    return "due now" if delta <= 0 else f"in {_duration(delta)}"


def _percent(rate: Any) -> str:
    return "-" if rate is None else f"{float(rate) * 100:.0f}%"


def _ms(ms: Any) -> str:
    if ms is None:
        return "-"
    ms = float(ms)
    return f"{ms:.0f}ms" if ms < 10_000 else _duration(ms / 1000)


def _short(text: str | None, width: int = 60) -> str:
    if not text:
        return "-"
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


if __name__ == "__main__":
    sys.exit(main())
