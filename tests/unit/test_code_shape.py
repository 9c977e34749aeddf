"""The code stays readable: no function in worker/ runs past MAX_LINES unless a `# long:` comment
on its `def` line (or the line above) says why."""

from __future__ import annotations

import ast

from helpers import ROOT

MAX_LINES = 60


def test_no_function_is_longer_than_a_screen_without_a_reason() -> None:
    too_long = []
    for path in sorted((ROOT / "worker").rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            said = any("# long:" in lines[i - 1] for i in (start - 1, node.lineno) if i >= 1)
            if length > MAX_LINES and not said:
                too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert not too_long, "functions longer than a screen, with no `# long:` reason:\n" + "\n".join(too_long)
