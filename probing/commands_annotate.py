"""CLI commands ``annotate``, ``enrich``, ``report`` and ``show`` (registered by cli.py).

Thin wrappers over :mod:`probing.annotate`, :mod:`probing.enrich`, :mod:`probing.report`
and :mod:`probing.show`: parse options, call the API, print what was done (with the
counts a user should sanity-check, e.g. how many truth-set records matched no example).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from dvtorch.errors import DvprobeError


class CliUsageError(DvprobeError):
    """Options that contradict each other."""


def _split(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


class _Stderr(logging.StreamHandler):
    """A handler writing to ``sys.stderr`` as it is when a record comes, not as it was when
    the handler was made (a test runner or notebook may have replaced, then closed, it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _warnings_to_stderr() -> None:
    """Annotation warnings (chromosome renames ...) must be seen, not buried in a log."""
    for name in ("probing.annotate", "probing.enrich", "probing.probe", "probing.report"):
        lg = logging.getLogger(name)
        if not lg.handlers:
            h = _Stderr()
            h.setFormatter(logging.Formatter("dvprobe: warning: %(message)s"))
            lg.addHandler(h)
            lg.setLevel(logging.WARNING)
            lg.propagate = False


StoreArg = Annotated[Path, typer.Argument(help="STORE directory")]
Seed = Annotated[int, typer.Option("--seed")]


def _annotation_sources(bed: list[Path] | None, rmsk: Path | None, repeat_class: str | None,
                        repeat_family: str | None, vcf: Path | None, match_alleles: bool,
                        name: str | None, by: str, cvo: str | None = None) -> list:
    """The command line's files as :mod:`probing.annotate` sources (BEDs, then rmsk, then
    VCF, then call_variants output); refuses flags that belong to a file type not given."""
    from probing import annotate as an

    if (repeat_class or repeat_family) and rmsk is None:
        raise CliUsageError("annotate: --repeat-class/--repeat-family need --rmsk")
    if match_alleles and vcf is None:
        raise CliUsageError("annotate: --match-alleles needs --vcf")
    sources = [an.Bed(b, name, by) for b in bed or []]
    if rmsk is not None:
        sources.append(an.RepeatMasker(rmsk, name, by, _split(repeat_class),
                                       _split(repeat_family)))
    if vcf is not None:
        sources.append(an.Vcf(vcf, name, by, match_alleles))
    if cvo is not None:
        sources.append(an.Cvo(cvo, name, by))
    if name and len(sources) > 1:
        raise CliUsageError("annotate: --name applies to a single source")
    return sources


def annotate_cmd(
    store: StoreArg,
    bed: Annotated[list[Path] | None, typer.Option(
        "--bed", help="BED(.gz) / GIAB stratification; repeatable (column = file stem)")] = None,
    rmsk: Annotated[Path | None, typer.Option(
        "--rmsk", help="UCSC rmsk.txt(.gz) or RepeatMasker .out")] = None,
    repeat_class: Annotated[str | None, typer.Option(
        "--repeat-class", help="with --rmsk: repClass filter, e.g. LINE (comma list)")] = None,
    repeat_family: Annotated[str | None, typer.Option(
        "--repeat-family", help="with --rmsk: repFamily filter, e.g. L1")] = None,
    vcf: Annotated[Path | None, typer.Option(
        "--vcf", help="truth VCF(.gz), matched by chrom + POS")] = None,
    match_alleles: Annotated[bool, typer.Option(
        "--match-alleles", help="with --vcf: REF and a selected ALT must match")] = False,
    name: Annotated[str | None, typer.Option(
        "--name", help="column name (one source only)")] = None,
    by: Annotated[str, typer.Option(
        "--by", help="variant: [pos, end) (VCF: same POS) | locus: the pileup window "
                     "pos ± (width-1)/2 of the STORE's examples (±110 for WGS) overlaps / "
                     "holds a record")] = "variant",
    cvo: Annotated[str | None, typer.Option(
        "--cvo", help="DeepVariant's call_variants output (file, name@N.tfrecord.gz, glob or "
                      "comma list): its probabilities and genotype as columns dv_p_hom_ref, "
                      "dv_p_het, dv_p_hom_alt, dv_genotype, joined by key (--name: the "
                      "prefix)")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="replace annotation columns that already exist")] = False,
) -> None:
    """Add boolean obs columns from BED / RepeatMasker / VCF files, and DeepVariant's own
    probabilities from its call_variants output."""
    from probing.annotate import annotate

    _warnings_to_stderr()
    sources = _annotation_sources(bed, rmsk, repeat_class, repeat_family, vcf, match_alleles,
                                  name, by, cvo)
    for result in annotate(store, sources, overwrite=overwrite):
        typer.echo(result.summary())


