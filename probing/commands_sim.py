"""CLI commands of this area (registered by cli.py): ``simulate``, ``make-examples``.

Thin wrappers over :func:`probing.simulate.simulate`,
:func:`probing.make_examples.make_examples` and :func:`probing.demo.run_demo`.
"""

from __future__ import annotations

from pathlib import Path

import typer

from dvtorch.errors import DvprobeError
from probing.demo import DEMO_LAYERS


def _pair(text: str, what: str) -> tuple[float, float]:
    """Parse ``lo,hi`` option values (e.g. ``--mosaic-vaf 0.03,0.2``)."""
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise DvprobeError(f"--{what}: expected 'lo,hi' (two numbers), got {text!r}") from None
    return lo, hi


def simulate_cmd(
    out: Path = typer.Option(..., "--out", help="Output directory (created)."),
    seed: int = typer.Option(0, help="Random seed; same seed -> same data."),
    length: int = typer.Option(
        400_000, help="Total reference length in bp (split 3:2 over two contigs)."
    ),
    contigs: str = typer.Option("chr20,chr21", help="Comma-separated contig names."),
    coverage: float = typer.Option(30.0, help="Mean sequencing depth."),
    read_length: int = typer.Option(150, help="Read length of each mate."),
    insert_mean: float = typer.Option(400.0, help="Mean fragment length."),
    insert_sd: float = typer.Option(80.0, help="Fragment length SD."),
    n_line_families: int = typer.Option(2, help="LINE-like families (L1Sim1..)."),
    line_copies: int = typer.Option(8, help="Copies per LINE family."),
    line_length: int = typer.Option(6000, help="LINE consensus length."),
    line_divergence: str = typer.Option("0.02,0.10", help="Copy divergence range lo,hi."),
    young_fraction: float = typer.Option(0.3, help="Fraction of near-identical young copies."),
    segdup_length: int = typer.Option(
        8000, help="Reference segmental duplication length (0: none)."
    ),
    cnv_length: int = typer.Option(20_000, help="Sample copy-number gain length (0: none)."),
    n_homopolymers: int = typer.Option(30, help="Planted homopolymers."),
    n_strs: int = typer.Option(40, help="Planted short tandem repeats."),
    n_low_complexity: int = typer.Option(15, help="Planted two-letter low-complexity runs."),
    snv_rate: float = typer.Option(1e-3, help="Germline SNVs per bp."),
    indel_rate: float = typer.Option(1.2e-4, help="Germline small indels per bp."),
    n_mosaic: int = typer.Option(40, help="Mosaic SNVs."),
    mosaic_vaf: str = typer.Option("0.03,0.20", help="Mosaic VAF range lo,hi."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace the files of an earlier simulation in --out."
    ),
    quiet: bool = typer.Option(False, "--quiet", "--no-progress", help="No progress bar."),
) -> None:
    """Simulate a diploid sample with planted LINEs, segdup, CN gain, low-complexity
    repeats, germline and mosaic variants (FASTA, BAM, truth VCFs, rmsk, BEDs)."""
    from probing.simulate import simulate

    files = simulate(
        out,
        seed=seed,
        length=length,
        contigs=tuple(c for c in contigs.split(",") if c),
        coverage=coverage,
        read_length=read_length,
        insert_mean=insert_mean,
        insert_sd=insert_sd,
        n_line_families=n_line_families,
        line_copies=line_copies,
        line_length=line_length,
        line_divergence=_pair(line_divergence, "line-divergence"),
        young_fraction=young_fraction,
        segdup_length=segdup_length,
        cnv_length=cnv_length,
        n_homopolymers=n_homopolymers,
        n_strs=n_strs,
        n_low_complexity=n_low_complexity,
        snv_rate=snv_rate,
        indel_rate=indel_rate,
        n_mosaic=n_mosaic,
        mosaic_vaf=_pair(mosaic_vaf, "mosaic-vaf"),
        overwrite=overwrite,
        progress=not quiet,
    )
    import json

    counts = json.loads(files["manifest"].read_text())["counts"]
    typer.echo(
        f"simulated {counts['reads']} reads ({counts['misplaced_reads']} misplaced in "
        f"repeats), {counts['germline_variants']} germline variants, "
        f"{counts['mosaic_snvs']} mosaic SNVs, {counts['line_copies']} LINE copies "
        f"-> {out}"
    )
    for role, p in files.items():
        typer.echo(f"  {role:15s} {p}")


