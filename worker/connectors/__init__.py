"""Connector registry: built-in kinds and plugins from the `syncworker.connectors` entry points.

A plugin package declares, in its pyproject.toml::

    [project.entry-points."syncworker.connectors"]
    mykind = "mypackage.module:MyConnector"

and `MyConnector` subclasses `worker.connectors.base.Connector`.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from worker.connectors.base import (
    ConfigError,
    Connector,
    FencedError,
    RunContext,
    RunResult,
    SyncError,
)

__all__ = [
    "ConfigError",
    "Connector",
    "FencedError",
    "RunContext",
    "RunResult",
    "SyncError",
    "get",
    "known_kinds",
]

ENTRY_POINT_GROUP = "syncworker.connectors"

# Built-ins are imported on first use so that a worker only pays for the kinds it runs.
BUILTINS = {
    "sql": "worker.connectors.sql:SqlConnector",
    "python": "worker.connectors.python:PythonConnector",
    "http": "worker.connectors.http:HttpConnector",
    "postgres": "worker.connectors.postgres:PostgresConnector",
    "redis": "worker.connectors.redis:RedisConnector",
}

_cache: dict[str, Connector] = {}


def _plugins() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def known_kinds() -> list[str]:
    return sorted({*BUILTINS, *_plugins()})


def get(kind: str) -> Connector:
    """The connector for `kind`; ConfigError if the kind is unknown or its plugin is broken."""
    if kind in _cache:
        return _cache[kind]
    target = BUILTINS.get(kind) or _plugins().get(kind)
    if target is None:
        raise ConfigError("kind", f'unknown kind "{kind}"; known kinds: {", ".join(known_kinds())}')
    try:
        module_name, _, attr = target.partition(":")
        factory = getattr(importlib.import_module(module_name), attr)
        connector = factory()
    except Exception as exc:
        raise ConfigError("kind", f'connector "{kind}" ({target}) failed to load: {exc!r}') from exc
    if not isinstance(connector, Connector):
        raise ConfigError("kind", f'connector "{kind}" ({target}) is not a Connector subclass')
    _cache[kind] = connector
    return connector
