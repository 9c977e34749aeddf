"""`--env-file`: systemd's EnvironmentFile= syntax, and what the CLI does with the file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT
from worker.cli.envfile import EnvFileError, load, parse


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A=1\nB=two words\n", {"A": "1", "B": "two words"}),
        ("  A  =   spaced out   \n", {"A": "spaced out"}),
        ("A=\n", {"A": ""}),
        ("A=x=y\n", {"A": "x=y"}),
        ("A=1\nA=2\n", {"A": "2"}),
        (
            "# comment\n; also a comment\n   # indented comment\nA=1 # not a comment\n",
            {"A": "1 # not a comment"},
        ),
        ("no equals sign here\nA=1\n", {"A": "1"}),
        ("\n\n\nA=1", {"A": "1"}),
        ("A='single  quoted # $HOME \\n'\n", {"A": "single  quoted # $HOME \\n"}),
        ('A="double \\"quoted\\" \\\\ \\$HOME \\x"\n', {"A": 'double "quoted" \\ $HOME \\x'}),
        ("A=$HOME/~/${USER}\n", {"A": "$HOME/~/${USER}"}),
        ("A='multi\nline'\nB=2\n", {"A": "multi\nline", "B": "2"}),
        ('A="joined \\\nline"\n', {"A": "joined line"}),
        ("A=joined \\\nline\nB=2\n", {"A": "joined line", "B": "2"}),
        ("A=back\\\\slash \\# \\'\n", {"A": "back\\slash # '"}),
        ("A='x'\"y\"z\n", {"A": "xyz"}),
        ("A=x'y' \"z\"\n", {"A": "x'y' \"z\""}),
        ("A=  'kept  '  \n", {"A": "kept  "}),
        ("A=trailing\\ \n", {"A": "trailing "}),
        ("A=1\r\nB=2\r\n", {"A": "1", "B": "2"}),
        (
            "SYNCWORKER_DATABASE_URL=postgresql://syncworker:p%40ss@db.internal:5432/app?sslmode=require\n",
            {
                "SYNCWORKER_DATABASE_URL": "postgresql://syncworker:p%40ss@db.internal:5432/app?sslmode=require"
            },
        ),
    ],
)
def test_parse(text: str, expected: dict[str, str]) -> None:
    parsed = parse(text)
    assert parsed.values == expected
    assert parsed.warnings == []


def test_invalid_names_are_skipped_with_a_warning() -> None:
    parsed = parse("export A=1\n1B=2\nC-D=3\nE=4\n", "f.env")
    assert parsed.values == {"E": "4"}
    assert parsed.warnings == [
        "f.env:1: ignoring 'export A': not a variable name",
        "f.env:2: ignoring '1B': not a variable name",
        "f.env:3: ignoring 'C-D': not a variable name",
    ]


def test_line_numbers_count_quoted_newlines() -> None:
    assert parse("A='x\ny'\n-B=1\n", "f").warnings == ["f:3: ignoring '-B': not a variable name"]


def test_the_example_file_parses() -> None:
    parsed = load(str(ROOT / "systemd" / "syncworker.env.example"))
    assert list(parsed.values) == ["SYNCWORKER_DATABASE_URL"]
    assert parsed.warnings == []


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(EnvFileError, match="cannot read the environment file"):
        load(str(tmp_path / "missing.env"))
    (tmp_path / "latin1.env").write_bytes(b"A=caf\xe9\n")
    with pytest.raises(EnvFileError, match="not UTF-8"):
        load(str(tmp_path / "latin1.env"))
    (tmp_path / "bom.env").write_bytes(b"\xef\xbb\xbfA=1\n")
    assert load(str(tmp_path / "bom.env")).values == {"A": "1"}


# -- the CLI ---------------------------------------------------------------------------------


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {
        k: v for k, v in os.environ.items() if not k.startswith(("SYNCWORKER_", "PG")) and k != "DATABASE_URL"
    }
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        env={**base, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_file_names_the_database_and_overrides_the_environment(tmp_path: Path) -> None:
    env_file = tmp_path / "syncworker.env"
    # Port 1: nothing listens there, so the error message shows which database was chosen.
    env_file.write_text("SYNCWORKER_DATABASE_URL='postgresql://u@127.0.0.1:1/from_file'\n")
    for args in (["--env-file", str(env_file), "status"], ["status", "--env-file", str(env_file)]):
        result = _cli(*args, env={"SYNCWORKER_DATABASE_URL": "postgresql://u@127.0.0.1:1/from_env"})
        assert result.returncode == 1
        assert "from_file" in result.stderr and "from_env" not in result.stderr, result.stderr


def test_the_flag_wins_over_the_file(tmp_path: Path) -> None:
    env_file = tmp_path / "syncworker.env"
    env_file.write_text("SYNCWORKER_DATABASE_URL=postgresql://u@127.0.0.1:1/from_file\n")
    result = _cli(
        "status",
        "--env-file",
        str(env_file),
        "--database-url",
        "postgresql://u@127.0.0.1:1/from_flag",
        env={},
    )
    assert result.returncode == 1
    assert "from_flag" in result.stderr and "from_file" not in result.stderr, result.stderr


def test_a_missing_env_file_is_one_line(tmp_path: Path) -> None:
    result = _cli("migrate", "--check", "--env-file", str(tmp_path / "nope.env"), env={})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot read the environment file" in lines[0] and "nope.env" in lines[0]
