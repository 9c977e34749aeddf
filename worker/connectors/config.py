"""The config helpers every connector uses: the error a bad setting raises, typed look-ups,
names (columns, tables, keys) and secret references.

`worker.connectors.base` re-exports them, so a plugin can take them from either place.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from worker import secrets

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*$")


class ConfigError(ValueError):
    """The integration's config is not valid for its kind (error_type config_invalid)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}" if field else problem)
        self.field = field


class EnvironmentProblem(ConfigError):
    """The config may well be right, but this process cannot use it: a module it cannot
    import, a secret it cannot read.  The worker treats it as the job's config problem; an
    operator's command (`check`, `run-once`) run from another shell only warns."""


def require(
    config: Mapping[str, Any], key: str, kind: type | tuple[type, ...], what: str, prefix: str = ""
) -> Any:
    """config[key], which must exist and be of `kind`; else a ConfigError saying `what`.

    `prefix` names the enclosing object in the error ("source" gives "source.key").
    """
    if key not in config:
        raise ConfigError(f"{prefix}.{key}" if prefix else key, f"is required ({what})")
    if config[key] is None:
        raise ConfigError(f"{prefix}.{key}" if prefix else key, f"expected {what}, got null")
    return expect(config, key, kind, what, prefix=prefix)


def expect(
    config: Mapping[str, Any],
    key: str,
    kind: type | tuple[type, ...],
    what: str,
    default: Any = None,
    prefix: str = "",
) -> Any:
    """config.get(key, default), which must be of `kind` when present.

    An explicit `null` is a wrong type, not "use the default": leave the setting out for that.
    """
    if key not in config:
        return default
    value = config[key]
    field = f"{prefix}.{key}" if prefix else key
    if value is None:
        raise ConfigError(field, f"expected {what}, got null (leave the setting out to use its default)")
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise ConfigError(field, f"expected {what}, got a boolean")
    if not isinstance(value, kind):
        raise ConfigError(field, f"expected {what}, got {type(value).__name__} {value!r:.60}")
    return value


def reject_unknown(config: Mapping[str, Any], allowed: set[str], prefix: str = "") -> None:
    """ConfigError for the first key of `config` not in `allowed` (`prefix` names the enclosing object)."""
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise ConfigError(
            f"{prefix}.{unknown[0]}" if prefix else unknown[0],
            f"unknown setting; expected one of {', '.join(sorted(allowed))}",
        )


def identifier(value: object, field: str) -> str:
    if not isinstance(value, str) or not _IDENT.match(value):
        raise ConfigError(field, f"expected a column name (letters, digits, _), got {value!r:.60}")
    return value


def table_name(value: object, field: str) -> tuple[str, ...]:
    if not isinstance(value, str):
        raise ConfigError(field, f'expected a table name like "public.orders", got {value!r:.60}')
    parts = value.split(".")
    if len(parts) > 2 or not all(_IDENT.match(p) for p in parts):
        raise ConfigError(field, f'expected a table name like "public.orders", got {value!r:.60}')
    return tuple(parts)


def key_columns(value: object, field: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ConfigError(field, "expected a column name or a non-empty list of column names")
    names = tuple(identifier(v, f"{field}[{i}]") for i, v in enumerate(value))
    if len(set(names)) != len(names):
        raise ConfigError(field, "lists a column twice")
    return names


def check_secret(config: Mapping[str, Any], key: str, field: str, *, required: bool) -> Any:
    """config[key] as a secret reference (not resolved); None when absent and optional."""
    value = config.get(key)
    if value is None:
        if required:
            raise ConfigError(field, 'is required (a secret reference like {"env": "NAME"})')
        return None
    try:
        secrets.check_reference(value, field)
    except secrets.SecretError as exc:
        raise ConfigError(field, str(exc).removeprefix(f"{field}: ")) from None
    return value
