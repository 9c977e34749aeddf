"""Operator tools for `postgres` jobs: install the real-time trigger, verify a mirror, drop
the replication slot and publication of a job's logical mode.

Both work on the job's own config (source and destination as the worker sees
them) and talk to the databases with short synchronous sessions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from worker import db, secrets
from worker.connectors import get
from worker.connectors.postgres.config import CHANNEL, PostgresConfig, qualified_name
from worker.connectors.postgres.logical import TAG_SQL, slot_name
from worker.connectors.postgres.tracking import DELETE_TRIGGER, TOMBSTONES, tombstone_statements
from worker.run import hooks

# Keys compared one by one only within this many mismatching hash buckets.
BUCKETS = 256
MAX_BUCKETS_EXPLAINED = 8
MAX_DIFFERENCES_SHOWN = 20

TRIGGER_NAME = "syncworker_notify_change"


class ToolError(Exception):
    """An expected failure, reported in one line."""


def postgres_config(kind: str, config: dict[str, Any], name: str) -> PostgresConfig:
    if kind != "postgres":
        raise ToolError(f"{name} is a {kind} job; this command works on postgres jobs")
    try:
        body, _ = hooks.split(config)  # parsed exactly as the runner parses it
        parsed: PostgresConfig = get("postgres").validate(body)
    except ValueError as exc:
        raise ToolError(f"{name}: invalid configuration: {exc}") from None
    return parsed


@contextmanager
def connect(
    reference: Any, field_name: str, fallback_url: str | None = None
) -> Iterator[psycopg.Connection[Any]]:
    """A session on the database a job's secret reference names (the control database if None)."""
    try:
        url = fallback_url if reference is None else secrets.resolve(reference, field_name)
    except secrets.SecretError as exc:
        raise ToolError(str(exc)) from None
    assert url is not None
    try:
        conn = psycopg.connect(url, autocommit=True, **db.connect_kwargs("syncworker cli"))
    except psycopg.OperationalError as exc:
        raise ToolError(
            f"cannot connect to {db.describe_target(url)}: {db.connection_problem(exc)}"
        ) from None
    with conn:
        conn.execute("SET TimeZone = 'UTC'")
        yield conn


# -- the real-time trigger ---------------------------------------------------------------------


def trigger_statements(table: tuple[str, ...]) -> list[sql.Composed]:
    """A statement-level trigger on `table` that NOTIFYs once per writing transaction.

    Postgres folds identical notifications sent within one transaction into one,
    so however many statements a transaction runs, listeners hear of it once.
    The function lives in the table's schema.
    """
    schema, _, name = qualified_name(table).partition(".")
    function = sql.Identifier(schema, TRIGGER_NAME)
    return [
        sql.SQL(
            """
            CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
              PERFORM pg_notify({channel}, TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME);
              RETURN NULL;
            END $$
            """
        ).format(function=function, channel=sql.Literal(CHANNEL)),
        sql.SQL(
            """
            CREATE OR REPLACE TRIGGER {trigger}
              AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON {table}
              FOR EACH STATEMENT EXECUTE FUNCTION {function}()
            """
        ).format(trigger=sql.Identifier(TRIGGER_NAME), table=sql.Identifier(schema, name), function=function),
    ]


def install_trigger(cfg: PostgresConfig) -> str:
    """Install the trigger on the job's source table; returns a line saying what was done.

    For a job with `"deletes": "hard"`, also the delete trigger that records deleted keys
    in the schema's tombstone table, so that runs find deletes without comparing keys.
    """
    table = cfg.source.table
    if table is None:
        raise ToolError("the job reads a query, not a table: there is no table to put a trigger on")
    name = qualified_name(table)
    schema, _, relname = name.partition(".")
    with connect(cfg.source.dsn, "source.dsn") as conn, conn.transaction():
        if conn.execute("SELECT to_regclass(%s)", [name]).fetchone() == (None,):
            raise ToolError(f"the source has no table {name}")
        for statement in trigger_statements(table):
            conn.execute(statement)
        version = conn.execute("SELECT current_setting('server_version_num')::int").fetchone()
        tombstones = cfg.deletes == "hard" and version is not None and version[0] >= 130000  # xid8
        if tombstones:
            found = conn.execute(
                "SELECT 1 FROM pg_trigger WHERE tgrelid = %s::regclass AND tgname = %s",
                [sql.Identifier(schema, relname).as_string(None), DELETE_TRIGGER],
            ).fetchone()
            for statement in tombstone_statements(schema, relname, cfg.source.key, fresh=found is None):
                conn.execute(statement)
    hint = "" if cfg.realtime else ' (set "realtime": true in the job\'s config for the worker to listen)'
    line = f"installed trigger {TRIGGER_NAME} on {name}: changes notify {CHANNEL}{hint}"
    if tombstones:
        line += f"; deleted keys are recorded in {schema}.{TOMBSTONES}"
    elif cfg.deletes == "hard":
        line += "; deleted keys are not recorded (that needs PostgreSQL 13 or newer)"
    return line


