"""The code stays readable: no function in the packages is longer than a screen or two.

Long functions were where options, stages and error paths tangled (issue 20): a config
dataclass plus named stages reads better. This is the check that keeps it so.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dvtorch", "probing", "weights")
MAX_LINES = 100


def _functions(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1


def test_no_function_is_longer_than_a_hundred_lines():
    too_long = [f"{path.relative_to(ROOT)}:{line} {name} ({n} lines)"
                for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))
                for name, line, n in _functions(path) if n > MAX_LINES]
    assert not too_long, "split these into a config and stages:\n" + "\n".join(too_long)


def test_the_check_sees_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    (tmp_path / "m.py").write_text(f"def long():\n{body}\n")
    assert [n for *_, n in _functions(tmp_path / "m.py")] == [MAX_LINES + 1]
