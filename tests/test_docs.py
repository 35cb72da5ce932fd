"""The documentation stays true to the code: docs/cli.md is what the CLI generates, every
``dvprobe`` command the docs show names real commands and options, the README's links land,
and the README's hook experiment runs and moves the genotype probabilities."""

from __future__ import annotations

import linecache
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
GENERATOR = ROOT / "scripts" / "gen_cli_docs.py"
# Pages written by hand that show `dvprobe` commands (docs/cli.md is generated).
HAND_WRITTEN = [README, *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "cli.md")]

HOOK_HEADING = "Hook experiments"
# The two set-up commands a newcomer copies; issue 20 keeps them exactly as they are.
SETUP_COMMANDS = [
    "python3 -m venv .venv && .venv/bin/pip install -c scripts/constraints.txt -e . "
    "&& .venv/bin/dvprobe demo --out dvprobe-demo",
    "bash scripts/test.sh",
]


def _generator(*args: str, columns: str = "80") -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": columns}
    return subprocess.run([sys.executable, str(GENERATOR), *args], capture_output=True,
                          text=True, cwd=ROOT, env=env)


# --- docs/cli.md ------------------------------------------------------------------------


@pytest.mark.parametrize("columns", ["37", "251"])
def test_cli_reference_matches_the_cli_at_any_terminal_width(columns):
    proc = _generator("--check", columns=columns)
    assert proc.returncode == 0, proc.stderr


def test_check_names_a_stale_page_and_the_command_that_fixes_it(tmp_path):
    stale = tmp_path / "cli.md"
    stale.write_text((ROOT / "docs" / "cli.md").read_text().replace("--overwrite", "--clobber"))
    proc = _generator("--check", "--output", str(stale))
    assert proc.returncode == 1
    assert "is stale" in proc.stderr and "python scripts/gen_cli_docs.py" in proc.stderr
    assert "--clobber" in proc.stderr  # the diff shows what differs


def test_check_fails_when_the_page_is_missing(tmp_path):
    proc = _generator("--check", "--output", str(tmp_path / "absent.md"))
    assert proc.returncode == 1 and "is missing" in proc.stderr


# --- commands shown in the docs ---------------------------------------------------------


def _shell_blocks(text: str) -> list[str]:
    return re.findall(r"^```(?:bash|sh|console)\n(.*?)^```", text, flags=re.S | re.M)


def _dvprobe_lines(text: str) -> list[str]:
    """Each ``dvprobe ...`` command of the shell blocks, continuation lines joined."""
    lines = []
    for block in _shell_blocks(text):
        for command in block.replace("\\\n", " ").splitlines():
            command = command.strip()
            if command.startswith("dvprobe "):
                lines.append(command)
    return lines


def _cli_tree():
    sys.path.insert(0, str(ROOT))
    import typer.main

    import cli

    return typer.main.get_command(cli.app)


def _command_and_options(tree, tokens: list[str]):
    """The (sub)command ``tokens`` name, and the options it accepts."""
    command, path = tree, ["dvprobe"]
    ctx = tree.context_class(tree, info_name="dvprobe")
    for token in tokens:
        if not hasattr(command, "list_commands") or token.startswith("-"):
            break
        sub = command.get_command(ctx, token)
        assert sub is not None, f"`{' '.join(path)}` has no command {token!r}"
        command, path = sub, [*path, token]
        ctx = command.context_class(command, info_name=token, parent=ctx)
    options = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
    return " ".join(path), options


@pytest.mark.parametrize("page", HAND_WRITTEN, ids=lambda p: p.name)
def test_every_command_shown_in_the_docs_exists_with_its_options(page):
    tree = _cli_tree()
    shown = _dvprobe_lines(page.read_text())
    if page == README:
        assert len(shown) >= 10, "the README's workflow shows the dvprobe commands"
    for line in shown:
        tokens = shlex.split(line, comments=True)[1:]
        name, options = _command_and_options(tree, tokens)
        for token in tokens:
            if token.startswith("--"):
                flag = token.split("=", 1)[0]
                assert flag in options, f"{page.name}: `{line}`: {name} has no option {flag}"


# --- README -----------------------------------------------------------------------------


def test_readme_keeps_the_two_setup_commands_verbatim():
    blocks = [b.strip() for b in _shell_blocks(README.read_text())]
    for command in SETUP_COMMANDS:
        assert command in blocks, f"README lost its set-up command: {command}"


@pytest.mark.parametrize("page", HAND_WRITTEN, ids=lambda p: p.name)
def test_links_land_on_a_file_and_a_heading(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path) if path else page
        assert linked.exists(), f"{page.name} links to {target}: no such file"
        if anchor and linked.suffix == ".md":
            assert anchor in _anchors(linked), f"{page.name} links to {target}: no such heading"


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)  # no code comments
    headings = re.findall(r"^#+ (.+)$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def readme_snippet(heading: str = HOOK_HEADING) -> str:
    """The first ```python block of the README section titled ``heading``."""
    text = README.read_text()
    found = re.search(rf"^(#+) {re.escape(heading)}\s*$", text, flags=re.M)
    assert found, f"README.md has no '{heading}' heading: the hook-experiment test needs it"
    level = len(found.group(1))
    section = text[found.end():]
    next_heading = re.search(rf"^#{{1,{level}}} ", section, flags=re.M)
    section = section[: next_heading.start()] if next_heading else section
    block = re.search(r"^```python\n(.*?)^```", section, flags=re.S | re.M)
    assert block, f"README.md's '{heading}' section holds no ```python block"
    return block.group(1)


def test_readme_hook_experiment_runs_and_moves_the_probabilities(tmp_path, monkeypatch, capsys):
    code = readme_snippet()
    filename = f"README.md ({HOOK_HEADING})"
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)  # tracebacks
    monkeypatch.chdir(tmp_path)  # the snippet writes its untrained BUNDLE here
    exec(compile(code, filename, "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    change = re.search(r"max change in genotype probabilities: ([0-9.eE+-]+)", out)
    assert change, f"the snippet printed no probability change:\n{out}"
    assert float(change.group(1)) > 0, out