# -- verify ------------------------------------------------------------------------------------


@dataclass
class Side:
    rows: int
    checksum: int
    buckets: dict[int, tuple[int, int]]


@dataclass
class Report:
    source: Side
    destination: Side
    missing: list[str] = field(default_factory=list)  # keys in the source only
    extra: list[str] = field(default_factory=list)  # keys in the destination only
    changed: list[str] = field(default_factory=list)  # same key, other updated_at
    compared_buckets: int = 0
    mismatched_buckets: int = 0

    @property
    def ok(self) -> bool:
        return self.source.rows == self.destination.rows and self.source.checksum == self.destination.checksum


def _fingerprint(cfg: PostgresConfig) -> tuple[sql.Composable, sql.Composable]:
    """Per-row text of (key, updated_at), and the row's bucket by key."""
    key = sql.SQL("concat_ws(',', {})").format(
        sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(k)) for k in cfg.source.key)
    )
    stamp: sql.Composable = sql.SQL("''")
    if cfg.source.updated_at:
        stamp = sql.SQL("coalesce({}::text, '')").format(sql.Identifier(cfg.source.updated_at))
    return sql.SQL("{} || '|' || {}").format(key, stamp), key


def _side(
    conn: psycopg.Connection[Any], relation: sql.Composable, cfg: PostgresConfig, where: sql.Composable
) -> Side:
    text, key = _fingerprint(cfg)
    query = sql.SQL(
        """
        SELECT (('x' || left(md5({key}), 8))::bit(32)::int & {mask}) AS bucket, count(*),
               coalesce(sum(('x' || left(md5({text}), 15))::bit(60)::bigint), 0)
          FROM {relation} WHERE {where} GROUP BY 1
        """
    ).format(key=key, mask=sql.Literal(BUCKETS - 1), text=text, relation=relation, where=where)
    buckets = {b: (int(n), int(s)) for b, n, s in conn.execute(query).fetchall()}
    return Side(
        rows=sum(n for n, _ in buckets.values()),
        checksum=sum(s for _, s in buckets.values()) % (1 << 64),
        buckets=buckets,
    )


def _rows_in(
    conn: psycopg.Connection[Any],
    relation: sql.Composable,
    cfg: PostgresConfig,
    where: sql.Composable,
    buckets: list[int],
) -> dict[str, str]:
    text, key = _fingerprint(cfg)
    query = sql.SQL(
        "SELECT {key}, {text} FROM {relation} WHERE {where}"
        " AND (('x' || left(md5({key}), 8))::bit(32)::int & {mask}) = ANY(%s)"
    ).format(key=key, text=text, relation=relation, where=where, mask=sql.Literal(BUCKETS - 1))
    return {k: t for k, t in conn.execute(query, [buckets]).fetchall()}


