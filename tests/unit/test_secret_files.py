"""{"file": ...} secrets: a file others may read gives one warning per file (and still works);
a file that cannot be read is an error that names it and never shows what it holds."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from worker import secrets


def warnings_about(caplog: pytest.LogCaptureFixture, path: Path) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and str(path) in r.getMessage()
    ]


def test_a_secret_file_readable_by_everyone_warns_once_and_still_works(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "stripe key"
    path.write_text("sk_live_from_a_file\n")
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="syncworker.secrets"):
        assert secrets.resolve({"file": str(path)}, "auth.token") == "sk_live_from_a_file"
        assert secrets.resolve({"file": str(path)}, "auth.token") == "sk_live_from_a_file"
    (warning,) = warnings_about(caplog, path)
    assert "readable by every user" in warning and "-rw-r--r--" in warning
    assert f"chmod o-r '{path}'" in warning
    assert "sk_live_from_a_file" not in caplog.text


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o400])
def test_a_secret_file_kept_from_others_gives_no_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: int
) -> None:
    path = tmp_path / f"key-{mode:o}"
    path.write_text("kept-to-the-group")
    path.chmod(mode)
    with caplog.at_level(logging.WARNING, logger="syncworker.secrets"):
        assert secrets.resolve({"file": str(path)}, "dsn") == "kept-to-the-group"
    assert warnings_about(caplog, path) == []


def test_a_secret_file_that_cannot_be_read_is_named_without_its_content(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(secrets.SecretError) as err:
        secrets.resolve({"file": str(missing)}, "dsn")
    assert str(err.value) == f"dsn: cannot read secret file {missing}: No such file or directory"

    binary = tmp_path / "binary"
    binary.write_bytes(b"\xffpassword-in-latin1-\xe9t\xe9")
    binary.chmod(0o600)
    with pytest.raises(secrets.SecretError) as err:
        secrets.resolve({"file": str(binary)}, "dsn")
    assert str(err.value) == f"dsn: cannot read secret file {binary}: it is not UTF-8 text"
    assert "password" not in str(err.value) and err.value.__cause__ is None

    with pytest.raises(secrets.SecretError, match="Is a directory"):
        secrets.resolve({"file": str(tmp_path)}, "dsn")
