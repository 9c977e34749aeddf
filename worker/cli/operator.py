"""Operator commands: pause, resume, enable, disable, resolve, runs, `status --watch`, and
`--json` on every read.

Every write is one call of a SQL function an operator could also run by hand
(`syncworker.pause_job` and the others of schema 0006), so the command line and `psql` say
and do the same.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from worker import db
from worker.cli import common as shared
from worker.cli import environment as cli_environment
from worker.db.queries import Q

Handler = Callable[[argparse.Namespace, db.Target], int]


# long: one declaration per command, read top to bottom
def add_commands(sub: Any, common: argparse.ArgumentParser, commands: dict[str, Handler]) -> None:
    """Add the operator commands to the `syncworker` parser (`sub`: its subparsers)."""
    pause = sub.add_parser(
        "pause", parents=[common], help="stop a job's runs and keep its schedule (resume starts them again)"
    )
    pause.add_argument("name")
    pause.add_argument("--reason", default=None, help="why, shown in status")
    pause.set_defaults(handler=_write("pause_job", "name", "reason"))

    resume = sub.add_parser("resume", parents=[common], help="run a paused job on its schedule again")
    resume.add_argument("name")
    resume.set_defaults(handler=_write("resume_job", "name"))

    enable = sub.add_parser(
        "enable", parents=[common], help="enable a disabled or paused job (clears its reason and retries)"
    )
    enable.add_argument("name")
    enable.set_defaults(handler=_write("enable_job", "name"))

    disable = sub.add_parser("disable", parents=[common], help="disable a job, saying why")
    disable.add_argument("name")
    disable.add_argument("--reason", required=True, help="why, shown in status")
    disable.set_defaults(handler=_write("disable_job", "name", "reason"))

    resolve = sub.add_parser("resolve", parents=[common], help="mark a job's unresolved errors resolved")
    resolve.add_argument("name")
    resolve.add_argument("--type", dest="error_type", default=None, help="only errors of this error_type")
    resolve.set_defaults(handler=cmd_resolve)

    runs = sub.add_parser("runs", parents=[common], help="the latest runs of every job, or those running now")
    runs.add_argument("--running", action="store_true", help="only runs in progress")
    runs.add_argument("--limit", type=shared.positive_int, default=50)
    runs.add_argument("--json", action="store_true", help="print JSON instead of a table")
    runs.set_defaults(handler=cmd_runs)

    check = sub.add_parser(
        "healthcheck",
        parents=[common],
        help="exit 0 if this host's worker answers on its --http address (/healthz), else 1",
    )
    check.add_argument("--http", default=None, help="the worker's --http address (default SYNCWORKER_HTTP)")
    check.add_argument("--timeout", type=_seconds, default=5.0)
    check.set_defaults(handler=cmd_healthcheck)

    # `run --http-insecure` is a plain switch (its variable takes true or false).
    for action in sub.choices["run"]._actions:
        if action.dest == "http_insecure":
            action.nargs = "?"
            action.const = "true"
            action.metavar = "true|false"

    status = sub.choices["status"]
    status.add_argument(
        "--watch",
        nargs="?",
        type=_seconds,
        const=2.0,
        default=None,
        metavar="SECONDS",
        help="print the status again every SECONDS (default 2) until Ctrl-C",
    )
    status.set_defaults(handler=functools.partial(cmd_status, plain=commands["status"]))

    for name, reader in (("history", _history_json), ("errors", _errors_json)):
        parser = sub.choices[name]
        parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
        parser.set_defaults(handler=_json_or(commands[name], reader))
    for name, reporter in (("check", _check_json), ("verify", _verify_json)):
        parser = sub.choices[name]
        parser.add_argument("--json", action="store_true", help="print JSON instead of lines")
        parser.set_defaults(handler=_json_report_or(commands[name], reporter))


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0.1 <= value <= 86400:
        raise argparse.ArgumentTypeError(f"expected between 0.1 and 86400 seconds, got {text!r}")
    return value


def _print_json(value: Any, *, indent: int | None = 2) -> None:
    print(json.dumps(value, default=shared.json_default, indent=indent), flush=True)


# -- writes: one SQL function each ------------------------------------------------------------------


def _write(function: str, *params: str) -> Handler:
    def handler(args: argparse.Namespace, target: db.Target) -> int:
        with shared.connect(target) as conn:
            row = conn.execute(Q[function], {p: getattr(args, p) for p in params}).fetchone()
        assert row is not None
        shared.say_database(target)
        print(f"{args.name}: {row['result']}")
        return 0

    return handler


def cmd_resolve(args: argparse.Namespace, target: db.Target) -> int:
    with shared.connect(target) as conn:
        row = conn.execute(Q["resolve_errors"], {"name": args.name, "error_type": args.error_type}).fetchone()
    assert row is not None
    shared.say_database(target)
    kind = f" {args.error_type}" if args.error_type else ""
    count = int(row["resolved"])
    print(f"{args.name}: {count}{kind} error{'' if count == 1 else 's'} marked resolved")
    return 0


# -- reads --------------------------------------------------------------------------------------------


def cmd_runs(args: argparse.Namespace, target: db.Target) -> int:
    with shared.connect(target) as conn:
        rows = conn.execute(Q["runs"], {"running": args.running, "limit": args.limit}).fetchall()
    shared.say_database(target)
    if args.json:
        _print_json(rows)
        return 0
    if not rows:
        print("no run in progress" if args.running else "no runs yet")
        return 0
    now = datetime.now(UTC)
    print(
        shared.render_table(
            ["RUN", "INTEGRATION", "STATUS", "TRIGGER", "ATTEMPT", "WORKER", "STARTED", "DURATION", "ERROR"],
            [
                [
                    str(r["id"]),
                    r["name"],
                    r["status"] + (" (past its timeout)" if r["past_timeout"] else ""),
                    r["trigger"],
                    str(r["attempt"]),
                    _worker(r),
                    shared.ago(r["started_at"], now),
                    shared.format_ms(r["duration_ms"]),
                    shared.shorten(r["error"] and f"{r['error_type']}: {r['error']}"),
                ]
                for r in rows
            ],
        )
    )
    return 0


def _worker(row: dict[str, Any]) -> str:
    if row["worker_id"] is None:
        return "-"
    where = f"{row['hostname']}:{row['pid']}" if row["hostname"] else "gone"
    return f"w{row['worker_id']} {where}"


def cmd_status(args: argparse.Namespace, target: db.Target, *, plain: Handler) -> int:
    if args.watch is None:
        return plain(args, target)
    clear = sys.stdout.isatty() and not args.json
    try:
        while True:
            if clear:
                print("\x1b[H\x1b[2J", end="")
            else:
                print(f"# {datetime.now(UTC).isoformat(timespec='seconds')}", file=sys.stderr)
            if args.json:
                _print_json(_status_rows(target), indent=None)
            else:
                plain(args, target)
                sys.stdout.flush()
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0


def _status_rows(target: db.Target) -> list[dict[str, Any]]:
    with shared.connect(target) as conn:
        rows = conn.execute(Q["status"]).fetchall()
    rows.sort(key=lambda r: (shared.health_rank(r["health"]), r["name"]))
    return rows


def _json_or(table: Handler, reader: Callable[[argparse.Namespace, db.Target], Any]) -> Handler:
    def handler(args: argparse.Namespace, target: db.Target) -> int:
        if not args.json:
            return table(args, target)
        rows = reader(args, target)
        shared.say_database(target)
        _print_json(rows)
        return 0

    return handler


def _history_json(args: argparse.Namespace, target: db.Target) -> list[dict[str, Any]]:
    with shared.connect(target) as conn:
        job_id = shared.integration_id(conn, args.name)
        return conn.execute(Q["history"], {"integration_id": job_id, "limit": args.limit}).fetchall()


def _errors_json(args: argparse.Namespace, target: db.Target) -> list[dict[str, Any]]:
    with shared.connect(target) as conn:
        if args.name is not None:
            shared.integration_id(conn, args.name)
        return conn.execute(Q["unresolved_errors"], {"name": args.name, "limit": args.limit}).fetchall()


def cmd_healthcheck(args: argparse.Namespace, target: db.Target) -> int:
    """For a container's HEALTHCHECK: GET /healthz on the worker of this host (no database)."""
    import os
    import urllib.request

    from worker.daemon.settings import http_address
    from worker.ops.address import parse_address

    address = http_address(args.http if args.http is not None else os.environ.get("SYNCWORKER_HTTP", ""))
    if not address:
        raise shared.CliError(
            "no --http address: set SYNCWORKER_HTTP as for `syncworker run`", names_database=True
        )
    host, port = parse_address(address)
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    url = f"http://[{host}]:{port}/healthz" if ":" in host else f"http://{host}:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as response:
            ok = response.status == 200
    except OSError as exc:
        raise shared.CliError(f"{url}: {exc}", names_database=True) from None
    print(f"{url}: {'ok' if ok else 'not ok'}")
    return 0 if ok else 1