def make_examples_cmd(
    ref: Path = typer.Option(..., "--ref", help="Reference FASTA (with .fai)."),
    reads: Path = typer.Option(..., "--reads", help="Indexed, coordinate-sorted BAM/CRAM."),
    out: str = typer.Option(
        ..., "--out", help="Output file or sharded spec, e.g. examples.tfrecord@4.gz."
    ),
    sites: Path | None = typer.Option(
        None,
        "--sites",
        help="VCF: make examples for these variants; BED: find candidates inside these regions.",
    ),
    candidates: bool = typer.Option(
        False, "--candidates", help="Find candidates over the whole BAM."
    ),
    truth: list[Path] = typer.Option(
        [], "--truth", help="Truth VCF(s) for labels (repeatable: germline + mosaic)."
    ),
    shards: int | None = typer.Option(
        None, "--shards", help="Number of shards (or use name@N.gz)."
    ),
    width: int = typer.Option(221, help="Pileup width (odd)."),
    height: int = typer.Option(100, help="Pileup height (5 reference rows + reads)."),
    min_count: int = typer.Option(2, help="Candidates: min reads carrying the allele."),
    min_fraction: float = typer.Option(0.05, help="Candidates: min allele fraction."),
    ref_sites_fraction: float = typer.Option(
        0.0, help="Candidates: fraction of other covered positions emitted as hom-ref examples."
    ),
    no_het_alt_images: bool = typer.Option(
        False, "--no-het-alt-images", help="Multi-allelic: only single-alt examples."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace output files that already exist."
    ),
    quiet: bool = typer.Option(False, "--quiet", "--no-progress", help="No progress bar."),
) -> None:
    """Encode DeepVariant-format pileup examples (100x221x7 WGS channels) with pysam."""
    from probing.make_examples import make_examples

    res = make_examples(
        ref,
        reads,
        out,
        sites=sites,
        candidates=candidates,
        truth=truth or None,
        shards=shards,
        width=width,
        height=height,
        min_count=min_count,
        min_fraction=min_fraction,
        ref_sites_fraction=ref_sites_fraction,
        het_alt_images=not no_het_alt_images,
        overwrite=overwrite,
        progress=not quiet,
    )
    typer.echo(res.summary())


def demo_cmd(
    out: Path = typer.Option(Path("dvprobe-demo"), "--out", help="Output directory."),
    model: Path | None = typer.Option(
        None, "--model", help="BUNDLE from `dvprobe convert` (default: untrained reference)."
    ),
    seed: int = typer.Option(0, help="Seed of the simulation, model and analyses."),
    length: int = typer.Option(400_000, help="Simulated genome length in bp."),
    coverage: float = typer.Option(30.0, help="Simulated sequencing depth."),
    n_mosaic: int = typer.Option(42, help="Planted mosaic SNVs (the blog pushed 42 through)."),
    ref_sites_fraction: float = typer.Option(
        0.005, help="Share of other covered positions emitted as hom-ref examples."
    ),
    layers: str = typer.Option(",".join(DEMO_LAYERS), help="Layers to extract (need mixed5)."),
    dtype: str = typer.Option("fp32", help="fp32 | bf16 | fp16 for extraction."),
    device: str = typer.Option("auto", help="auto | cpu | cuda[:N]."),
    batch_size: int = typer.Option(32, "--batch-size"),
    backend: str = typer.Option("auto", help="Analysis backend: auto | cuml | sklearn."),
    quiet: bool = typer.Option(False, "--quiet", "--no-progress", help="Only the final summary."),
) -> None:
    """Run the whole job on simulated data: simulate -> make-examples -> extract -> cluster
    (k-means, hierarchical, multi-layer) -> annotate with the planted truth -> enrich -> report.
    """
    from probing.commands_analysis import setup_analysis_logging
    from probing.demo import run_demo

    if not quiet:
        setup_analysis_logging()
    res = run_demo(
        out,
        model=model,
        seed=seed,
        length=length,
        coverage=coverage,
        n_mosaic=n_mosaic,
        ref_sites_fraction=ref_sites_fraction,
        layers=[x for x in layers.split(",") if x],
        dtype=dtype,
        device=device,
        batch_size=batch_size,
        backend=backend,
        progress=not quiet,
    )
    typer.echo("")
    typer.echo(res.summary())


def register(app: typer.Typer) -> None:
    """Attach this area's commands to the ``dvprobe`` app."""
    app.command("simulate")(simulate_cmd)
    app.command("make-examples")(make_examples_cmd)
    app.command("demo")(demo_cmd)