def enrich_cmd(
    store: StoreArg,
    run: Annotated[str, typer.Option("--run", help="analysis run name")],
    by: Annotated[str, typer.Option(
        "--by", help="boolean attributes, comma list: LINE (= rmsk_LINE), mosaic, label=1 ...")],
    level: Annotated[str, typer.Option(
        "--level", help="cluster | level1 | node (level1, node: hierarchical runs)")
                     ] = "cluster",
    continuous: Annotated[str | None, typer.Option(
        "--continuous", help="numeric columns summarised per cluster (default depth,mean_mapq,"
                             "frac_low_mapq,mean_baseq,alt_fraction)")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="write table.csv or table.md")
                   ] = None,
    min_count: Annotated[int, typer.Option(
        "--min-count", help="print only cells with >= this many members")] = 1,
) -> None:
    """Per cluster x attribute: shares, fold enrichment, Fisher p, BH q."""
    from probing import enrich as en

    _warnings_to_stderr()
    if out is not None:
        en.check_output(out)
    res = en.enrich(store, run, _split(by) or [], level=level, continuous=_split(continuous))
    for ld in res.landings:
        typer.echo(ld.summary())
    shown = res.table[res.table["count"] >= min_count]
    typer.echo(en.to_markdown(shown))
    if out is not None:
        en.write_enrichment(res, out)
        for written in en.enrichment_outputs(res, out):
            typer.echo(f"wrote {written}")


def _print_probes(res, pr) -> None:
    typer.echo(res.header() + ".")
    if (res.table["metric"] == "AUROC").any():
        typer.echo(res.counts())
    typer.echo(pr.profile_markdown(res))
    for line in res.peaks():
        typer.echo(line)
    for note in res.notes:
        typer.echo(f"note: {note}")


def probe_cmd(
    store: StoreArg,
    concepts: Annotated[str | None, typer.Option(
        "--concepts", help="comma list: yes/no concepts (LINE = rmsk_LINE, mosaic, label=1 ...) "
                           "and numeric columns (depth, alt_fraction ...); default: every "
                           "boolean annotation + depth,mean_mapq,alt_fraction")] = None,
    layers: Annotated[str | None, typer.Option(
        "--layers", help="default: every layer of the STORE")] = None,
    folds: Annotated[int, typer.Option("--folds", help="cross-validation folds")] = 5,
    block_bp: Annotated[int, typer.Option(
        "--block-bp", help="examples within one block of this many bp share a fold (0: folds "
                           "by position)")] = 1_000_000,
    pca: Annotated[int, typer.Option(
        "--pca", help="PCA components fitted inside each fold (0: none)")] = 50,
    max_rows: Annotated[int, typer.Option(
        "--max-rows", help="probe a seeded sample of at most this many examples")] = 50_000,
    seed: Seed = 0,
    baseline: Annotated[Path | None, typer.Option(
        "--baseline", help="STORE of the same examples from another model (the untrained "
                           "reference): gain per cell")] = None,
    name: Annotated[str, typer.Option(
        "--name", help="saved as STORE/probes/NAME.json (the report shows it)")] = "probes",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace saved probes NAME")
                         ] = False,
    no_save: Annotated[bool, typer.Option(
        "--no-save", help="do not save in the STORE (e.g. a read-only one)")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="also write table.csv or table.md")
                   ] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress")] = False,
) -> None:
    """Linear probe per layer x concept: where in the network is a concept decodable?"""
    from probing import probe as pr
    from probing.store import open_store

    _warnings_to_stderr()
    if out is not None:
        pr.check_output(out)
    st = open_store(store)
    if not no_save:
        pr.check_new(st, name, overwrite)
        pr.check_writable(st, name)
    res = pr.probe_layers(st, _split(concepts), _split(layers), folds=folds, pca=pca,
                          block_bp=block_bp, max_rows=max_rows, seed=seed,
                          progress=not no_progress, baseline=baseline)
    _print_probes(res, pr)
    if not no_save:
        typer.echo(f"saved {pr.save_probes(st, res, name)}")
    if out is not None:
        typer.echo(f"wrote {pr.write_probes(res, out)}")


