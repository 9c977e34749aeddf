"""Every error_type the code writes is one of worker.errors.ErrorType, and the README lists them all."""

from __future__ import annotations

import re

from helpers import ROOT
from worker.errors import ErrorType

WRITTEN = re.compile(
    r"""error_type\s*=\s*["']([a-z_]+)["']|Failure\(\s*["']([a-z_]+)["']|["']error_type["']:\s*["']([a-z_]+)["']"""
)


def test_every_error_type_written_is_in_the_enumeration() -> None:
    used: dict[str, str] = {}
    for path in [*(ROOT / "worker").rglob("*.py"), *(ROOT / "migrations" / "versions").glob("*.sql")]:
        for match in WRITTEN.finditer(path.read_text()):
            used[next(g for g in match.groups() if g)] = str(path.relative_to(ROOT))
    for path in (ROOT / "migrations" / "versions").glob("*.sql"):
        for match in re.finditer(
            r"INSERT INTO syncworker\.sync_errors[^;]*?VALUES \([^,]+, [^,]+, '([a-z_]+)'", path.read_text()
        ):
            used[match.group(1)] = str(path.relative_to(ROOT))
    unknown = {code: where for code, where in used.items() if code not in set(ErrorType)}
    assert not unknown, f"error types missing from worker/errors.py: {unknown}"
    assert {"abandoned", "internal"} <= set(used)  # written by the schema's functions


def test_the_readme_lists_every_error_type() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [code.value for code in ErrorType if f"| `{code.value}` |" not in readme]
    assert not missing, f"README's error type table lacks {missing}"
