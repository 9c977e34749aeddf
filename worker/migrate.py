"""Programmatic alembic: `syncworker migrate` and the tests upgrade the schema through here."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from alembic import command
from alembic.config import Config


def _script_location() -> str:
    # A source checkout has migrations/ next to the package; an installed wheel
    # carries the same files as worker._migrations.
    checkout = Path(__file__).resolve().parent.parent / "migrations"
    if (checkout / "env.py").exists():
        return str(checkout)
    return str(resources.files("worker._migrations"))


def _config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", _script_location())
    cfg.attributes["url"] = url
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the schema to `revision`; safe to run again and from several hosts at once."""
    command.upgrade(_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    command.downgrade(_config(url), revision)


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_config("")).get_current_head()
    assert head is not None
    return head
