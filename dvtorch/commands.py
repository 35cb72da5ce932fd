"""CLI commands of this area (registered by cli.py): ``convert``, ``verify``, ``layers``.

Thin wrappers: parse options, call :mod:`dvtorch.convert` / :mod:`dvtorch.verify` /
:mod:`dvtorch.layers`, print a summary. Heavy imports (TensorFlow, torch) happen inside the
commands so ``dvprobe --help`` stays fast. Progress goes to stderr so ``--json`` output on
stdout stays machine-readable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from dvtorch.errors import ParityError


def _progress(msg: str) -> None:
    typer.echo(f"[dvprobe] {msg}", err=True)


def convert_cmd(
    source: Annotated[
        Path,
        typer.Argument(
            help="Checkpoint prefix (…/deepvariant.wgs.ckpt), SavedModel directory or .onnx file."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="BUNDLE directory to create.")],
    example_info: Annotated[
        Optional[Path],  # noqa: UP045  (typer needs Optional on py3.10)
        typer.Option(
            "--example-info", help="example_info.json (default: the one beside the model)."
        ),
    ] = None,
    shape: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--shape", help="Input shape H,W,C, e.g. 100,221,7 (overrides the json)."),
    ] = None,
    channels: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            "--channels", help="Channel enum list, e.g. 1,2,3,4,5,6,19 (overrides the json)."
        ),
    ] = None,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset for tf2onnx.")] = 17,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing OUT.")
    ] = False,
    no_parity: Annotated[
        bool, typer.Option("--no-parity", help="Skip the parity check (not recommended).")
    ] = False,
    batch: Annotated[int, typer.Option("--batch", "--batch-size", min=1, help="Pileups used for the parity check.")] = 8,
) -> None:
    """Convert a DeepVariant model into a dvprobe BUNDLE, checking per-layer parity first."""
    from dvtorch.convert import convert

    path = convert(
        source,
        out,
        example_info=example_info,
        shape=shape,
        channels=channels,
        opset=opset,
        check_parity=not no_parity,
        parity_batch=batch,
        overwrite=overwrite,
        progress=_progress,
    )
    meta = json.loads((path / "bundle.json").read_text())
    parity = meta.get("parity")
    typer.echo(
        f"bundle {path}: {meta['source']['kind']} {meta['input_shape']} channels "
        f"{meta['channels']}; parity: "
        + ("skipped (--no-parity)" if not parity else ("PASS" if parity["passed"] else "FAIL"))
    )


def verify_cmd(
    bundle: Annotated[Path, typer.Argument(
        help="BUNDLE directory, or a release name converted into the cache.")],
    examples: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--examples", help="DeepVariant examples spec (default: random pileups)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    batch: Annotated[int, typer.Option("--batch", "--batch-size", min=1, help="Number of pileups.")] = 8,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random pileups.")] = 0,
    source: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--source", help="Original model, if moved since conversion (must exist)."),
    ] = None,
    no_tf: Annotated[bool, typer.Option(
        "--no-tf", help="Leave TensorFlow out (onnxruntime becomes the reference).")] = False,
) -> None:
    """Re-check parity: TF source (if installed) vs onnxruntime vs native torch vs onnx2torch.

    Exits 0 when every layer is within relative 1e-4, else prints the table and exits 3
    (2: bad input).
    """
    from dvtorch.bundle import resolve_bundle
    from dvtorch.verify import verify

    bundle = resolve_bundle(bundle)
    images = None
    if examples:  # read and checked against the bundle before any model is loaded
        from probing.bundle_inputs import read_pileups

        images = read_pileups(examples, bundle, batch)
    report = verify(
        bundle,
        images=images,
        inputs=f"examples {examples}" if examples else None,
        batch=batch,
        seed=seed,
        source=source,
        skip_tf=no_tf,
        check=False,
        progress=_progress,
    )
    typer.echo(report.to_json() if as_json else report.table())
    if not report.passed:
        raise ParityError(f"{bundle}: {report.failure_summary()}")


def layers_cmd(
    bundle: Annotated[Path, typer.Argument(
        help="BUNDLE directory, or a release name converted into the cache.")],
    every: Annotated[bool, typer.Option(
        "--all", help="Every capturable name, each block's convs (conv2d_N = Keras "
                      "activation_N) and inner concats included.")] = False,
) -> None:
    """List capturable layers: name, output shape (H, W, C) and channel count."""
    import dvtorch
    from dvtorch.layers import all_layer_names, layer_info

    model = dvtorch.load(bundle, device="cpu")
    names = all_layer_names(model) if every else None
    rows = [("layer", "shape (H,W,C)", "channels")]
    rows += [(i.name, "x".join(map(str, i.shape_hwc)), str(i.channels))
             for i in layer_info(model, names=names)]
    widths = [max(len(r[k]) for r in rows) for k in range(3)]
    for r in rows:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def register(app: typer.Typer) -> None:
    """Attach this area's commands to the ``dvprobe`` app."""
    app.command("convert")(convert_cmd)
    app.command("verify")(verify_cmd)
    app.command("layers")(layers_cmd)
