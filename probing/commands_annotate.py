"""CLI commands ``annotate``, ``enrich``, ``report`` and ``show`` (registered by cli.py).

Thin wrappers over :mod:`probing.annotate`, :mod:`probing.enrich`, :mod:`probing.report`
and :mod:`probing.show`: parse options, call the API, print what was done (with the
counts a user should sanity-check, e.g. how many truth-set records matched no example).
"""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from dvtorch.errors import DvprobeError


class CliUsageError(DvprobeError):
    """Options that contradict each other."""


def _split(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _warnings_to_stderr() -> None:
    """Annotation warnings (chromosome renames ...) must be seen, not buried in a log."""
    for name in ("probing.annotate", "probing.enrich", "probing.probe", "probing.report"):
        lg = logging.getLogger(name)
        if not lg.handlers:
            h = logging.StreamHandler()
            h.setFormatter(logging.Formatter("dvprobe: warning: %(message)s"))
            lg.addHandler(h)
            lg.setLevel(logging.WARNING)
            lg.propagate = False


def register(app: typer.Typer) -> None:
    """Attach ``annotate``, ``enrich``, ``probe``, ``report`` and ``show`` to the app."""

    @app.command("annotate")
    def annotate_cmd(
        store: Path = typer.Argument(..., help="STORE directory"),
        bed: list[Path] = typer.Option(None, "--bed", help="BED(.gz) / GIAB stratification; "
                                       "repeatable (column = file stem)"),
        rmsk: Path = typer.Option(None, "--rmsk", help="UCSC rmsk.txt(.gz) or RepeatMasker .out"),
        repeat_class: str = typer.Option(None, "--repeat-class",
                                         help="with --rmsk: repClass filter, e.g. LINE "
                                              "(comma list)"),
        repeat_family: str = typer.Option(None, "--repeat-family",
                                          help="with --rmsk: repFamily filter, e.g. L1"),
        vcf: Path = typer.Option(None, "--vcf", help="truth VCF(.gz), matched by chrom + POS"),
        match_alleles: bool = typer.Option(False, "--match-alleles",
                                           help="with --vcf: REF and a selected ALT must match"),
        name: str = typer.Option(None, "--name", help="column name (one source only)"),
        by: str = typer.Option("variant", "--by",
                               help="variant: [pos, end) (VCF: same POS) | locus: the pileup "
                                    "window pos±110 overlaps / holds a record"),
        overwrite: bool = typer.Option(False, "--overwrite",
                                       help="replace annotation columns that already exist"),
    ) -> None:
        """Add boolean obs columns from BED / RepeatMasker / VCF files."""
        from probing import annotate as an
        from probing.store import open_store

        _warnings_to_stderr()
        sources = len(bed or []) + (rmsk is not None) + (vcf is not None)
        if sources == 0:
            raise CliUsageError("annotate: give --bed, --rmsk or --vcf")
        if name and sources > 1:
            raise CliUsageError("annotate: --name applies to a single source")
        if (repeat_class or repeat_family) and rmsk is None:
            raise CliUsageError("annotate: --repeat-class/--repeat-family need --rmsk")
        if match_alleles and vcf is None:
            raise CliUsageError("annotate: --match-alleles needs --vcf")
        if match_alleles and by == "locus":
            raise CliUsageError("annotate: --match-alleles compares an example's own site; "
                                "it cannot be combined with --by locus")
        # Every column name is checked before anything is written, so a clash in the second
        # source does not leave the first one's column behind.
        planned = [(b, name or an.default_name("bed", b)) for b in bed or []]
        if rmsk is not None:
            planned.append((rmsk, name or an.default_name("rmsk", rmsk, _split(repeat_class),
                                                          _split(repeat_family))))
        if vcf is not None:
            planned.append((vcf, name or an.default_name("vcf", vcf)))
        seen: dict[str, Path] = {}
        for path, col in planned:
            if col in seen:
                raise CliUsageError(f"annotate: {seen[col]} and {path} would both write column "
                                    f"{col!r}; annotate them in separate commands with --name")
            seen[col] = path
        st = open_store(store)
        if st.n:
            for path, col in planned:
                an.check_name(st, col, overwrite=overwrite,
                              from_file=None if name or path == rmsk else path)
        results = []
        for b in bed or []:
            results.append(an.annotate_bed(st, b, name=name, by=by, overwrite=overwrite))
        if rmsk is not None:
            results.append(an.annotate_rmsk(st, rmsk, name=name, by=by,
                                            repeat_class=_split(repeat_class),
                                            repeat_family=_split(repeat_family),
                                            overwrite=overwrite))
        if vcf is not None:
            results.append(an.annotate_vcf(st, vcf, name=name, match_alleles=match_alleles,
                                           by=by, overwrite=overwrite))
        for r in results:
            typer.echo(r.summary())

    @app.command("enrich")
    def enrich_cmd(
        store: Path = typer.Argument(..., help="STORE directory"),
        run: str = typer.Option(..., "--run", help="analysis run name"),
        by: str = typer.Option(..., "--by", help="boolean attributes, comma list: LINE "
                               "(= rmsk_LINE), mosaic, label=1 ..."),
        level: str = typer.Option("cluster", "--level",
                                  help="cluster | level1 | node (level1, node: hierarchical "
                                       "runs)"),
        continuous: str = typer.Option(None, "--continuous",
                                       help="numeric columns summarised per cluster "
                                            "(default depth,mean_mapq,frac_low_mapq,"
                                            "mean_baseq,alt_fraction)"),
        out: Path = typer.Option(None, "--out", help="write table.csv or table.md"),
        min_count: int = typer.Option(1, "--min-count",
                                      help="print only cells with >= this many members"),
    ) -> None:
        """Per cluster x attribute: shares, fold enrichment, Fisher p, BH q."""
        from probing import enrich as en

        _warnings_to_stderr()
        if out is not None:
            en.check_output(out)
        res = en.enrich(store, run, _split(by) or [], level=level,
                        continuous=_split(continuous))
        for ld in res.landings:
            typer.echo(ld.summary())
        shown = res.table[res.table["count"] >= min_count]
        typer.echo(en.to_markdown(shown))
        if out is not None:
            en.write_enrichment(res, out)
            for written in en.enrichment_outputs(res, out):
                typer.echo(f"wrote {written}")

    @app.command("probe")
    def probe_cmd(
        store: Path = typer.Argument(..., help="STORE directory"),
        concepts: str = typer.Option(None, "--concepts",
                                     help="comma list: yes/no concepts (LINE = rmsk_LINE, "
                                          "mosaic, label=1 ...) and numeric columns (depth, "
                                          "alt_fraction ...); default: every boolean "
                                          "annotation + depth,mean_mapq,alt_fraction"),
        layers: str = typer.Option(None, "--layers", help="default: every layer of the STORE"),
        folds: int = typer.Option(5, "--folds", help="cross-validation folds"),
        block_bp: int = typer.Option(1_000_000, "--block-bp",
                                     help="examples within one block of this many bp share a "
                                          "fold (0: folds by position)"),
        pca: int = typer.Option(50, "--pca", help="PCA components fitted inside each fold "
                                                  "(0: none)"),
        max_rows: int = typer.Option(50_000, "--max-rows",
                                     help="probe a seeded sample of at most this many examples"),
        seed: int = typer.Option(0, "--seed"),
        baseline: Path = typer.Option(None, "--baseline",
                                      help="STORE of the same examples from another model "
                                           "(the untrained reference): gain per cell"),
        name: str = typer.Option("probes", "--name",
                                 help="saved as STORE/probes/NAME.json (the report shows it)"),
        overwrite: bool = typer.Option(False, "--overwrite", help="replace saved probes NAME"),
        no_save: bool = typer.Option(False, "--no-save",
                                     help="do not save in the STORE (e.g. a read-only one)"),
        out: Path = typer.Option(None, "--out", help="also write table.csv or table.md"),
        no_progress: bool = typer.Option(False, "--no-progress"),
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
        typer.echo(res.header() + ".")
        if (res.table["metric"] == "AUROC").any():
            typer.echo(res.counts())
        typer.echo(pr.profile_markdown(res))
        for line in res.peaks():
            typer.echo(line)
        for note in res.notes:
            typer.echo(f"note: {note}")
        if not no_save:
            typer.echo(f"saved {pr.save_probes(st, res, name)}")
        if out is not None:
            typer.echo(f"wrote {pr.write_probes(res, out)}")

    @app.command("report")
    def report_cmd(
        store: Path = typer.Argument(..., help="STORE directory"),
        out: Path = typer.Option(Path("report.html"), "--out", help="HTML file"),
        run: list[str] = typer.Option(None, "--run", help="run(s) to show (default: all)"),
        max_points: int = typer.Option(20000, "--max-points",
                                       help="points plotted in the browser (random sample; "
                                            "rare-attribute rows always kept)"),
        attributes: str = typer.Option(None, "--attributes",
                                       help="boolean attributes (default: every annotation)"),
        continuous: str = typer.Option(None, "--continuous",
                                       help="numeric columns (default depth,mean_mapq,"
                                            "alt_fraction)"),
        thumbnails: int = typer.Option(120, "--thumbnails", min=0,
                                       help="pileup thumbnails embedded (0 = none)"),
        examples: str = typer.Option(None, "--examples",
                                     help="where the STORE's examples shards are now "
                                          "(if moved)"),
        export_dir: Path = typer.Option(None, "--export-dir",
                                        help="also write every figure as PNG and SVG here"),
        seed: int = typer.Option(0, "--seed"),
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

    @app.command("show")
    def show_cmd(
        examples: str = typer.Argument(None, help="examples spec (file, name@N.gz, glob)"),
        locus: str = typer.Option(None, "--locus", help="chr20:10001234 (1-based variant "
                                  "start) or chr20:START-END"),
        store: Path = typer.Option(None, "--store", help="STORE to take the example from"),
        key: str = typer.Option(None, "--key", help="with --store: obs key of the example"),
        out: Path = typer.Option(Path("example.png"), "--out", help=".png or .svg"),
        scale: float = typer.Option(2.0, "--scale", help="PNG pixel scale"),
    ) -> None:
        """Render an example's pileup channels as labelled images."""
        from probing.show import describe, show

        for s in show(examples, locus=locus, store=store, key=key, out=out, scale=scale):
            typer.echo(f"{describe(s.example)} -> {s.path}")
