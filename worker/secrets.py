"""Secret references in job config ({"env": NAME} or {"file": PATH}) and their redaction.

A resolved secret is remembered and masked from then on in every form it can take on
the wire or in an upstream's echo of a request: as is, percent-encoded (any mix of
encoded and literal characters, either hex case, `+` for a space), JSON-, HTML- or
backslash-escaped, and inside the base64 of a basic-auth `user:password` pair.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import shlex
import stat
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from worker.db import redact_dsn

log = logging.getLogger("syncworker.secrets")

MASK = "***"
# Resolved values shorter than this are too likely to appear by accident in
# ordinary text ("1", "yes") to be masked everywhere. The base64 of a basic-auth
# pair holds the user name and a colon too, so it is masked even for a short password.
_MIN_MASKED_LENGTH = 4
# The longest text one character of a secret can become in an encoded form
# ("%F0%9F%94%91", or a quote under several levels of backslash escaping).
_MAX_CHAR_EXPANSION = 12
_SAFE_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~")
_JSON_SHORT = {"\b": "b", "\f": "f", "\n": "n", "\r": "r", "\t": "t"}
_HTML_NAMED = {"&": "amp", '"': "quot", "'": "(?:apos|#39)", "<": "lt", ">": "gt"}


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
        secret = SECRET_FILES.read(target, field)
    remember(secret)
    return secret


class SecretFiles:
    """Reads `{"file": ...}` secrets, and warns once per file per process about a file that
    others than its owner and group may read (as ssh refuses such a key); it still works.

    The process has one, `SECRET_FILES`.  Errors name the file and why, never what it holds.
    """

    def __init__(self) -> None:
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    def read(self, target: str, field: str) -> str:
        path = Path(target)
        try:
            with path.open("rb") as file:
                self._check_mode(target, os.fstat(file.fileno()).st_mode)
                data = file.read()
        except OSError as exc:
            raise SecretError(f"{field}: cannot read secret file {target}: {exc.strerror}") from None
        try:
            return data.decode().strip()
        except UnicodeDecodeError:
            raise SecretError(f"{field}: cannot read secret file {target}: it is not UTF-8 text") from None

    def _check_mode(self, target: str, mode: int) -> None:
        if not mode & stat.S_IROTH:
            return
        with self._lock:
            if target in self._warned:
                return
            self._warned.add(target)
        log.warning(
            "secret file %s is readable by every user of this host (mode %s): chmod o-r %s",
            target,
            stat.filemode(mode),
            shlex.quote(target),
        )


SECRET_FILES = SecretFiles()


class Redactor:
    """The secrets this process has seen, and one pattern that finds every form of each.

    The process has one, `REDACTOR`: every log line, error and status output is masked
    against it (`redact`).  Secrets are added as they are resolved; none is ever removed.
    """

    def __init__(self) -> None:
        self._known: set[str] = set()  # secrets as resolved
        self._encoded: set[str] = set()  # base64 forms (without padding) of secrets and pairs
        self._pattern: re.Pattern[str] | None = None  # every form of every secret, longest first
        self.longest = 0  # the longest form's length, with room for padding
        self._lock = threading.Lock()

    def remember(self, secret: str) -> None:
        """Mask `secret` (and its encoded forms) from now on."""
        if len(secret) >= _MIN_MASKED_LENGTH:
            self._add({secret}, _base64_forms(secret))

    def remember_credentials(self, username: str, password: str) -> None:
        """Mask a password and the base64 of `username:password`, as sent in basic auth."""
        self.remember(password)
        self._add(set(), _base64_forms(f"{username}:{password}"))

    def redact(self, text: str) -> str:
        """Mask every secret seen so far, in any of its forms, and any DSN password in `text`."""
        if not text:
            return text
        pattern = self._pattern
        if pattern is not None:
            text = pattern.sub(MASK, text)
        return redact_dsn(text)

    def _add(self, texts: set[str], encoded: set[str]) -> None:
        with self._lock:
            if texts <= self._known and encoded <= self._encoded:
                return
            self._known.update(texts)
            self._encoded.update(encoded)
            forms = [(s, _text_pattern(s)) for s in self._known]
            forms += [(s, _text_pattern(s) + "(?:=|%3[dD]){0,2}") for s in self._encoded]
            forms.sort(key=lambda form: len(form[0]), reverse=True)
            self._pattern = re.compile("|".join(pattern for _, pattern in forms))
            self.longest = len(forms[0][0]) + 2


REDACTOR = Redactor()
remember = REDACTOR.remember
remember_credentials = REDACTOR.remember_credentials
redact = REDACTOR.redact


def _base64_forms(text: str) -> set[str]:
    raw = text.encode(errors="surrogateescape")  # an environment variable may hold any bytes
    forms = {base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode()}
    # Without the padding, so that a padded, unpadded or percent-encoded tail all match.
    return {f.rstrip("=") for f in forms if len(f.rstrip("=")) >= _MIN_MASKED_LENGTH}


def _hex(text: str) -> str:
    """A regex for hex digits in either case."""
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in text)


def _char_pattern(c: str) -> str:
    """A regex for one character of a secret, literal or in any encoding it may be shown in."""
    if c in _SAFE_CHARS:
        return re.escape(c)
    code = ord(c)
    forms = [re.escape(c)]
    forms.append("".join("%" + _hex(f"{b:02X}") for b in c.encode(errors="surrogateescape")))  # URL encoding
    if c == " ":
        forms.append(r"\+")  # form encoding
    if c in '"\\/':
        forms.append(r"\\{1,7}" + re.escape(c))  # JSON or shell escaping, nested up to 3 levels
    if c in _JSON_SHORT:
        forms.append(r"\\{1,7}" + _JSON_SHORT[c])
    if code > 0xFFFF:  # JSON escapes a character outside the BMP as a surrogate pair
        high, low = 0xD800 + ((code - 0x10000) >> 10), 0xDC00 + ((code - 0x10000) & 0x3FF)
        forms.append(r"\\u" + _hex(f"{high:04X}") + r"\\u" + _hex(f"{low:04X}"))
    else:
        forms.append(r"\\u" + _hex(f"{code:04X}"))
    if c in _HTML_NAMED:
        forms.append(f"&{_HTML_NAMED[c]};")
    forms.append(f"&#(?:{code}|[xX]{_hex(f'{code:x}')});")
    return "(?:" + "|".join(forms) + ")"


def _text_pattern(secret: str) -> str:
    return "".join(_char_pattern(c) for c in secret)


def redact_excerpt(text: str, limit: int, *, cut: bool = False) -> str:
    """`text` (an upstream's answer, say) on one line, redacted, at most `limit` characters.

    `cut` says that `text` is only the start of something longer: a secret split at its
    end cannot be recognised, so the tail where it could be is dropped too.
    """
    shown = redact(text)
    if cut:
        tail = max(256, REDACTOR.longest * _MAX_CHAR_EXPANSION)  # 256: room for a DSN's password too
        shown = shown[: max(0, len(shown) - tail)]
    # Redact again: joining lines could join the parts of a secret that holds a line break.
    shown = redact(" ".join(shown.split()))
    if cut or len(shown) > limit:
        return shown[: max(0, limit - 1)] + "…"
    return shown


def redact_value(value: Any) -> Any:
    """`redact` applied through JSON-like structures (for error context)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {
            redact(k) if isinstance(k, str) else k: (MASK if is_reference(v) else redact_value(v))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact_value(v) for v in value]
    return value