def report_cmd(
    store: StoreArg,
    out: Annotated[Path, typer.Option("--out", help="HTML file")] = Path("report.html"),
    run: Annotated[list[str] | None, typer.Option(
        "--run", help="run(s) to show (default: all)")] = None,
    max_points: Annotated[int, typer.Option(
        "--max-points", help="points plotted in the browser (random sample; rare-attribute "
                             "rows always kept)")] = 20000,
    attributes: Annotated[str | None, typer.Option(
        "--attributes", help="boolean attributes (default: every annotation)")] = None,
    continuous: Annotated[str | None, typer.Option(
        "--continuous", help="numeric columns (default depth,mean_mapq,alt_fraction)")] = None,
    thumbnails: Annotated[int, typer.Option(
        "--thumbnails", min=0, help="pileup thumbnails embedded (0 = none)")] = 120,
    examples: Annotated[str | None, typer.Option(
        "--examples", help="where the STORE's examples shards are now (if moved)")] = None,
    export_dir: Annotated[Path | None, typer.Option(
        "--export-dir", help="also write every figure as PNG and SVG here")] = None,
    seed: Seed = 0,
) -> None:
    """One self-contained offline HTML report (UMAPs, enrichment, pileups)."""
    from probing.report import build_report

    _warnings_to_stderr()
    res = build_report(store, out, runs=run or None, max_points=max_points,
                       attributes=_split(attributes), continuous=_split(continuous),
                       thumbnails=thumbnails, examples=examples, export_dir=export_dir,
                       seed=seed)
    typer.echo(res.summary())
    if res.exported:
        typer.echo(f"exported {len(res.exported)} files to {export_dir}")


def show_cmd(
    examples: Annotated[str | None, typer.Argument(
        help="examples spec (file, name@N.gz, glob)")] = None,
    locus: Annotated[str | None, typer.Option(
        "--locus", help="chr20:10001234 (1-based variant start) or chr20:START-END")] = None,
    store: Annotated[Path | None, typer.Option(
        "--store", help="STORE to take the example from")] = None,
    key: Annotated[str | None, typer.Option(
        "--key", help="with --store: obs key of the example")] = None,
    out: Annotated[Path, typer.Option("--out", help=".png or .svg")] = Path("example.png"),
    scale: Annotated[float, typer.Option("--scale", help="PNG pixel scale")] = 2.0,
) -> None:
    """Render an example's pileup channels as labelled images."""
    from probing.show import describe, show

    for s in show(examples, locus=locus, store=store, key=key, out=out, scale=scale):
        typer.echo(f"{describe(s.example)} -> {s.path}")


def register(app: typer.Typer) -> None:
    """Attach ``annotate``, ``enrich``, ``probe``, ``report`` and ``show`` to the app."""
    app.command("annotate")(annotate_cmd)
    app.command("enrich")(enrich_cmd)
    app.command("probe")(probe_cmd)
    app.command("report")(report_cmd)
    app.command("show")(show_cmd)
