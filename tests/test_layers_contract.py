"""Layers and import rules (docs/architecture.md): what users feel of them, and that the
import-linter contracts in pyproject.toml cover every module and catch a wrong-way import.

``scripts/test.sh`` runs ``lint-imports`` itself; these tests check what it cannot see:
that reading a STORE and the CLI's start-up load no torch at run time, that no module was
left out of the layers, and that the contracts are not vacuous.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_analysis_support import make_store

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: import-linter depends on tomli there
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("dvtorch", "probing", "weights")
HEAVY = ("torch", "tensorflow")

# Runs ``code``, then (at exit, SystemExit included) writes which of HEAVY it loaded.
DRIVER = """
import atexit, json, sys
out = sys.argv[1]
atexit.register(lambda: open(out, "w").write(json.dumps(
    [m for m in {heavy!r} if m in sys.modules])))
{code}
"""


def _heavy_modules_loaded(tmp_path: Path, code: str) -> list[str]:
    """Run ``code`` in a fresh Python from the repository root; which of HEAVY it
    imported. Fails on a non-zero exit, showing its stderr."""
    out = tmp_path / "loaded.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", DRIVER.format(heavy=HEAVY, code=code), out],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text())


def _dvprobe(*args: str) -> str:
    """Code that runs ``dvprobe args...`` as the console script does."""
    return (f"import runpy; sys.argv = ['dvprobe', *{list(args)!r}]\n"
            "runpy.run_path('cli.py', run_name='__main__')")


def test_reading_a_store_analysis_and_reports_import_no_torch(tmp_path):
    code = "import probing.store, probing.analysis, probing.report, probing.info"
    assert _heavy_modules_loaded(tmp_path, code) == []


def test_dvprobe_help_loads_no_torch(tmp_path):
    assert _heavy_modules_loaded(tmp_path, _dvprobe("--help")) == []


def test_dvprobe_info_loads_no_torch(tmp_path):
    store = make_store(tmp_path / "store", {"mixed5": np.zeros((4, 3), np.float32)})
    assert _heavy_modules_loaded(tmp_path, _dvprobe("info", str(store.path))) == []


# ---- the contracts themselves -----------------------------------------------------------


def _contracts() -> dict[str, dict]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    return {c["id"]: c for c in config["tool"]["importlinter"]["contracts"]}


def _modules() -> list[str]:
    """Every module of the three packages, from the files (package __init__s excluded)."""
    found = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            if parts[-1] != "__init__":
                found.append(".".join(parts))
    return found


def test_every_module_sits_in_a_layer():
    """A new module must be placed in a layer, or the layers contract does not check it."""
    layers = [name.strip().strip("()") for layer in _contracts()["layers"]["layers"]
              for name in layer.replace("|", ":").split(":")]
    unplaced = [m for m in _modules()
                if not any(m == name or m.startswith(name + ".") for name in layers)]
    assert unplaced == [], f"add these to a layer in pyproject.toml: {unplaced}"


def _lint_imports(tree: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command;"
         " sys.exit(lint_imports_command())", "--no-cache"],
        cwd=tree, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def scratch_tree(tmp_path) -> Path:
    """A copy of the packages and pyproject.toml to add a bad import to."""
    pytest.importorskip("importlinter")
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__", "cache"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    return tmp_path


def _add_import(module_file: Path, line: str) -> None:
    text = module_file.read_text(encoding="utf-8")
    marker = "from __future__ import annotations\n"
    module_file.write_text(text.replace(marker, marker + "\n" + line + "\n", 1),
                           encoding="utf-8")


def test_the_contracts_hold_and_a_wrong_way_import_breaks_them(scratch_tree):
    assert _lint_imports(scratch_tree).returncode == 0
    _add_import(scratch_tree / "dvtorch" / "files.py", "import probing.store  # noqa")
    run = _lint_imports(scratch_tree)
    assert run.returncode != 0
    assert "dvtorch.files is not allowed to import probing.store" in run.stdout


def test_an_import_cycle_breaks_the_contracts(scratch_tree):
    _add_import(scratch_tree / "dvtorch" / "verify.py", "import dvtorch.convert  # noqa")
    run = _lint_imports(scratch_tree)
    assert run.returncode != 0
    assert "No cycles are allowed in dvtorch" in run.stdout


def test_torch_reached_from_the_store_breaks_the_contracts(scratch_tree):
    _add_import(scratch_tree / "probing" / "store.py", "import dvtorch.hooks  # noqa")
    run = _lint_imports(scratch_tree)
    assert run.returncode != 0
    assert "probing.store -> dvtorch.hooks" in run.stdout
