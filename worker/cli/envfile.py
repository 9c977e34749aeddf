"""`--env-file PATH`: read KEY=VALUE lines the way systemd's EnvironmentFile= does.

So that `syncworker migrate --env-file /etc/syncworker/syncworker.env` talks to the same
database as the unit that reads that file. The rules (systemd.exec(5), "EnvironmentFile="):

* blank lines, lines without `=` and lines whose first non-blank character is `#` or `;`
  are ignored; whitespace around the name and around the value is dropped;
* an unquoted value keeps its inner whitespace; a backslash keeps the next character as it
  is, and a backslash at the end of a line joins the next line;
* '...' keeps everything up to the next quote verbatim, newlines included;
* "..." does the same, except that a backslash before one of " \\ ` $ gives that character,
  before a newline joins the lines, and before anything else stays a backslash;
* quotes open a quoted piece only at the start of the value or right after another quoted
  piece, which it joins (A='x'"y"z is xyz); after an unquoted character they are plain
  characters (A=x'y' is x'y');
* nothing is expanded: $HOME stays $HOME, ~ stays ~.

A later line sets the same name again. Names that are not valid variable names are skipped
with a warning, as systemd does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BLANK = " \t\r"
_DOUBLE_QUOTE_ESCAPES = '"\\`$'


class EnvFileError(Exception):
    """The file cannot be read."""


@dataclass
class EnvFile:
    values: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def parse(text: str, source: str = "environment file") -> EnvFile:
    """The assignments in `text`, in systemd's EnvironmentFile= syntax."""
    result = EnvFile()
    i, n, line = 0, len(text), 1
    while i < n:
        # Start of a line: skip blanks, then a comment, an empty line, or a name.
        while i < n and text[i] in _BLANK:
            i += 1
        if i >= n:
            break
        if text[i] == "\n":
            i, line = i + 1, line + 1
            continue
        start_line = line
        if text[i] in "#;":
            # A comment ends at the end of its line; a backslash there does not join lines.
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        end_of_line = text.find("\n", i)
        end_of_line = n if end_of_line < 0 else end_of_line
        equals = text.find("=", i, end_of_line)
        if equals < 0:
            i = end_of_line  # no "=": ignored
            continue
        name = text[i:equals].rstrip(_BLANK)
        value, i, line = _value(text, equals + 1, line)
        if _NAME.fullmatch(name):
            result.values[name] = value
        else:
            result.warnings.append(f"{source}:{start_line}: ignoring {name!r}: not a variable name")
    return result


def _value(text: str, i: int, line: int) -> tuple[str, int, int]:
    """The value starting at text[i]; returns it, the index of its line's end, the line number.

    Between pieces (after `=` and after a closing quote) blanks are skipped and a quote opens
    a quoted piece; once an unquoted character is read, quotes are plain characters up to
    the end of the line.
    """
    n = len(text)
    out: list[str] = []
    keep = 0  # trailing blanks of the unquoted part are dropped: out[:keep] is the value
    unquoted = False
    while i < n and text[i] != "\n":
        c = text[i]
        if not unquoted and c in _BLANK:
            i += 1
        elif not unquoted and c == "'":
            close = text.find("'", i + 1)
            close = n if close < 0 else close
            piece = text[i + 1 : close]
            out.extend(piece)
            line += piece.count("\n")
            keep = len(out)
            i = close + 1
        elif not unquoted and c == '"':
            i, line = _double_quoted(text, i + 1, line, out)
            keep = len(out)
        elif c == "\\":
            unquoted = True
            if i + 1 < n:
                if text[i + 1] == "\n":
                    line += 1  # joins the lines
                else:
                    out.append(text[i + 1])
                    keep = len(out)
            i += 2
        else:
            unquoted = True
            out.append(c)
            if c not in _BLANK:
                keep = len(out)
            i += 1
    return "".join(out[:keep]), i, line


def _double_quoted(text: str, i: int, line: int, out: list[str]) -> tuple[int, int]:
    """Append the double-quoted piece starting at text[i] (after its quote) to `out`; returns
    the index after its closing quote and the line number there."""
    n = len(text)
    while i < n and text[i] != '"':
        if text[i] == "\\" and i + 1 < n:
            escaped = text[i + 1]
            if escaped in _DOUBLE_QUOTE_ESCAPES:
                out.append(escaped)
            elif escaped == "\n":
                line += 1  # joins the lines
            else:
                out.extend(("\\", escaped))
            i += 2
            continue
        line += text[i] == "\n"
        out.append(text[i])
        i += 1
    return i + 1, line


def load(path: str) -> EnvFile:
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise EnvFileError(f"cannot read the environment file {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EnvFileError(f"the environment file {path} is not UTF-8: {exc}") from None
    return parse(text.removeprefix("\ufeff"), path)
