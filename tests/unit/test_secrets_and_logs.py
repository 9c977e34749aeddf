"""Secret references, redaction, and log lines that carry the run and hide secrets."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest

from worker import logs, secrets
from worker.db import redact_dsn


def test_resolve_env_and_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SW_UNIT_TOKEN", "tok-123456")
    assert secrets.resolve({"env": "SW_UNIT_TOKEN"}, "auth.token") == "tok-123456"
    path = tmp_path / "secret"
    path.write_text("file-secret-value\n")
    assert secrets.resolve({"file": str(path)}, "dsn") == "file-secret-value"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("inline-token", "auth.token: expected a secret reference"),
        ({"vault": "x"}, "auth.token: expected a secret reference"),
        ({"env": ""}, "needs a non-empty string"),
        ({"env": "SW_UNIT_SURELY_UNSET"}, "environment variable SW_UNIT_SURELY_UNSET is not set"),
        ({"file": "/nonexistent/secret"}, "cannot read secret file /nonexistent/secret"),
    ],
)
def test_bad_references_say_what_is_wrong(value: object, message: str) -> None:
    with pytest.raises(secrets.SecretError, match=message):
        secrets.resolve(value, "auth.token")


def test_resolved_secrets_are_masked_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SW_UNIT_KEY", "sk_live_abcdef")
    secrets.resolve({"env": "SW_UNIT_KEY"}, "key")
    assert secrets.redact("401 for key sk_live_abcdef") == "401 for key ***"
    assert secrets.redact_value({"a": ["sk_live_abcdef"], "ref": {"env": "X"}}) == {
        "a": ["***"],
        "ref": "***",
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("postgresql://app:pa55@db:5432/x", "postgresql://app:***@db:5432/x"),
        ("host=db password=pa55 user=app", "host=db password=*** user=app"),
        ("postgresql://db/x?password=pa55&sslmode=require", "postgresql://db/x?password=***&sslmode=require"),
        ("postgresql://app@db/x", "postgresql://app@db/x"),
    ],
)
def test_dsn_passwords_are_masked(text: str, expected: str) -> None:
    assert redact_dsn(text) == expected


def _capture(fmt: str) -> tuple[io.StringIO, logging.Logger]:
    logs.setup(fmt, "info")
    stream = io.StringIO()
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    return stream, logging.getLogger("syncworker.test")


def test_json_lines_carry_integration_and_run_and_mask_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SW_UNIT_PW", "hunter2-secret")
    secrets.resolve({"env": "SW_UNIT_PW"}, "password")
    stream, log = _capture("json")
    logs.bind("stripe-charges", 42)
    log.info("connecting with %s", "hunter2-secret")
    try:
        raise ValueError("bad password hunter2-secret")
    except ValueError:
        log.exception("failed")
    logs.bind(None, None)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["integration"] == "stripe-charges" and first["run_id"] == 42
    assert first["message"] == "connecting with ***" and first["level"] == "INFO"
    assert "hunter2-secret" not in stream.getvalue() and "ValueError" in second["exc_info"]


def test_text_lines_name_the_run() -> None:
    stream, log = _capture("text")
    logs.bind("nightly", 7)
    log.info("hello")
    logs.bind(None, None)
    assert "[nightly run=7]: hello" in stream.getvalue()
