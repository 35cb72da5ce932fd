"""CLI command ``export`` (registered by cli.py): a STORE as AnnData for scanpy and
rapids-singlecell. The work is in :func:`probing.export.write_anndata`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def _split_runs(values: list[str] | None) -> list[str] | None:
    """``--runs a,b --runs c`` as ["a", "b", "c"]; None (every run) when not given."""
    if values is None:
        return None
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


def export_command(
    store: Annotated[Path, typer.Argument(help="STORE directory (complete).")],
    anndata: Annotated[Path, typer.Option(
        "--anndata", help="Output: OUT.zarr (a directory, chunked by rows) or OUT.h5ad.")],
    layer: Annotated[Optional[str], typer.Option(  # noqa: UP045 (typer reads the annotation)
        "--layer",
        help="The layer that becomes X (float32). Default: no X; every layer goes to "
             "obsm[LAYER] (scanpy: use_rep=LAYER).")] = None,
    runs: Annotated[Optional[list[str]], typer.Option(  # noqa: UP045
        "--runs", metavar="NAME",
        help="Runs to export (repeat, or comma-separated); default every run. Their labels "
             "become obs columns RUN:COLUMN, their coordinates obsm X_umap / X_pca.")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace an existing output.")] = False,
    no_progress: Annotated[bool, typer.Option(
        "--no-progress", help="No progress bar.")] = False,
) -> None:
    """Export a STORE as AnnData (.zarr or .h5ad) for scanpy / rapids-singlecell.

    obs: the STORE's obs and annotations indexed by example key, plus each run's labels
    (joined by key). uns["dvprobe"]: the STORE's provenance and each run's parameters.
    Layers are written in row chunks, so memory stays bounded for .zarr and .h5ad alike;
    the output appears only once complete.
    """
    from probing.export import write_anndata

    out = write_anndata(store, anndata, layer=layer, runs=_split_runs(runs),
                        overwrite=overwrite, progress=not no_progress)
    what = f"X = {layer}" if layer else "layers in obsm"
    typer.echo(f"{store} -> {out} ({what})")


def register(app: typer.Typer) -> None:
    """Attach ``export`` to the app."""
    app.command("export")(export_command)