def verify(cfg: PostgresConfig, control_url: str) -> Report:
    """Compare counts and a checksum of (key, updated_at); explain a mismatch key by key."""
    live: sql.Composable = sql.SQL("TRUE")
    if cfg.soft_delete_column:
        col = sql.Identifier(cfg.soft_delete_column)
        live = sql.SQL("NOT ({c} IS NOT NULL AND {c}::text NOT IN ('false', 'f'))").format(c=col)
    dest_rel = cfg.destination.identifier()
    # One snapshot per side, so that the counts and the buckets agree with each other.
    with (
        connect(cfg.source.dsn, "source.dsn") as src,
        connect(cfg.destination.dsn, "destination.dsn", control_url) as dst,
        src.transaction(),
        dst.transaction(),
    ):
        src.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        dst.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        try:
            report = Report(
                _side(src, cfg.source.relation(), cfg, live), _side(dst, dest_rel, cfg, sql.SQL("TRUE"))
            )
        except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn) as exc:
            raise ToolError(exc.diag.message_primary or str(exc)) from None
        differing = sorted(
            b
            for b in set(report.source.buckets) | set(report.destination.buckets)
            if report.source.buckets.get(b) != report.destination.buckets.get(b)
        )
        report.compared_buckets = len(set(report.source.buckets) | set(report.destination.buckets))
        report.mismatched_buckets = len(differing)
        explain = differing[:MAX_BUCKETS_EXPLAINED]
        if explain:
            there = _rows_in(src, cfg.source.relation(), cfg, live, explain)
            here = _rows_in(dst, dest_rel, cfg, sql.SQL("TRUE"), explain)
            report.missing = sorted(set(there) - set(here))
            report.extra = sorted(set(here) - set(there))
            report.changed = sorted(k for k in set(there) & set(here) if there[k] != here[k])
    return report


def describe(report: Report, cfg: PostgresConfig) -> list[str]:
    src, dst = report.source, report.destination
    lines = [
        f"source {cfg.source.name}: {src.rows} rows, checksum {src.checksum:016x}",
        f"destination {cfg.destination.name}: {dst.rows} rows, checksum {dst.checksum:016x}",
    ]
    if report.ok:
        lines.append("match: same keys" + (" and updated_at values" if cfg.source.updated_at else ""))
        return lines
    lines.append(f"MISMATCH in {report.mismatched_buckets} of {report.compared_buckets} key buckets")
    for label, keys in (
        ("missing in the destination", report.missing),
        ("not in the source (extra in the destination)", report.extra),
        ("different updated_at", report.changed),
    ):
        if keys:
            shown = ", ".join(keys[:MAX_DIFFERENCES_SHOWN]) + (
                " …" if len(keys) > MAX_DIFFERENCES_SHOWN else ""
            )
            lines.append(f"{label}: {len(keys)} key(s): {shown}")
    if report.mismatched_buckets > MAX_BUCKETS_EXPLAINED:
        lines.append(f"(keys listed from the first {MAX_BUCKETS_EXPLAINED} mismatching buckets only)")
    return lines


# -- drop-slot ---------------------------------------------------------------------------------


def job_slot_name(job_id: int, control_url: str) -> str:
    """The name of a job's replication slot and publication (see `logical`)."""
    with connect(None, "", control_url) as conn:
        row = conn.execute(TAG_SQL).fetchone()
    assert row is not None
    return slot_name(job_id, row[0])


def drop_slot(cfg: PostgresConfig, job_id: int, control_url: str) -> str:
    """Drop the job's replication slot and publication on its source; a line saying what was done.

    The slot holds WAL on the source for as long as it exists: drop it when the job is removed
    or leaves `"changes": "logical"`.
    """
    name = job_slot_name(job_id, control_url)
    dropped = []
    with connect(cfg.source.dsn, "source.dsn") as conn:
        try:
            found = conn.execute(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", [name]
            ).fetchone()
            if found is not None and found[0] is not None:
                raise ToolError(
                    f"the replication slot {name} is in use by process {found[0]} on the source"
                    " (a run in progress?): try again when it is done"
                )
            if found is not None:
                conn.execute("SELECT pg_drop_replication_slot(%s)", [name])
                dropped.append(f"replication slot {name}")
            if conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", [name]).fetchone():
                conn.execute(sql.SQL("DROP PUBLICATION {}").format(sql.Identifier(name)))
                dropped.append(f"publication {name}")
        except psycopg.Error as exc:
            if isinstance(exc, psycopg.OperationalError):
                raise
            raise ToolError(f"cannot drop {name} on the source: {exc.diag.message_primary or exc}") from None
    line = (
        f"dropped the {' and the '.join(dropped)} on the source"
        if dropped
        else (f"no replication slot or publication {name} on the source: nothing to drop")
    )
    if cfg.logical:
        line += (
            '; the job still has "changes": "logical": its next run creates them again and copies'
            " the table in full (pause or delete the job first)"
        )
    return line
