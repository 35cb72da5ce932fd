"""``dvprobe``: a thin typer CLI over the dvtorch / probing Python API.

Each area registers its own commands (``register(app)`` in the modules below), so this
file only assembles them; the work happens in importable functions.
"""

from __future__ import annotations

import importlib
import os

import typer

try:  # typer < 0.2x depends on click; newer typer vendors it as typer._click (no `click`)
    from click.exceptions import Abort, ClickException
except ModuleNotFoundError:
    from typer import Abort
    from typer._click.exceptions import ClickException

app = typer.Typer(
    name="dvprobe",
    help="Probe DeepVariant's Inception-v3 in PyTorch: convert, extract activations, "
    "cluster, annotate and report.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    # Plain help: typer's rich help shows every flag as taking a value (`--json <bool>`),
    # and `--json true` is then refused; plain help prints flags as flags.
    rich_markup_mode=None,
    context_settings={"max_content_width": 110},  # use a wide terminal's width
)

COMMAND_MODULES = (
    "dvtorch.commands",  # convert, verify, layers
    "weights.commands",  # weights list / fetch
    "probing.commands_extract",  # extract, info
    "probing.commands_analysis",  # reduce, cluster, apply
    "probing.commands_annotate",  # annotate, enrich, probe, report, show
    "probing.commands_sim",  # simulate, make-examples, demo
    "probing.commands_explain",  # explain, ablate, tcav
    "probing.commands_cvo",  # read-cvo
    "probing.commands_export",  # export (AnnData)
)

for _module in COMMAND_MODULES:
    importlib.import_module(_module).register(app)


def main() -> None:
    from dvtorch.errors import DvprobeError

    try:
        code = app(standalone_mode=False)
    except DvprobeError as exc:
        typer.secho(f"dvprobe: error: {exc}", err=True, fg=typer.colors.RED)
        raise SystemExit(exc.exit_code) from None
    except OSError as exc:
        # A path the user gave that cannot be read or written (missing, a file where a
        # directory is needed, no permission): one line naming it, not a traceback.
        # DVPROBE_DEBUG=1 shows the traceback.
        if os.environ.get("DVPROBE_DEBUG"):
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        typer.secho(f"dvprobe: error: {where}{exc.strerror or exc}", err=True,
                    fg=typer.colors.RED)
        raise SystemExit(2) from None
    except Abort:
        typer.echo("Aborted.", err=True)
        raise SystemExit(130) from None
    except ClickException as exc:
        exc.show()
        raise SystemExit(exc.exit_code) from None
    if isinstance(code, int) and code:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
