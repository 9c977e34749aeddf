"""The chaos suite's short version, one test per scenario: every target must be met.

The full version, with the figures in a table: `.venv/bin/python -m tests.chaos`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .run import SCENARIOS, Plan, run_scenario, table

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(240)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_chaos_targets_are_met(scenario: str, tmp_path: Path) -> None:
    figures = run_scenario(scenario, tmp_path, Plan.short())
    print("\n".join(table(figures)))
    missed = [f.describe() for f in figures if f.ok is False]
    assert not missed, "targets missed:\n" + "\n".join(missed)
