"""The `syncworker` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, NoReturn

import psycopg

from worker import __version__, db
from worker.cli import environment as cli_environment
from worker.cli.common import (
    CliError,
    ago,
    connect,
    format_duration,
    format_ms,
    health_rank,
    integration_id,
    job_problems,
    json_default,
    positive_int,
    postgres_job,
    render_table,
    say_database,
    shorten,
)
from worker.connectors.base import ConfigError
from worker.daemon.settings import (
    ALLOW_SUPERUSER_JOBS,
    SETTINGS,
    Settings,
    SettingsError,
    allow_superuser_jobs,
    boolean,
)
from worker.db.environment import Unsuitable
from worker.db.migrate import SchemaMismatch
from worker.db.queries import Q


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


_ENV_FILE_HELP = (
    "read VAR=value lines from PATH as systemd's EnvironmentFile= does (quotes, comments, no "
    "expansion); they replace variables of the same name, flags still win"
)
_DATABASE_URL_HELP = (
    "PostgreSQL URL (postgresql://..., postgresql+psycopg://... or key=value); default: "
    "SYNCWORKER_DATABASE_URL, else DATABASE_URL, else libpq's PG* variables"
)


def build_parser() -> argparse.ArgumentParser:  # long: one declaration per command, read top to bottom
    # --database-url goes before or after the command; after it wins. The command's copy has no
    # default so that it does not overwrite one given before the command.
    common = _Parser(add_help=False)
    common.add_argument("--database-url", metavar="URL", default=argparse.SUPPRESS, help=_DATABASE_URL_HELP)
    common.add_argument("--env-file", metavar="PATH", default=argparse.SUPPRESS, help=_ENV_FILE_HELP)
    parser = _Parser(prog="syncworker", description="Run data sync jobs defined as rows in Postgres.")
    parser.add_argument("--version", action="version", version=f"syncworker {__version__}")
    parser.add_argument("--database-url", metavar="URL", default=None, help=_DATABASE_URL_HELP)
    parser.add_argument("--env-file", metavar="PATH", default=None, help=_ENV_FILE_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    migrate = sub.add_parser("migrate", parents=[common], help="create or upgrade the syncworker schema")
    migrate.add_argument(
        "--yes",
        "-y",
        action="store_true",
        help="migrate even a database chosen by libpq's defaults rather than named, without asking",
    )
    migrate.add_argument(
        "--check",
        action="store_true",
        help="change nothing; exit 0 if the schema is at this version's newest revision, "
        f"else {SchemaMismatch.exit_code} with one line saying what to do",
    )

    run = sub.add_parser("run", parents=[common], help="run the worker daemon")
    for setting in SETTINGS:
        switch = {"nargs": "?", "const": "true"} if setting.parse is boolean else {}
        run.add_argument(
            setting.flag,
            dest=setting.name,
            metavar=setting.name.split("_")[-1].upper(),
            help=f"{setting.help} (env {setting.env}, default {setting.default})",
            **switch,  # type: ignore[arg-type]
        )

    status = sub.add_parser("status", parents=[common], help="one line per integration")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")

    trigger = sub.add_parser("trigger", parents=[common], help="run an integration now")
    trigger.add_argument("name")

    history = sub.add_parser("history", parents=[common], help="the latest runs of an integration")
    history.add_argument("name")
    history.add_argument("--limit", type=positive_int, default=20)

    errors = sub.add_parser("errors", parents=[common], help="unresolved errors, newest first")
    errors.add_argument("name", nargs="?", help="only this integration")
    errors.add_argument("--limit", type=positive_int, default=50)

    once = sub.add_parser("run-once", parents=[common], help="run one integration now, in the foreground")
    once.add_argument("name")
    once.add_argument("--dry-run", action="store_true", help="show what would change; write nothing")
    once.add_argument("--log-format", choices=["text", "json"], default="text")
    _superuser_flag(once)

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

    drop = sub.add_parser(
        "drop-slot",
        parents=[common],
        help="drop the replication slot and publication of a postgres job's logical mode on its source",
    )
    drop.add_argument("name")

    check = sub.add_parser(
        "check",
        parents=[common],
        help="validate every integration's kind, config and schedule without running anything",
    )
    _superuser_flag(check)
    from worker.cli import operator as ops_cli

    ops_cli.add_commands(sub, common, COMMANDS)
    return parser


def _superuser_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        ALLOW_SUPERUSER_JOBS.flag,
        dest="allow_superuser_jobs",
        action="store_true",
        default=None,
        help=f"{ALLOW_SUPERUSER_JOBS.help} (env {ALLOW_SUPERUSER_JOBS.env})",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.env_file is not None:
        _load_env_file(args.env_file)
    if args.database_url is not None and not args.database_url.strip():
        _fail("--database-url is empty")
    target = db.choose_database(args.database_url)
    handler: Callable[[argparse.Namespace, db.Target], int] = (
        getattr(args, "handler", None) or COMMANDS[args.command]
    )
    try:
        return handler(args, target)
    except SettingsError as exc:
        _fail(str(exc))
    except CliError as exc:
        _fail(str(exc) if exc.names_database else f"{exc}; database {target.describe()}")
    except (SchemaMismatch, Unsuitable) as exc:
        _fail(str(exc), exc.exit_code)
    except psycopg.Error as exc:
        _fail(db.database_error(exc, target))
    except KeyboardInterrupt:
        return 130


def _fail(message: str, status: int = 1) -> NoReturn:
    print(f"syncworker: error: {' '.join(message.split())}", file=sys.stderr)
    raise SystemExit(status)


def _load_env_file(path: str) -> None:
    """--env-file: its variables replace the process's own (as the unit's environment would)."""
    from worker.cli.envfile import EnvFileError, load

    try:
        loaded = load(path)
    except EnvFileError as exc:
        _fail(str(exc))
    for warning in loaded.warnings:
        print(f"syncworker: warning: {warning}", file=sys.stderr)
    os.environ.update(loaded.values)


def _check_database(target: db.Target) -> None:
    """Fail now, with the usual one line, if the database cannot be reached or has no schema."""
    connect(target).close()


# -- commands -----------------------------------------------------------------------------


def cmd_migrate(args: argparse.Namespace, target: db.Target) -> int:
    from alembic.util import CommandError
    from sqlalchemy.exc import DBAPIError

    from worker.db.migrate import head_revision, require_head, setup_roles, upgrade

    if args.check:
        with connect(target, schema=False) as conn:
            found = require_head(conn, target.describe(), missing=db.no_schema(target))
        print(found.describe(target.describe()))
        return 0
    # a clear "cannot connect" before alembic's longer traceback-shaped errors
    connect(target, schema=False).close()
    cli_environment.require_writable(target)
    if not target.explicit and not args.yes:
        _confirm_migrate(target)
    try:
        upgrade(target.url, where=target.describe())
    except DBAPIError as exc:
        if isinstance(exc.orig, psycopg.Error):
            raise exc.orig from None
        raise
    except CommandError as exc:  # e.g. the database is at a revision this version does not know
        raise CliError(f"cannot migrate {target.describe()}: {exc}", names_database=True) from None
    print(f"schema syncworker is at revision {head_revision()} in {target.describe()}")
    _report_roles(setup_roles(target.url), target)
    return 0


def _report_roles(todo: list[str], target: db.Target) -> None:
    """The roles' SQL this role could not run (it may not create roles, or grant on the
    database): for someone who may."""
    if not todo:
        print(
            "roles syncworker_runner, syncworker_operator and syncworker_admin are granted in "
            f"{target.describe()}"
        )
        return
    print(
        "syncworker: warning: this role could not set up the syncworker roles (creating them needs "
        "CREATEROLE; the database's privileges, its owner); ask someone who may to run:",
        file=sys.stderr,
    )
    for statement in todo:
        print(f"  {statement}", file=sys.stderr)


def _confirm_migrate(target: db.Target) -> None:
    """A database nobody named is migrated only when a person at a terminal says so."""
    named = f"--database-url or {db.URL_VARIABLES[0]}"
    if not sys.stdin.isatty():
        raise CliError(
            f"not migrating {target.describe()}: this database was not named; name it with {named}, "
            "or pass --yes to migrate it anyway",
            names_database=True,
        )
    print(
        f"syncworker: {target.describe()} was not named with {named}.\n"
        "Create or upgrade the syncworker schema in this database? [y/N] ",
        end="",
        file=sys.stderr,
        flush=True,
    )
    answer = sys.stdin.readline().strip().lower()
    if answer not in ("y", "yes"):
        raise CliError(f"not migrating {target.describe()}: not confirmed", names_database=True)


def cmd_run(args: argparse.Namespace, target: db.Target) -> int:
    import logging

    from worker import logs
    from worker.daemon.worker import StartupError, Worker

    settings = Settings.load({s.name: getattr(args, s.name) for s in SETTINGS}, database_url=target.url)
    if args.python_modules is not None:  # the flag wins; python jobs read the variable when checked
        os.environ["SYNCWORKER_PYTHON_MODULES"] = settings.python_modules
    _check_database(target)
    logs.setup(settings.log_format, settings.log_level)
    logging.getLogger("syncworker.cli").info("database %s", target.describe())
    try:
        return asyncio.run(Worker(settings).run())
    except StartupError as exc:
        raise CliError(str(exc)) from None


def cmd_status(args: argparse.Namespace, target: db.Target) -> int:
    with connect(target) as conn:
        rows = conn.execute(Q["status"]).fetchall()
    rows.sort(key=lambda r: (health_rank(r["health"]), r["name"]))
    say_database(target)
    if args.json:
        print(json.dumps(rows, default=json_default, indent=2))
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
            ago(r["last_sync_at"], now),
            _until(r["next_sync_at"], now) if r["enabled"] else "-",
            str(r["retry_count"]),
            str(r["runs_24h"]),
            _percent(r["success_rate_24h"]),
            format_ms(r["mean_duration_ms_24h"]),
            str(r["unresolved_errors"]),
            shorten(r["problem"]),
        ]
        for r in rows
    ]
    print(
        render_table(
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


def cmd_trigger(args: argparse.Namespace, target: db.Target) -> int:
    with connect(target) as conn:
        row = conn.execute(Q["trigger_sync"], {"name": args.name}).fetchone()
    assert row is not None
    say_database(target)
    print(f"{args.name}: {row['result']}")
    return 0


def cmd_history(args: argparse.Namespace, target: db.Target) -> int:
    with connect(target) as conn:
        rows = conn.execute(
            Q["history"], {"integration_id": integration_id(conn, args.name), "limit": args.limit}
        ).fetchall()
    say_database(target)
    if not rows:
        print(f"{args.name} has not run yet")
        return 0
    now = datetime.now(UTC)
    print(
        render_table(
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
                    ago(r["started_at"], now),
                    format_ms(r["duration_ms"]),
                    str(r["records_processed"]),
                    str(r["records_failed"]),
                    shorten(r["error"] and f"{r['error_type']}: {r['error']}"),
                ]
                for r in rows
            ],
        )
    )
    return 0


def cmd_errors(args: argparse.Namespace, target: db.Target) -> int:
    with connect(target) as conn:
        if args.name is not None:
            integration_id(conn, args.name)
        rows = conn.execute(Q["unresolved_errors"], {"name": args.name, "limit": args.limit}).fetchall()
    say_database(target)
    if not rows:
        print("no unresolved errors")
        return 0
    now = datetime.now(UTC)
    print(
        render_table(
            ["ID", "INTEGRATION", "WHEN", "TYPE", "RECORD", "RUN", "MESSAGE"],
            [
                [
                    str(r["id"]),
                    r["name"],
                    ago(r["created_at"], now),
                    r["error_type"],
                    r["record_key"] or "-",
                    str(r["run_id"] or "-"),
                    shorten(r["message"], 80),
                ]
                for r in rows
            ],
        )
    )
    return 0


def cmd_check(args: argparse.Namespace, target: db.Target) -> int:
    with connect(target) as conn:
        rows = conn.execute(Q["all_integrations"]).fetchall()
        found = job_problems(conn, rows, allow_superuser_jobs(args.allow_superuser_jobs))
    say_database(target)
    invalid = [(name, p) for name, p in found if not p.local]
    for name, problem in invalid:
        print(f"{name}: {problem.message}")
    for name, problem in found:
        if problem.local:
            print(
                f"warning: {name}: cannot be checked from this shell ({problem.message}); "
                "the worker may well have it",
                file=sys.stderr,
            )
    if invalid:
        print(f"{len(invalid)} of {len(rows)} integrations are invalid", file=sys.stderr)
        return 1
    unchecked = len(found) - len(invalid)
    aside = f" ({unchecked} could not be checked from this shell)" if unchecked else ""
    print(f"all {len(rows) - unchecked} integrations are valid{aside}")
    return 0


def cmd_run_once(args: argparse.Namespace, target: db.Target) -> int:
    import logging

    from worker import logs
    from worker.run.once import OneShotError, run_once

    logs.setup(args.log_format, "info")
    _check_database(target)
    try:
        outcome = asyncio.run(
            run_once(
                target.url, args.name, dry_run=args.dry_run, allow_superuser_jobs=args.allow_superuser_jobs
            )
        )
    except OneShotError as exc:
        raise CliError(str(exc)) from None
    except ConfigError as exc:
        raise CliError(f"{args.name}: invalid configuration: {exc}") from None
    logging.getLogger("syncworker.cli").info("database %s", target.describe())
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


def cmd_install_trigger(args: argparse.Namespace, target: db.Target) -> int:
    from worker.connectors.postgres.tools import ToolError, install_trigger

    try:
        done = install_trigger(postgres_job(target, args.name))
    except ToolError as exc:
        raise CliError(str(exc)) from None
    say_database(target)
    print(f"{args.name}: {done}")
    return 0


def cmd_verify(args: argparse.Namespace, target: db.Target) -> int:
    from worker.connectors.postgres.tools import ToolError, describe, verify

    try:
        cfg = postgres_job(target, args.name)
        report = verify(cfg, target.url)
    except ToolError as exc:
        raise CliError(str(exc)) from None
    say_database(target)
    for line in describe(report, cfg):
        print(f"{args.name}: {line}")
    return 0 if report.ok else 1


def cmd_drop_slot(args: argparse.Namespace, target: db.Target) -> int:
    from worker.connectors.postgres.tools import ToolError, drop_slot

    try:
        cfg = postgres_job(target, args.name)
        with connect(target) as conn:
            job_id = integration_id(conn, args.name)
        done = drop_slot(cfg, job_id, target.url)
    except ToolError as exc:
        raise CliError(str(exc)) from None
    say_database(target)
    print(f"{args.name}: {done}")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace, db.Target], int]] = {
    "migrate": cmd_migrate,
    "run": cmd_run,
    "status": cmd_status,
    "trigger": cmd_trigger,
    "history": cmd_history,
    "errors": cmd_errors,
    "check": cli_environment.with_section(cmd_check),
    "run-once": cmd_run_once,
    "install-trigger": cmd_install_trigger,
    "verify": cmd_verify,
    "drop-slot": cmd_drop_slot,
}


# -- formatting ---------------------------------------------------------------------------


def _until(when: datetime | None, now: datetime) -> str:
    if when is None:
        return "-"
    delta = (when - now).total_seconds()
    return "due now" if delta <= 0 else f"in {format_duration(delta)}"


def _percent(rate: Any) -> str:
    return "-" if rate is None else f"{float(rate) * 100:.0f}%"


if __name__ == "__main__":
    sys.exit(main())
