"""Write docs/cli.md, the command-line reference, from the typer app in ``cli.py``.

    python scripts/gen_cli_docs.py            # (re)write docs/cli.md
    python scripts/gen_cli_docs.py --check    # exit 1, saying so, when docs/cli.md is stale

The page is rendered from the click objects typer builds (``typer.main.get_command``), not
from captured ``--help`` output: click wraps help to the terminal's width, so a page made
from ``--help`` would change with the window it was generated in. Here every piece is
taken unwrapped (usage pieces, each parameter's help record, each command's help text) and
laid out by this script alone, so the same code gives the same bytes on any terminal.
``tests/test_docs.py`` runs ``--check``, so CI fails when a command changes and the page
was not regenerated.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import re
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = ROOT / "docs" / "cli.md"
PROGRAM = "dvprobe"  # the console script's name (pyproject.toml [project.scripts])
REGENERATE = "python scripts/gen_cli_docs.py"

HEADER = f"""\
# Command-line reference

Every `{PROGRAM}` command with its arguments and options, generated from the typer app in
`cli.py` by `{REGENERATE}`: do not edit this page by hand (`tests/test_docs.py`
fails when it is stale). `{PROGRAM} COMMAND --help` prints the same. The
[README](../README.md) explains the concepts (BUNDLE, STORE, run, layer names) and the
workflow.
"""


def load_command():
    """The click command tree of ``cli.app``, with this checkout's ``cli.py`` first on the path."""
    sys.path.insert(0, str(ROOT))
    import typer.main

    import cli

    return typer.main.get_command(cli.app)


def walk(command, ctx) -> Iterator[tuple[object, object]]:
    """``(command, context)`` for ``command`` and every visible subcommand, depth first, in
    the order ``--help`` lists them."""
    yield command, ctx
    if not hasattr(command, "list_commands"):
        return
    for name in command.list_commands(ctx):
        sub = command.get_command(ctx, name)
        if sub is None or getattr(sub, "hidden", False):
            continue
        yield from walk(sub, sub.context_class(sub, info_name=name, parent=ctx))


def escape(text: str) -> str:
    """Markdown-escape prose while leaving ``code spans`` as written: ``H*W*C`` must not
    turn italic, ``<name>`` must not vanish as an HTML tag, nor ``$A ... $B`` become math."""
    parts = re.split(r"(`[^`]*`)", text)
    for i in range(0, len(parts), 2):
        part = parts[i].replace("\\", "\\\\").replace("*", "\\*").replace("<", "&lt;")
        part = part.replace("$", "\\$")  # GitHub reads a pair of $ as inline math
        parts[i] = re.sub(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])", r"\\_", part)
    return "".join(parts)


def one_line(text: str) -> str:
    """Help text as one line: click's records keep the source's line breaks and runs of
    spaces (``text.  [default: 8]``), which mean nothing in a list item."""
    return " ".join(text.split())


def help_paragraphs(command) -> list[str]:
    """The command's help as markdown paragraphs. click's conventions hold: text after
    ``\\f`` is not shown, and a paragraph opened by a ``\\b`` line keeps its line breaks."""
    text = inspect.cleandoc((command.help or "").split("\f")[0])
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = para.splitlines()
        if not lines:
            continue
        if lines[0].strip() == "\b":
            out.append("```text\n" + "\n".join(lines[1:]) + "\n```")
        else:
            out.append(escape(one_line(para)))
    return out


def parameter_items(command, ctx) -> tuple[list[str], list[str]]:
    """Markdown list items for the arguments and the options, in declaration order."""
    arguments, options = [], []
    for param in command.get_params(ctx):
        record = param.get_help_record(ctx)
        is_argument = param.param_type_name == "argument"
        if record is None:
            if not is_argument:
                continue  # a hidden option
            record = (param.human_readable_name, getattr(param, "help", None) or "")
        names, help_text = record
        item = f"- `{one_line(names)}`" + (f": {escape(one_line(help_text))}" if help_text.strip() else "")
        (arguments if is_argument else options).append(item)
    return arguments, options


def subcommand_items(command, ctx) -> list[str]:
    """The subcommands of a group, each with its one-sentence summary and a link."""
    items = []
    for sub, sub_ctx in list(walk(command, ctx))[1:]:
        if sub_ctx.parent is not ctx:
            continue
        summary = sub.get_short_help_str(limit=1000)
        items.append(f"- [`{sub_ctx.info_name}`](#{anchor(sub_ctx.command_path)}): {escape(summary)}")
    return items


def anchor(title: str) -> str:
    """GitHub's anchor for a heading made of plain words (``dvprobe weights fetch``)."""
    return re.sub(r"[^a-z0-9 -]", "", title.lower()).replace(" ", "-")


def render_command(command, ctx, level: int) -> str:
    """One command's section: heading, help, usage, arguments, options, subcommands."""
    blocks = ["#" * level + " " + ctx.command_path]
    blocks += help_paragraphs(command)
    usage = " ".join([ctx.command_path, *command.collect_usage_pieces(ctx)])
    blocks.append(f"```text\n{usage}\n```")
    arguments, options = parameter_items(command, ctx)
    for title, items in (("Arguments", arguments), ("Options", options),
                         ("Commands", subcommand_items(command, ctx))):
        if items:
            blocks.append(f"**{title}**\n\n" + "\n".join(items))
    return "\n\n".join(blocks) + "\n"


def render() -> str:
    """The whole page: a header, a table of contents, then one section per command."""
    root = load_command()
    ctx = root.context_class(root, info_name=PROGRAM)
    commands = list(walk(root, ctx))
    toc = "\n".join(
        "  " * (c.command_path.count(" ") - 1) + f"- [`{c.command_path}`](#{anchor(c.command_path)})"
        for _, c in commands[1:])
    sections = [render_command(cmd, c, level=2) for cmd, c in commands]
    return "\n".join([HEADER, "## Contents\n\n" + toc + "\n", *sections])


def check(path: Path, expected: str) -> int:
    """0 when ``path`` holds ``expected``; else say what differs and how to fix it, and 1."""
    current = path.read_text(encoding="utf-8") if path.exists() else ""
    if current == expected:
        return 0
    what = "is missing" if not path.exists() else "is stale (the CLI changed since it was generated)"
    diff = list(difflib.unified_diff(current.splitlines(), expected.splitlines(),
                                     f"{path} (on disk)", f"{path} (from the CLI)", lineterm=""))
    shown = "\n".join(diff[:40]) + ("\n..." if len(diff) > 40 else "")
    print(f"{path} {what}: run `{REGENERATE}` and commit the result.\n{shown}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if the file differs from the CLI")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help="markdown file (default: docs/cli.md)")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        return check(args.output, text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8", newline="\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
