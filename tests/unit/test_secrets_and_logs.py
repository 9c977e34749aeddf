"""Secret references, redaction, and log lines that carry the run and hide secrets."""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import os
import re
from pathlib import Path
from urllib.parse import quote, quote_plus

import httpx
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


# -- encoded forms ----------------------------------------------------------------------------

# A secret with the characters that encodings change: / + & " \ and a space.
CANARY = 'cnry-5d1e7c0b/+&"\\ q=Z'


def _encoded_forms(user: str, secret: str) -> dict[str, str]:
    """Each form `secret` can take on the wire or in an upstream's echo of the request."""
    url_encoded = quote(secret, safe="")
    return {
        "raw": secret,
        "basic-pair": base64.b64encode(f"{user}:{secret}".encode()).decode(),
        "base64": base64.b64encode(secret.encode()).decode(),
        "quote": quote(secret),
        "quote-nothing-safe": url_encoded,
        "quote-lower-hex": re.sub("%[0-9A-F]{2}", lambda m: m.group(0).lower(), url_encoded),
        "quote-plus-slash-safe": quote_plus(secret, safe="/"),
        # what httpx sends in a query string (the same as quote_plus with nothing safe)
        "httpx-query": httpx.URL("http://h/", params={"k": secret}).query.decode().removeprefix("k="),
        "json": json.dumps(secret)[1:-1],
        "json-twice": json.dumps(json.dumps(secret))[3:-3],
        "json-slash-escaped": json.dumps(secret)[1:-1].replace("/", "\\/"),
        "html": html.escape(secret),
    }


FORMS = list(_encoded_forms("u", CANARY))


@pytest.fixture
def canary(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("SW_UNIT_CANARY", CANARY)
    secrets.resolve({"env": "SW_UNIT_CANARY"}, "auth.password")
    forms = _encoded_forms("u", CANARY)
    assert len(set(forms.values())) == len(forms)  # each case tests something different
    return forms


def _sent_as(form: str) -> None:
    if form == "basic-pair":  # as the http connector's basic auth does
        secrets.remember_credentials("u", CANARY)


@pytest.mark.parametrize("form", FORMS)
def test_every_encoded_form_is_masked(canary: dict[str, str], form: str) -> None:
    _sent_as(form)
    shown = canary[form]
    assert secrets.redact(f"HTTP 400: got {shown}; bye") == "HTTP 400: got ***; bye"
    assert secrets.redact(f"Authorization: Basic {shown}") == "Authorization: Basic ***"
    context = {"headers": {"Authorization": f"Basic {shown}"}, "echo": [shown, 7], shown: "key"}
    assert secrets.redact_value(context) == {
        "headers": {"Authorization": "Basic ***"},
        "echo": ["***", 7],
        "***": "key",
    }


@pytest.mark.parametrize("fmt", ["text", "json"])
@pytest.mark.parametrize("form", FORMS)
def test_log_lines_mask_every_encoded_form(canary: dict[str, str], form: str, fmt: str) -> None:
    _sent_as(form)
    stream, log = _capture(fmt)
    shown = canary[form]
    log.warning("upstream said: %s", shown)
    try:
        raise RuntimeError(f"request failed: {shown}")
    except RuntimeError:
        log.exception("run failed")
    output = stream.getvalue()
    assert canary[form] not in output
    assert "cnry-5d1e7c0b" not in output and "***" in output
    if fmt == "json":
        first, second = (json.loads(line) for line in output.splitlines())
        assert first["message"] == "upstream said: ***" and "request failed: ***" in second["exc_info"]


def test_a_base64_pair_keeps_its_padding_case_and_url_encoding_masked(canary: dict[str, str]) -> None:
    _sent_as("basic-pair")
    pair = canary["basic-pair"]
    assert secrets.redact(f"x {pair.rstrip('=')} y") == "x *** y"
    assert secrets.redact(f"x {quote(pair, safe='')} y") == "x *** y"
    assert secrets.redact(f"x {json.dumps(pair)} y") == 'x "***" y'


def test_text_without_a_secret_is_left_alone(canary: dict[str, str]) -> None:
    text = 'cnry-5d1e7c0b and q=Z and %2F%2B and "quoted \\" text" and Basic dTpjYW5hcnktN2YzYTk='
    assert secrets.redact(text) == text


def test_a_short_secret_is_not_masked_alone_but_its_basic_auth_pair_is() -> None:
    secrets.remember_credentials("service-user", "pw")
    pair = base64.b64encode(b"service-user:pw").decode()
    assert secrets.redact("pw is fine in ordinary text") == "pw is fine in ordinary text"
    assert secrets.redact(f"Authorization: Basic {pair}") == "Authorization: Basic ***"


def test_a_secret_that_is_not_valid_utf8_is_masked_too() -> None:
    secret = os.fsdecode(b"sw-unit-\xff\xfe-key")  # as os.environ holds undecodable bytes
    secrets.remember_credentials("u", secret)
    assert secrets.redact(f"got {secret} and {quote(os.fsencode(secret))}") == "got *** and ***"


def test_an_excerpt_is_one_redacted_line_and_capped(canary: dict[str, str]) -> None:
    body = f"line one\n  Authorization: Bearer {canary['json']}\n" + "x" * 1000
    shown = secrets.redact_excerpt(body, 100)
    assert shown.startswith("line one Authorization: Bearer *** xxx") and shown.endswith("…")
    assert len(shown) == 100
    assert secrets.redact_excerpt("short\nanswer", 100) == "short answer"


def test_an_excerpt_of_a_cut_text_never_shows_part_of_a_secret(canary: dict[str, str]) -> None:
    _sent_as("basic-pair")
    for form in canary.values():
        for keep in range(1, len(form)):
            # (long: the tail dropped grows with the longest secret any earlier test remembered)
            text = f"echo {form} " + "x" * 20_000 + form[:keep]  # the read stopped inside the secret
            shown = secrets.redact_excerpt(text, 1000, cut=True)
            assert shown.startswith("echo *** xxx") and shown.endswith("x…")
            assert form[: max(keep, 4)] not in shown


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_job_name_with_a_newline_cannot_forge_a_log_line(fmt: str) -> None:
    stream, log = _capture(fmt)
    log.info("run started", extra={"integration": "evil\n2026-01-01 00:00:00,000 ERROR forged", "run_id": 7})
    (line,) = stream.getvalue().splitlines()
    if fmt == "text":
        assert "[evil\\n2026-01-01 00:00:00,000 ERROR forged run=7]: run started" in line
    else:
        assert json.loads(line)["integration"] == "evil\n2026-01-01 00:00:00,000 ERROR forged"
