"""CLI command ``read-cvo`` (registered by cli.py): DeepVariant's call_variants output as a
table. The work is in :func:`probing.cvo.read_cvo`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

CvoArg = Annotated[str, typer.Argument(
    help="call_variants output: a file, name@N.tfrecord.gz, a glob or a comma-separated list")]
OutOpt = Annotated[
    Optional[Path],  # noqa: UP045  (typer needs Optional on py3.10)
    typer.Option("--out", help="table.tsv or table.parquet (default: TSV on stdout)"),
]


def read_cvo_cmd(cvo: CvoArg, out: OutOpt = None) -> None:
    """DeepVariant's own genotype probabilities (call_variants output) as a table.

    One row per CallVariantsOutput record: key (as STORE obs keys, so the table joins to
    a STORE), chrom, pos (1-based), ref, alts, alt_allele_indices, p_hom_ref, p_het,
    p_hom_alt.
    """
    from dvtorch.errors import DvprobeError
    from probing.cvo import read_cvo, write_table

    if out is not None and out.suffix not in (".tsv", ".parquet"):
        raise DvprobeError(f"--out {out}: must end in .tsv or .parquet")
    table = read_cvo(cvo)
    if out is None:
        typer.echo(table.to_csv(sep="\t", index=False), nl=False)
        return
    write_table(table, out)
    typer.echo(f"{len(table)} records -> {out}", err=True)


def register(app: typer.Typer) -> None:
    """Attach ``read-cvo`` to the app."""
    app.command("read-cvo")(read_cvo_cmd)
