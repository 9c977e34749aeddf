"""Chaos suite: real worker replicas under kills, freezes, cut sessions, hostile rows and secret probes.

Run it with `.venv/bin/python -m tests.chaos` (see `--help`); `test_chaos_short.py` runs the
short version under pytest.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `helpers`, `httpapi` and `jobs` live in tests/ and are imported as top-level modules, as
# pytest does; the repository root holds `bench`.
for _path in (Path(__file__).resolve().parent.parent, Path(__file__).resolve().parent.parent.parent):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
