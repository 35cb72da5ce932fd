"""CLI commands of this area (registered by cli.py): ``dvprobe weights list`` / ``fetch``.

Thin wrappers over :mod:`weights.registry` and :mod:`weights.fetch`. The listing shows the
confidence tag of every URL up front because several released-model URLs are derived or
third-party (see ``weights/README.md``); ``fetch`` ends by printing the ``dvprobe convert``
command, since conversion is the only thing a downloaded model is for here.
"""

from __future__ import annotations

import collections
import json
import shlex
from pathlib import Path
from typing import Annotated, Optional

import typer

weights_app = typer.Typer(
    name="weights",
    help="DeepVariant's released models: list the registry, download with resume + sha256.",
    no_args_is_help=True,
)


def _shape(entry) -> str:
    return "x".join(map(str, entry.shape)) if entry.shape else "?"


@weights_app.command("list")
def list_cmd(
    version: Annotated[
        Optional[str],  # noqa: UP045  (typer needs Optional on py3.10)
        typer.Option("--version", help="DeepVariant version, e.g. 1.6.1."),
    ] = None,
    kind: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--type", help="Model type: wgs, wes, pacbio, hybrid, ont, masseq."),
    ] = None,
    fmt: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--format", help="savedmodel or checkpoint."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List registered DeepVariant models with input shape and URL confidence."""
    from weights.fetch import is_fetched
    from weights.registry import list_models

    entries = list_models(version=version, kind=kind, fmt=fmt)
    if as_json:
        typer.echo(json.dumps([e.to_dict() for e in entries], indent=2))
        return
    rows = [("NAME", "VERSION", "TYPE", "FORMAT", "SHAPE", "CHANNELS", "URL CONF.", "LOCAL")]
    for e in entries:
        channels = ",".join(map(str, e.channels)) if e.channels else "?"
        rows.append(
            (
                e.name,
                e.version,
                e.type,
                e.format,
                _shape(e) + ("" if not e.shape or e.shape_confidence == "verified" else "*"),
                channels,
                e.confidence,
                "yes" if is_fetched(e) else "",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    typer.echo(
        f"{len(entries)} model(s). URL CONF. = how the URL is established "
        "(verified > doc > derived > 3rd-party > unknown); * = shape/channels not verified, "
        "the model's example_info.json is authoritative."
    )


@weights_app.command("fetch")
def fetch_cmd(
    name: Annotated[
        str, typer.Argument(help="Registry name, e.g. deepvariant-1.6.1-wgs-savedmodel.")
    ],
    dest: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--dest", help="Download directory (default: $DVPROBE_CACHE/<name>)."),
    ] = None,
    mirror: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            "--mirror",
            help="A URL or a local directory replacing https://storage.googleapis.com/"
            "deepvariant/ (also $DVPROBE_WEIGHTS_MIRROR); the mirror keeps the "
            "models/DeepVariant/... paths.",
        ),
    ] = None,
    sha256: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option("--sha256", help="Expected digest, FILE=HEX (repeatable)."),
    ] = None,
    retries: Annotated[
        int, typer.Option("--retries", help="Automatic resumes per file after a dropped link.")
    ] = 3,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bars.")] = False,
) -> None:
    """Download a registered model (resumable, sha256-checked) and print the convert command."""
    from weights.fetch import LOCK_NAME, fetch, parse_sha256_overrides, read_lock
    from weights.registry import get

    entry = get(name)
    if entry.confidence in ("3rd-party", "unknown"):
        typer.secho(
            f"[dvprobe] note: {entry.name} URL confidence is '{entry.confidence}' "
            f"({entry.confidence_source}); it may not exist upstream",
            err=True,
            fg=typer.colors.YELLOW,
        )
    path = fetch(
        entry,
        dest,
        base_url=mirror,
        progress=not no_progress,
        sha256=parse_sha256_overrides(sha256),
        retries=retries,
    )
    lock = read_lock(path)
    total = sum(f["size"] for f in lock["files"].values())
    typer.echo(f"{entry.name}: {len(entry.files)} files, {total:,} bytes in {path}")
    how = collections.Counter(_checked_by(f.get("verified_against", ""))
                              for f in lock["files"].values())
    typer.echo(f"checksums: {path / LOCK_NAME} ("
               + ", ".join(f"{n} {what}" for what, n in sorted(how.items())) + ")")
    info = path / "example_info.json"
    if info.is_file():
        try:
            meta = json.loads(info.read_text())
            shape, channels = meta.get("shape"), meta.get("channels")
        except ValueError:
            shape = channels = None
        typer.echo(f"example_info.json: shape {shape}, channels {channels}")
        if entry.shape and shape and list(entry.shape) != list(shape):
            typer.secho(
                f"[dvprobe] note: registry shape {list(entry.shape)} differs from the "
                "model's example_info.json; the json is authoritative",
                err=True,
                fg=typer.colors.YELLOW,
            )
    source = entry.convert_source(path)
    bundle = Path("bundles") / entry.name.removesuffix(f"-{entry.format}")
    typer.echo("next:")
    typer.echo(f"  dvprobe convert {shlex.quote(str(source))} --out {shlex.quote(str(bundle))}")


def _checked_by(verified_against: str) -> str:
    """A lock entry's ``verified_against`` in a few words for the summary line."""
    if verified_against.startswith("server"):
        return "matched the server's own hash"
    if verified_against == "trust-on-first-use":
        return "recorded on first use (nothing to check against)"
    return "matched a known sha256"


def register(app: typer.Typer) -> None:
    """Attach ``dvprobe weights list|fetch`` to the ``dvprobe`` app."""
    app.add_typer(weights_app, name="weights")
