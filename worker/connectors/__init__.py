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


class Registry:
    """The kinds this process knows (built-ins and plugins), each loaded once, on first use.

    The process has one, `REGISTRY`; `get` and `known_kinds` are its methods.
    """

    def __init__(self, builtins: dict[str, str] = BUILTINS) -> None:
        self.builtins = builtins
        self._loaded: dict[str, Connector] = {}

    def forget(self) -> None:
        """Load every kind afresh on its next use (a plugin was installed or removed)."""
        self.close()

    def close(self) -> None:
        """Let every loaded connector release what it keeps between runs, and forget them."""
        for connector in self._loaded.values():
            connector.close()
        self._loaded.clear()

    def known_kinds(self) -> list[str]:
        return sorted({*self.builtins, *_plugins()})

    def get(self, kind: str) -> Connector:
        """The connector for `kind`; ConfigError if the kind is unknown or its plugin is broken."""
        if kind in self._loaded:
            return self._loaded[kind]
        target = self.builtins.get(kind) or _plugins().get(kind)
        if target is None:
            raise ConfigError("kind", f'unknown kind "{kind}"; known kinds: {", ".join(self.known_kinds())}')
        try:
            module_name, _, attr = target.partition(":")
            factory = getattr(importlib.import_module(module_name), attr)
            connector = factory()
        except Exception as exc:
            raise ConfigError("kind", f'connector "{kind}" ({target}) failed to load: {exc!r}') from exc
        if not isinstance(connector, Connector):
            raise ConfigError("kind", f'connector "{kind}" ({target}) is not a Connector subclass')
        self._loaded[kind] = connector
        return connector


def _plugins() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


REGISTRY = Registry()
get = REGISTRY.get
known_kinds = REGISTRY.known_kinds
