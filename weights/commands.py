"""CLI commands of this area (registered by cli.py): ``dvprobe weights list`` / ``fetch``.

Thin wrappers over :mod:`weights.registry` and :mod:`weights.fetch`. The listing shows the
confidence tag of every URL up front because several released-model URLs are derived or
third-party (see ``weights/README.md``); ``fetch`` ends by printing the ``dvprobe convert``
command, since conversion is the only thing a downloaded model is for here.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import shlex
from pathlib import Path
from typing import Annotated, Optional

import typer

from dvtorch.errors import DvprobeError
from weights.registry import default_bundle

#: What ``--convert`` imports (the ``convert`` extra of pyproject.toml).
CONVERT_EXTRA = ("tensorflow", "tf_keras", "tf2onnx", "onnx2torch")

weights_app = typer.Typer(
    name="weights",
    help="DeepVariant's released models: list the registry, download with resume + sha256.",
    no_args_is_help=True,
)


def _shape(entry) -> str:
    return "x".join(map(str, entry.shape)) if entry.shape else "json"


def _local(entry) -> str:
    """``bundle`` when the release is converted in the cache, ``yes`` when only fetched."""
    from weights.fetch import is_fetched

    if (default_bundle(entry) / "bundle.json").is_file():
        return "bundle"
    return "yes" if is_fetched(entry) else ""


@weights_app.command("list")
def list_cmd(
    tool: Annotated[
        Optional[str],  # noqa: UP045  (typer needs Optional on py3.10)
        typer.Option("--tool", help="deepvariant, deepsomatic or deeptrio."),
    ] = None,
    version: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--version", help="Release version, e.g. 1.10.0."),
    ] = None,
    kind: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--type", help="Model type: wgs, wes, pacbio, hybrid, ont, masseq, "
                     "rnaseq, ... (DeepVariant's --model_type spelling works too)."),
    ] = None,
    fmt: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--format", help="savedmodel or checkpoint."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List registered DeepVariant models with input shape and URL confidence."""
    from weights.registry import list_models

    entries = list_models(version=version, kind=kind, fmt=fmt, tool=tool)
    if as_json:
        typer.echo(json.dumps([e.to_dict() for e in entries], indent=2))
        return
    rows = [("NAME", "VERSION", "TYPE", "FORMAT", "SHAPE", "CHANNELS", "URL CONF.", "LOCAL")]
    for e in entries:
        channels = ",".join(map(str, e.channels)) if e.channels else "json"
        rows.append(
            (
                e.name,
                e.version,
                e.type,
                e.format,
                _shape(e) + ("" if not e.shape or e.shape_confidence == "verified" else "*"),
                channels,
                e.confidence,
                _local(e),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    typer.echo(
        f"{len(entries)} model(s). URL CONF. = how the URL is established "
        "(verified > doc > derived > 3rd-party > unknown); * = shape/channels not verified, "
        "json = not established: the model's example_info.json is authoritative either way. "
        "LOCAL: yes = downloaded, bundle = converted (load it by its name without the format)."
    )


@weights_app.command("fetch")
def fetch_cmd(
    name: Annotated[
        str, typer.Argument(help="Registry name (deepvariant-1.10.0-wgs-savedmodel) or release "
                            "(deepvariant-1.10.0-wgs: its best-established format).")
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
    convert: Annotated[
        bool, typer.Option("--convert", help="Also convert it into the BUNDLE that "
                           "`dvprobe extract RELEASE` loads (needs the convert extra).")
    ] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bars.")] = False,
) -> None:
    """Download a registered model (resumable, sha256-checked) and print the convert command."""
    from weights.fetch import fetch, parse_sha256_overrides
    from weights.registry import release_entries

    entry = release_entries(name)[0]
    if convert:
        _require_convert_extra(entry)
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
    _say_fetched(entry, path)
    if convert:
        _convert_into_cache(entry, path)
        return
    bundle = default_bundle(entry)
    typer.echo("next:")
    typer.echo(f"  dvprobe convert {shlex.quote(str(entry.convert_source(path)))} --out "
               f"{shlex.quote(str(bundle))}")
    typer.echo(f"  (then `dvprobe extract {entry.release} EXAMPLES --out STORE` loads it by name)")


def _require_convert_extra(entry) -> None:
    """Refuse ``--convert`` before downloading when the TensorFlow side is not installed."""
    missing = [m for m in CONVERT_EXTRA if importlib.util.find_spec(m) is None]
    if missing:
        raise DvprobeError(
            f"--convert needs the convert extra ({', '.join(missing)} not installed): "
            f"pip install 'dvprobe[convert]', or run `dvprobe weights fetch {entry.name}` "
            "here and `dvprobe convert` where TensorFlow is installed")


def _say_fetched(entry, path: Path) -> None:
    """Files, checksum provenance and the model's own example_info.json shape."""
    from weights.fetch import LOCK_NAME, read_lock

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


def _convert_into_cache(entry, path: Path) -> None:
    """Convert the download into ``default_bundle(entry)`` unless a BUNDLE is there already."""
    from dvtorch.convert import convert

    bundle = default_bundle(entry)
    if (bundle / "bundle.json").is_file():
        typer.echo(f"bundle {bundle} already exists (remove it to convert again)")
    else:
        convert(entry.convert_source(path), bundle,
                progress=lambda msg: typer.echo(f"[dvprobe] {msg}", err=True))
        typer.echo(f"bundle {bundle}")
    typer.echo(f"load it by name: dvprobe extract {entry.release} EXAMPLES --out STORE, "
               f"or dvtorch.load({entry.release!r})")


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
