"""Programmatic alembic: `syncworker migrate` and the tests upgrade the schema through here,
and the worker and the CLI ask here whether a database's schema is the one this code knows.

The revisions are migrations/versions/NNNN_*.py (with their SQL beside them); the newest
file is the head. A worker runs only on a schema at the head: an older one needs
`syncworker migrate`, a newer one (migrated by a newer syncworker) needs this host's
syncworker upgraded. Either way it refuses to start with one line and EXIT_SCHEMA.
"""

from __future__ import annotations

import ast
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import psycopg
from psycopg.rows import tuple_row

from worker import __version__, db

if TYPE_CHECKING:
    from alembic.config import Config

# sysexits.h EX_CONFIG: systemd shows it as `status=78/CONFIG`. The units do not restart a
# worker that exits with it (RestartPreventExitStatus=78): retrying cannot help until someone
# migrates the database or upgrades syncworker.
EXIT_SCHEMA = 78

# The same name as migrations/env.py gives alembic. It is created unqualified, so it lives in
# the first schema of the migrating role's search_path (normally `public`).
VERSION_TABLE = "syncworker_alembic_version"

State = Literal["current", "behind", "ahead", "missing", "unversioned"]

_PROBE = (
    f"SELECT to_regclass('syncworker.integrations') IS NOT NULL, to_regclass('{VERSION_TABLE}') IS NOT NULL"
)
_RECORDED = f"SELECT version_num FROM {VERSION_TABLE}"


def _script_location() -> str:
    # A source checkout has migrations/ next to the package; an installed wheel
    # carries the same files as worker._migrations.
    checkout = Path(__file__).resolve().parents[2] / "migrations"
    if (checkout / "env.py").exists():
        return str(checkout)
    return str(resources.files("worker._migrations"))


def _versions() -> Traversable:
    checkout = Path(__file__).resolve().parents[2] / "migrations"
    if (checkout / "env.py").exists():
        return checkout / "versions"
    return resources.files("worker._migrations") / "versions"


def _config(url: str) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", _script_location())
    cfg.attributes["url"] = url
    return cfg


