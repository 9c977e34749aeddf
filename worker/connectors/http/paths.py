"""JSON paths into a response body, and the order and lookback of incremental cursors."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

# What `dig` returns for a path that is not there (a present `null` is None).
MISSING = object()


def dig(data: Any, path: str | None) -> Any:
    """The value at a dotted path ("data.items", "links.0.href"); MISSING if absent."""
    if not path:
        return data
    for part in path.split("."):
        if isinstance(data, Mapping) and part in data:
            data = data[part]
        elif isinstance(data, list) and part.isdigit() and int(part) < len(data):
            data = data[int(part)]
        else:
            return MISSING
    return data


def column_value(value: Any) -> Any:
    """A JSON value as the loader takes it: objects and arrays as JSON text."""
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    return value


def _as_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not re.match(r"^\d{4}-\d{2}-\d{2}", value):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def cursor_key(value: Any) -> tuple[int, Any]:
    """A sort key that orders times as times and numbers as numbers."""
    if isinstance(value, bool):
        return (2, str(value))
    if isinstance(value, int | float):
        return (0, value)
    moment = _as_time(value)
    if moment is not None:
        return (1, moment)
    return (2, str(value))


def with_lookback(value: Any, seconds: float) -> Any:
    """The cursor value to send: `seconds` earlier for times and numbers."""
    if not seconds:
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value - seconds if isinstance(value, float) else value - int(seconds)
    moment = _as_time(value)
    if moment is not None:
        earlier = moment - timedelta(seconds=seconds)
        return earlier.isoformat().replace("+00:00", "Z") if str(value).endswith("Z") else earlier.isoformat()
    return value
