"""Secret references in job config ({"env": NAME} or {"file": PATH}) and their redaction."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from worker.db import redact_dsn

MASK = "***"
# Resolved values shorter than this are too likely to appear by accident in
# ordinary text ("1", "yes") to be masked everywhere.
_MIN_MASKED_LENGTH = 4

_known: set[str] = set()
_lock = threading.Lock()


class SecretError(ValueError):
    """A secret reference is malformed or cannot be resolved."""


def is_reference(value: object) -> bool:
    return isinstance(value, Mapping) and len(value) == 1 and next(iter(value)) in ("env", "file")


def check_reference(value: object, field: str) -> None:
    """Raise SecretError unless `value` is a well-formed reference (does not resolve it)."""
    if not is_reference(value):
        raise SecretError(
            f'{field}: expected a secret reference like {{"env": "NAME"}} or '
            f'{{"file": "/run/secrets/name"}}, got {type(value).__name__}'
        )
    assert isinstance(value, Mapping)
    target = next(iter(value.values()))
    if not isinstance(target, str) or not target:
        raise SecretError(f"{field}: the secret reference needs a non-empty string")


def resolve(value: object, field: str) -> str:
    """The secret's value; remembered so that it is masked in logs and errors from now on."""
    check_reference(value, field)
    assert isinstance(value, Mapping)
    ((source, target),) = value.items()
    if source == "env":
        if target not in os.environ:
            raise SecretError(f"{field}: environment variable {target} is not set")
        secret = os.environ[target]
    else:
        try:
            secret = Path(target).read_text().strip()
        except OSError as exc:
            raise SecretError(f"{field}: cannot read secret file {target}: {exc.strerror}") from None
    remember(secret)
    return secret


def remember(secret: str) -> None:
    if len(secret) >= _MIN_MASKED_LENGTH:
        with _lock:
            _known.add(secret)


def redact(text: str) -> str:
    """Mask every secret seen so far and any DSN password in `text`."""
    if not text:
        return text
    for secret in sorted(_known, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, MASK)
    return redact_dsn(text)


def redact_value(value: Any) -> Any:
    """`redact` applied through JSON-like structures (for error context)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {k: (MASK if is_reference(v) else redact_value(v)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_value(v) for v in value]
    return value
