"""CLI commands of this area (registered by cli.py): ``simulate``, ``make-examples``, ``demo``.

Thin wrappers: parse options into :class:`probing.simulate.SimulationConfig`,
:class:`probing.make_examples.MakeExamplesConfig` or :class:`probing.demo.DemoConfig`, call
the Python API and print its summary. Heavy imports happen inside the commands so
``dvprobe --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dvtorch.errors import DvprobeError
from probing.demo import DEMO_LAYERS

Quiet = Annotated[
    bool, typer.Option("--quiet", "--no-progress", help="No progress bar.")
]


def _pair(text: str, what: str) -> tuple[float, float]:
    """Parse ``lo,hi`` option values (e.g. ``--mosaic-vaf 0.03,0.2``)."""
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise DvprobeError(f"--{what}: expected 'lo,hi' (two numbers), got {text!r}") from None
    return lo, hi


def _names(text: str) -> tuple[str, ...]:
    """Parse a comma-separated list (``chr20,chr21``), dropping empty items."""
    return tuple(x for x in text.split(",") if x)


def simulate_cmd(
    out: Annotated[Path, typer.Option("--out", help="Output directory (created).")],
    seed: Annotated[int, typer.Option(help="Random seed; same seed -> same data.")] = 0,
    length: Annotated[
        int, typer.Option(help="Total reference length in bp (split 3:2 over two contigs).")
    ] = 400_000,
    contigs: Annotated[str, typer.Option(help="Comma-separated contig names.")] = "chr20,chr21",
    coverage: Annotated[float, typer.Option(help="Mean sequencing depth.")] = 30.0,
    read_length: Annotated[int, typer.Option(help="Read length of each mate.")] = 150,
    insert_mean: Annotated[float, typer.Option(help="Mean fragment length.")] = 400.0,
    insert_sd: Annotated[float, typer.Option(help="Fragment length SD.")] = 80.0,
    n_line_families: Annotated[int, typer.Option(help="LINE-like families (L1Sim1..).")] = 2,
    line_copies: Annotated[int, typer.Option(help="Copies per LINE family.")] = 8,
    line_length: Annotated[int, typer.Option(help="LINE consensus length.")] = 6000,
    line_divergence: Annotated[
        str, typer.Option(help="Copy divergence range lo,hi.")
    ] = "0.02,0.10",
    young_fraction: Annotated[
        float, typer.Option(help="Fraction of near-identical young copies.")
    ] = 0.3,
    segdup_length: Annotated[
        int, typer.Option(help="Reference segmental duplication length (0: none).")
    ] = 8000,
    cnv_length: Annotated[
        int, typer.Option(help="Sample copy-number gain length (0: none).")
    ] = 20_000,
    n_homopolymers: Annotated[int, typer.Option(help="Planted homopolymers.")] = 30,
    n_strs: Annotated[int, typer.Option(help="Planted short tandem repeats.")] = 40,
    n_low_complexity: Annotated[
        int, typer.Option(help="Planted two-letter low-complexity runs.")
    ] = 15,
    snv_rate: Annotated[float, typer.Option(help="Germline SNVs per bp.")] = 1e-3,
    indel_rate: Annotated[float, typer.Option(help="Germline small indels per bp.")] = 1.2e-4,
    n_mosaic: Annotated[int, typer.Option(help="Mosaic SNVs.")] = 40,
    mosaic_vaf: Annotated[str, typer.Option(help="Mosaic VAF range lo,hi.")] = "0.03,0.20",
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Replace the files of an earlier simulation in --out."),
    ] = False,
    quiet: Quiet = False,
) -> None:
    """Simulate a diploid sample with planted LINEs, segdup, CN gain, low-complexity
    repeats, germline and mosaic variants (FASTA, BAM, truth VCFs, rmsk, BEDs)."""
    from probing.simulate import SimulationConfig, simulate, simulation_summary

    config = SimulationConfig(
        out,
        seed=seed,
        length=length,
        contigs=_names(contigs),
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
    )
    typer.echo(simulation_summary(simulate(config, progress=not quiet)))


def make_examples_cmd(
    ref: Annotated[Path, typer.Option("--ref", help="Reference FASTA (with .fai).")],
    reads: Annotated[
        Path, typer.Option("--reads", help="Indexed, coordinate-sorted BAM/CRAM.")
    ],
    out: Annotated[
        str,
        typer.Option("--out", help="Output file or sharded spec, e.g. examples.tfrecord@4.gz."),
    ],
    sites: Annotated[
        Optional[Path],  # noqa: UP045  (typer needs Optional on py3.10)
        typer.Option(
            "--sites",
            help="VCF: make examples for these variants; BED: find candidates inside these "
            "regions.",
        ),
    ] = None,
    candidates: Annotated[
        bool, typer.Option("--candidates", help="Find candidates over the whole BAM.")
    ] = False,
    truth: Annotated[
        Optional[list[Path]],  # noqa: UP045
        typer.Option("--truth", help="Truth VCF(s) for labels (repeatable: germline + mosaic)."),
    ] = None,
    shards: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option("--shards", help="Number of shards (or use name@N.gz)."),
    ] = None,
    width: Annotated[int, typer.Option(help="Pileup width (odd).")] = 221,
    height: Annotated[int, typer.Option(help="Pileup height (5 reference rows + reads).")] = 100,
    min_count: Annotated[
        int, typer.Option(help="Candidates: min reads carrying the allele.")
    ] = 2,
    min_fraction: Annotated[float, typer.Option(help="Candidates: min allele fraction.")] = 0.05,
    ref_sites_fraction: Annotated[
        float,
        typer.Option(
            help="Candidates: fraction of other covered positions emitted as hom-ref examples."
        ),
    ] = 0.0,
    no_het_alt_images: Annotated[
        bool,
        typer.Option("--no-het-alt-images", help="Multi-allelic: only single-alt examples."),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace output files that already exist.")
    ] = False,
    quiet: Quiet = False,
) -> None:
    """Encode DeepVariant-format pileup examples (100x221x7 WGS channels) with pysam."""
    from probing.make_examples import MakeExamplesConfig, make_examples

    config = MakeExamplesConfig(
        ref,
        reads,
        out,
        sites=sites,
        candidates=candidates,
        truth=truth,
        shards=shards,
        width=width,
        height=height,
        min_count=min_count,
        min_fraction=min_fraction,
        ref_sites_fraction=ref_sites_fraction,
        het_alt_images=not no_het_alt_images,
        overwrite=overwrite,
    )
    typer.echo(make_examples(config, progress=not quiet).summary())


def demo_cmd(
    out: Annotated[Path, typer.Option("--out", help="Output directory.")] = Path("dvprobe-demo"),
    model: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            "--model", help="BUNDLE from `dvprobe convert` (default: untrained reference)."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the simulation, model and analyses.")] = 0,
    length: Annotated[int, typer.Option(help="Simulated genome length in bp.")] = 400_000,
    coverage: Annotated[float, typer.Option(help="Simulated sequencing depth.")] = 30.0,
    n_mosaic: Annotated[
        int, typer.Option(help="Planted mosaic SNVs (the blog pushed 42 through).")
    ] = 42,
    ref_sites_fraction: Annotated[
        float, typer.Option(help="Share of other covered positions emitted as hom-ref examples.")
    ] = 0.005,
    layers: Annotated[
        str, typer.Option(help="Layers to extract (need mixed5).")
    ] = ",".join(DEMO_LAYERS),
    dtype: Annotated[str, typer.Option(help="fp32 | bf16 | fp16 for extraction.")] = "fp32",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda[:N].")] = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size")] = 32,
    backend: Annotated[
        str, typer.Option(help="Analysis backend: auto | cuml | sklearn.")
    ] = "auto",
    quiet: Annotated[
        bool, typer.Option("--quiet", "--no-progress", help="Only the final summary.")
    ] = False,
) -> None:
    """Run the whole job on simulated data: simulate -> make-examples -> extract -> cluster
    (k-means, hierarchical, multi-layer) -> annotate with the planted truth -> enrich -> report.
    """
    from probing.commands_analysis import setup_analysis_logging
    from probing.demo import DemoConfig, run_demo

    config = DemoConfig(
        out,
        model=model,
        seed=seed,
        length=length,
        coverage=coverage,
        n_mosaic=n_mosaic,
        ref_sites_fraction=ref_sites_fraction,
        layers=_names(layers),
        dtype=dtype,
        device=device,
        batch_size=batch_size,
        backend=backend,
    )
    if not quiet:
        setup_analysis_logging()
    res = run_demo(config, progress=not quiet)
    typer.echo("")
    typer.echo(res.summary())


def register(app: typer.Typer) -> None:
    """Attach this area's commands to the ``dvprobe`` app."""
    app.command("simulate")(simulate_cmd)
    app.command("make-examples")(make_examples_cmd)
    app.command("demo")(demo_cmd)