@lru_cache(maxsize=1)
def known_revisions() -> tuple[str, ...]:
    """Every revision this code carries, oldest first; the last one is the head.

    Read from the `revision` and `down_revision` lines of migrations/versions/*.py, as alembic
    reads them, without importing alembic and SQLAlchemy: every CLI command checks the schema,
    and that import would double its start-up time. A test checks that alembic agrees.
    """
    parents: dict[str, str | None] = {}
    for entry in _versions().iterdir():
        if not entry.name.endswith(".py") or entry.name.startswith("_"):
            continue
        found: dict[str, Any] = {}
        for node in ast.parse(entry.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                target = node.targets[0]
                if isinstance(target, ast.Name) and target.id in ("revision", "down_revision"):
                    found[target.id] = ast.literal_eval(node.value)
        if "revision" in found:
            parents[str(found["revision"])] = found.get("down_revision")
    children: dict[str | None, list[str]] = {}
    for revision, parent in parents.items():
        children.setdefault(parent, []).append(revision)
    chain: list[str] = []
    following = children.get(None, [])
    while following:
        if len(following) > 1:
            after = f"after {chain[-1]}" if chain else "at the start"
            raise RuntimeError(f"the migrations must form one line; {after} come {sorted(following)}")
        chain.append(following[0])
        following = children.get(following[0], [])
    if not chain or len(chain) != len(parents):
        raise RuntimeError(f"migrations off the line from the first: {sorted(set(parents) - set(chain))}")
    return tuple(chain)


def head_revision() -> str:
    return known_revisions()[-1]


def upgrade(url: str, revision: str = "head", *, where: str | None = None) -> None:
    """Bring the schema to `revision`; safe to run again and from several hosts at once.

    Refuses (SchemaMismatch) a database whose schema is newer than this code knows; `where`
    names the database in that message.
    """
    with psycopg.connect(url, autocommit=True, **db.connect_kwargs("syncworker migrate")) as conn:
        try:
            found: SchemaStatus | None = schema_status(conn)
        except SchemaMismatch:
            found = None  # not readable by this role: alembic says why, below
    if found is not None and found.state == "ahead":
        raise SchemaMismatch(found.describe(where or db.describe_target(url)), found)
    from alembic import command

    command.upgrade(_config(url), revision)


def setup_roles(url: str) -> list[str]:
    """Create the syncworker roles that are missing (when this role may) and grant them in this
    database; the statements someone else must run (CREATE ROLE needs CREATEROLE), or [] when
    all is done.

    Migration 0008 does the same; `syncworker migrate` calls this after every upgrade, so that
    roles created by someone else since then get their grants.
    """
    with psycopg.connect(url, autocommit=True, **db.connect_kwargs("syncworker migrate")) as conn:
        row = conn.execute("SELECT syncworker.setup_roles()").fetchone()
    return list(row[0]) if row is not None and row[0] else []


def downgrade(url: str, revision: str) -> None:
    from alembic import command

    command.downgrade(_config(url), revision)


# -- is the schema the one this code knows? ------------------------------------------------


@dataclass(frozen=True)
class SchemaStatus:
    state: State
    recorded: tuple[str, ...]  # the revisions in the version table (one, unless it is odd)
    head: str

    @property
    def ok(self) -> bool:
        return self.state == "current"

    def describe(self, where: str) -> str:
        """One line about the schema in `where` (a database as messages name it)."""
        at = ", ".join(self.recorded)
        if self.state == "current":
            return f"the syncworker schema in {where} is at revision {at}, the newest this syncworker knows"
        if self.state == "missing":
            return f"no syncworker schema in {where}: run `syncworker migrate` first"
        if self.state == "unversioned":
            return (
                f"the syncworker schema in {where} has no recorded revision: no {VERSION_TABLE} table "
                "with a row on this role's search_path (`syncworker migrate` writes it, normally in "
                "public)"
            )
        if self.state == "behind":
            return (
                f"the syncworker schema in {where} is at revision {at}, older than this syncworker "
                f"needs ({self.head}): run `syncworker migrate`"
            )
        return (
            f"the syncworker schema in {where} is at revision {at}, newer than this syncworker "
            f"({__version__}, revisions up to {self.head}) understands: upgrade syncworker on this host"
        )


class SchemaMismatch(Exception):
    """The database's schema is not the one this code runs on; the message says what to do."""

    exit_code = EXIT_SCHEMA

    def __init__(self, message: str, status: SchemaStatus | None = None) -> None:
        super().__init__(message)
        self.status = status


def evaluate(has_tables: bool, recorded: Sequence[str]) -> SchemaStatus:
    """The state of a schema from what the database holds; pure."""
    known = known_revisions()
    head = known[-1]
    found = tuple(recorded)
    state: State
    if not found:
        state = "unversioned" if has_tables else "missing"
    elif any(rev not in known for rev in found):
        state = "ahead"
    elif found == (head,):
        state = "current"
    else:
        state = "behind"
    return SchemaStatus(state, found, head)


def _unreadable(exc: psycopg.Error, where: str) -> SchemaMismatch:
    problem = (exc.diag.message_primary or str(exc)).strip()
    return SchemaMismatch(
        f"cannot check the syncworker schema in {where} ({problem}): grant this login the worker's "
        "role, GRANT syncworker_runner TO <login> (sql/grants.sql)"
    )


def schema_status(conn: psycopg.Connection[Any], where: str = "") -> SchemaStatus:
    """Where `conn`'s database stands against this code's revisions."""
    cur = conn.cursor(row_factory=tuple_row)
    try:
        probe = cur.execute(_PROBE).fetchone()
        assert probe is not None
        recorded = [str(row[0]) for row in cur.execute(_RECORDED).fetchall()] if probe[1] else []
    except psycopg.errors.InsufficientPrivilege as exc:
        raise _unreadable(exc, where or db.describe_target(conn.info.dsn)) from None
    return evaluate(bool(probe[0]), recorded)


async def schema_status_async(conn: psycopg.AsyncConnection[Any], where: str = "") -> SchemaStatus:
    cur = conn.cursor(row_factory=tuple_row)
    try:
        probe = await (await cur.execute(_PROBE)).fetchone()
        assert probe is not None
        recorded = (
            [str(row[0]) for row in await (await cur.execute(_RECORDED)).fetchall()] if probe[1] else []
        )
    except psycopg.errors.InsufficientPrivilege as exc:
        raise _unreadable(exc, where or db.describe_target(conn.info.dsn)) from None
    return evaluate(bool(probe[0]), recorded)


def _mismatch(found: SchemaStatus, where: str, missing: str | None) -> SchemaMismatch:
    if missing is not None and found.state == "missing":
        return SchemaMismatch(missing, found)
    return SchemaMismatch(found.describe(where), found)


def require_head(conn: psycopg.Connection[Any], where: str, *, missing: str | None = None) -> SchemaStatus:
    """Raise SchemaMismatch unless the schema is at this code's head revision.

    `missing` replaces the message for a database without the schema.
    """
    found = schema_status(conn, where)
    if not found.ok:
        raise _mismatch(found, where, missing)
    return found


async def require_head_async(
    conn: psycopg.AsyncConnection[Any], where: str, *, missing: str | None = None
) -> SchemaStatus:
    """The worker's start-up check: raise SchemaMismatch unless the schema is at the head."""
    found = await schema_status_async(conn, where)
    if not found.ok:
        raise _mismatch(found, where, missing)
    return found
