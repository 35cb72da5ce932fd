"""The ``dvprobe`` entry point: every command's help renders, and flags read as flags."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["convert", "verify", "layers", "extract", "reduce", "cluster", "apply", "annotate",
            "enrich", "report", "show", "simulate", "make-examples", "demo", "weights list",
            "weights fetch", "info", "probe", "explain", "ablate", "read-cvo", "export"]


ENTRY = "import sys, cli; sys.argv[0] = 'dvprobe'; cli.main()"  # as the console script


def _dvprobe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", ENTRY, *args], capture_output=True,
                          text=True, cwd=ROOT, env={"COLUMNS": "100", "PATH": "/usr/bin:/bin"})


def test_top_level_help_lists_every_command():
    proc = _dvprobe("--help")
    assert proc.returncode == 0, proc.stderr
    for name in {c.split()[0] for c in COMMANDS}:
        assert f"\n  {name} " in proc.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_help_renders_flags_as_flags(command):
    """A flag shown as ``--json <bool>`` invites ``--json true``, which is refused."""
    proc = _dvprobe(*command.split(), "--help")
    assert proc.returncode == 0, proc.stderr
    assert "Usage: dvprobe" in proc.stdout and "<bool>" not in proc.stdout