def _json_report_or(lines: Handler, reporter: Handler) -> Handler:
    def handler(args: argparse.Namespace, target: db.Target) -> int:
        return reporter(args, target) if args.json else lines(args, target)

    return handler


def _check_json(args: argparse.Namespace, target: db.Target) -> int:
    """`check --json`: {"valid": N, "invalid": [...], "unchecked": [...]}; exit 1 if any is invalid."""
    from worker.daemon.settings import allow_superuser_jobs

    with shared.connect(target) as conn:
        rows = conn.execute(Q["all_integrations"]).fetchall()
        found = shared.job_problems(conn, rows, allow_superuser_jobs(args.allow_superuser_jobs))
    shared.say_database(target)
    invalid = [{"name": name, "problem": p.message} for name, p in found if not p.local]
    unchecked = [{"name": name, "problem": p.message} for name, p in found if p.local]
    env = cli_environment.findings(target)
    report = {"valid": len(rows) - len(found), "invalid": invalid, "unchecked": unchecked}
    _print_json(report | {"environment": cli_environment.as_json(env)})
    return 1 if invalid or cli_environment.failed(env) else 0


def _verify_json(args: argparse.Namespace, target: db.Target) -> int:
    """`verify --json`: both sides' row counts and checksums and the keys that differ."""
    from worker.connectors.postgres.tools import ToolError, verify

    try:
        cfg = shared.postgres_job(target, args.name)
        report = verify(cfg, target.url)
    except ToolError as exc:
        raise shared.CliError(str(exc)) from None
    shared.say_database(target)
    _print_json(
        {
            "name": args.name,
            "ok": report.ok,
            "source": {"rows": report.source.rows, "checksum": report.source.checksum},
            "destination": {"rows": report.destination.rows, "checksum": report.destination.checksum},
            "missing": report.missing,
            "extra": report.extra,
            "changed": report.changed,
            "compared_buckets": report.compared_buckets,
            "mismatched_buckets": report.mismatched_buckets,
        }
    )
    return 0 if report.ok else 1
