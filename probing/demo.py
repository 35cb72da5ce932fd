"""The one-command demo: the blog's whole analysis on a simulated sample with planted concepts.

``run_demo(out)`` chains the public APIs, exactly as a user would on real data:

1. :func:`probing.simulate.simulate` — FASTA, BAM, truth VCFs, rmsk and stratification BEDs
   with planted LINEs, segdup, CN gain, low-complexity runs, germline and mosaic variants;
2. :func:`probing.make_examples.make_examples` — DeepVariant-format examples at candidate
   sites plus a sample of hom-ref positions (labels from the truth VCFs), and a second set at
   the mosaic truth sites (the blog's "42 known mosaic variants");
3. the model — the user's converted bundle (``model=``) or an *untrained* seeded reference
   bundle, which is said loudly in the summary: its clusters reflect how an arbitrary
   Inception-v3 responds to pileups, not what DeepVariant learned;
4. :func:`probing.extract.extract` of six layers (max-pooled);
5. k-means (k=10) + UMAP on mixed5, hierarchical k-means (3 → auto split) on mixed5, the
   multi-layer pipeline (k=12), and ``apply`` of the mosaic set through the k-means run;
6. :mod:`probing.annotate` with the planted truth, :mod:`probing.enrich`, a linear probe
   of every layer for every planted concept (:mod:`probing.probe`), and the offline HTML
   report.

Every intermediate is an ordinary file the other commands accept (the STORE can be clustered
again, the examples re-extracted with another model), so the demo doubles as a template.
Re-running with the same ``out`` reuses finished steps (simulation, examples, extraction).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from dvtorch.errors import DvprobeError

DEMO_LAYERS = ("mixed1", "mixed3", "mixed5", "mixed7", "mixed9", "mixed10")
KMEANS_RUN = "kmeans10-mixed5"
HKMEANS_RUN = "hkmeans3-mixed5"
MULTILAYER_RUN = "multilayer12"
MOSAIC_RUN = f"{KMEANS_RUN}-mosaic"

#: concept name in ``planted_concepts`` -> (obs column written by the demo, kind)
CONCEPT_COLUMNS = {
    "line": ("LINE", "rmsk"),
    "segdup": ("segdup", "bed"),
    "lowmappability": ("lowmappability", "bed"),
    "lowcomplexity": ("lowcomplexity", "bed"),
    "cnv_gain": ("cnv_gain", "bed"),
    "mosaic": ("mosaic", "vcf"),
    "germline": ("germline", "vcf"),
}


@dataclass
class DemoResult:
    """Paths and headline numbers of one demo run."""

    out: Path
    report: Path
    store: Path
    mosaic_store: Path
    untrained: bool
    n_examples: int
    n_mosaic_examples: int
    recovery: dict[str, pd.DataFrame]  # run -> best cluster per concept
    mosaic_landing: str
    mosaic_counts: pd.Series  # k-means cluster -> mosaic truth examples that landed there
    seconds: dict[str, float] = field(default_factory=dict)
    enrichment_files: list[Path] = field(default_factory=list)
    probes: pd.DataFrame | None = None  # per planted concept: best layer, score, last layer
    probe_header: str = ""

    def summary(self) -> str:
        """The one-screen summary the CLI prints."""
        model = (
            "UNTRAINED seeded reference model (no DeepVariant weights): clusters show how "
            "an arbitrary Inception-v3 groups pileups, not what DeepVariant learned; pass "
            "--model BUNDLE from `dvprobe convert`"
            if self.untrained
            else "converted DeepVariant model"
        )
        lines = [
            f"dvprobe demo: {self.n_examples} examples, {self.n_mosaic_examples} mosaic "
            f"truth examples; model: {model}",
            "",
        ]
        for run, table in self.recovery.items():
            lines.append(
                f"best cluster per planted concept, run {run!r} "
                "(purity = share of the cluster with the concept; capture = share of "
                "the concept in the cluster):"
            )
            lines.append(format_recovery(table))
            lines.append("")
        if self.probes is not None:
            lines.append(f"where each planted concept is decodable ({self.probe_header}):")
            lines.append(format_probes(self.probes))
            lines.append("")
        lines.append(f"mosaic truth set through {KMEANS_RUN!r}: {self.mosaic_landing}")
        total = sum(self.seconds.values())
        steps = ", ".join(f"{k} {v:.0f}s" for k, v in self.seconds.items())
        lines += [
            f"time: {total:.0f}s ({steps})",
            f"STORE:  {self.store}",
            f"tables: {self.out / 'enrichment'}",
            f"report: {self.report}",
        ]
        return "\n".join(lines)


def format_recovery(table: pd.DataFrame) -> str:
    """Fixed-width text of a :func:`probing.enrich.best_clusters` table."""
    rows = [("concept", "examples", "cluster", "size", "purity", "capture", "fold", "q")]
    for r in table.itertuples(index=False):
        if not r.total:
            rows.append((r.attribute, "0", "-", "-", "-", "-", "-", "-"))
            continue
        rows.append(
            (
                r.attribute,
                str(r.total),
                str(r.cluster),
                str(r.n),
                f"{r.share_of_cluster:.1%}",
                f"{r.share_of_attribute:.1%}",
                f"{r.fold:.2f}",
                f"{r.q:.1e}",
            )
        )
    return _fixed_width(rows)


def _fixed_width(rows: list[tuple[str, ...]]) -> str:
    """Rows of cells as aligned text: the first column left-aligned, the others right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  "
        + "  ".join(
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    )


def format_probes(best: pd.DataFrame) -> str:
    """Fixed-width text of :meth:`probing.probe.ProbeResult.best`."""
    rows = [("concept", "best layer", "score", "± sd", "folds", "last layer", "score")]
    rows += [(r.concept, r.best_layer, f"{r.best:.3f}", f"{r.sd:.3f}", str(r.folds),
              r.last_layer, f"{r.last:.3f}") for r in best.itertuples(index=False)]
    return _fixed_width(rows)


def annotate_planted(store, truth_dir: str | os.PathLike) -> list[str]:
    """Annotate ``store`` with every planted concept of a simulation; returns the columns."""
    from probing.annotate import annotate_bed, annotate_rmsk, annotate_vcf
    from probing.simulate import planted_concepts

    files = planted_concepts(truth_dir)
    cols = []
    for concept, (column, kind) in CONCEPT_COLUMNS.items():
        if concept not in files:
            continue
        path = files[concept]
        if kind == "rmsk":
            annotate_rmsk(store, path, name=column, repeat_class=["LINE"])
        elif kind == "bed":
            annotate_bed(store, path, name=column)
        else:
            annotate_vcf(store, path, name=column)
        cols.append(column)
    return cols


@contextmanager
def _timed(seconds: dict[str, float], name: str, log: Callable[[str], None]):
    """Log the step and add its wall time to ``seconds[name]``."""
    log(f"== {name}")
    t = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t


OWNED = ("sim", "examples", "mosaic_examples", "model", "store", "mosaic_store", "enrichment")


def _done(path: Path) -> bool:
    return (path / "DONE").is_file()


def _mark(path: Path, info: dict) -> None:
    (path / "DONE").write_text(json.dumps(info) + "\n")


def _reset_if_changed(out: Path, params: dict, log: Callable[[str], None]) -> None:
    """Finished steps are reused only for identical parameters; otherwise start over.

    Only directories an earlier demo run created (``demo.json`` says so) are removed; a
    directory that holds same-named folders of someone else's is refused, never cleared.
    """
    stamp = out / "demo.json"
    if stamp.is_file():
        try:
            old = json.loads(stamp.read_text())
        except json.JSONDecodeError:
            old = None
        if old == params:
            return
        log(f"parameters differ from the previous run in {out}: starting over")
        for name in OWNED:
            if (out / name).exists():
                shutil.rmtree(out / name)
    else:
        clash = [name for name in OWNED if (out / name).exists()]
        if clash:
            raise DvprobeError(
                f"{out}: already holds {', '.join(clash)} not written by `dvprobe demo` "
                "(no demo.json); give --out a new or empty directory"
            )
    stamp.write_text(json.dumps(params, indent=1) + "\n")


def run_demo(
    out: str | os.PathLike,
    *,
    model: str | os.PathLike | None = None,
    seed: int = 0,
    length: int = 400_000,
    coverage: float = 30.0,
    n_mosaic: int = 42,
    ref_sites_fraction: float = 0.005,
    layers: Sequence[str] = DEMO_LAYERS,
    dtype: str = "fp32",
    device: str = "auto",
    batch_size: int = 32,
    workers: int | None = None,
    backend: str = "auto",
    k: int = 10,
    multilayer_k: int = 12,
    report_points: int = 20000,
    sim_options: dict | None = None,
    progress: bool = True,
) -> DemoResult:
    """Run the whole pipeline into ``out`` (see module doc) and return a :class:`DemoResult`.

    ``model`` is a BUNDLE from ``dvprobe convert`` (or ``weights fetch`` + convert); without
    it a seeded untrained reference bundle is written to ``out/model``. Sizes are flags so
    tests can run the same path in seconds; ``sim_options`` passes further keyword arguments
    to :func:`probing.simulate.simulate` (e.g. fewer, shorter LINE copies for a tiny genome).
    """
    import dvtorch
    from dvtorch.bundle import META_FILE, read_meta
    from probing import analysis as pa
    from probing.enrich import best_clusters, enrich, landing, write_enrichment
    from probing.extract import extract
    from probing.make_examples import make_examples
    from probing.probe import ProbeError, probe_layers, save_probes, write_probes
    from probing.report import build_report
    from probing.simulate import simulate
    from probing.store import open_store

    layers = list(layers)
    if "mixed5" not in layers:
        raise DvprobeError(f"the demo clusters mixed5 (as the blog); --layers {layers} lacks it")
    # Refuse a bad device or model now, not after simulating and making examples.
    from probing.extract import resolve_device

    resolve_device(device)
    if model:
        read_meta(model)
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    def log(msg: str) -> None:
        if progress:
            print(f"[dvprobe demo] {msg}", flush=True)

    params = {
        "model": str(model) if model else None,
        "seed": seed,
        "length": length,
        "coverage": coverage,
        "n_mosaic": n_mosaic,
        "ref_sites_fraction": ref_sites_fraction,
        "layers": layers,
        "dtype": dtype,
        "sim_options": sim_options or {},
    }
    _reset_if_changed(out, params, log)
    sim_dir = out / "sim"
    with _timed(seconds, "simulate", log):
        if not _done(sim_dir):
            simulate(
                sim_dir,
                seed=seed,
                length=length,
                coverage=coverage,
                n_mosaic=n_mosaic,
                overwrite=True,  # an unfinished earlier attempt (no done mark)
                progress=progress,
                **(sim_options or {}),
            )
            _mark(sim_dir, {"seed": seed, "length": length, "coverage": coverage})
        else:
            log(f"reusing {sim_dir}")
        truth = json.loads((sim_dir / "truth.json").read_text())["files"]
        ref, bam = sim_dir / truth["reference"], sim_dir / truth["bam"]
        germline, mosaic = sim_dir / truth["truth_vcf"], sim_dir / truth["mosaic_vcf"]

    ex_dir, mos_dir = out / "examples", out / "mosaic_examples"
    spec = str(ex_dir / "examples.tfrecord@2.gz")
    mos_spec = str(mos_dir / "mosaic.tfrecord.gz")

    def encode(directory: Path, examples_spec: str, **options) -> None:
        """make_examples into ``directory`` unless a finished earlier run left it there."""
        if _done(directory):
            return
        directory.mkdir(parents=True, exist_ok=True)
        res = make_examples(ref, bam, examples_spec, truth=[germline, mosaic],
                            overwrite=True, progress=progress, **options)
        log(res.summary())
        _mark(directory, {"n": res.n_examples})

    with _timed(seconds, "make_examples", log):
        encode(ex_dir, spec, candidates=True, ref_sites_fraction=ref_sites_fraction)
        encode(mos_dir, mos_spec, sites=mosaic, het_alt_images=False)

    if model is None:
        bundle = out / "model"
        if not (bundle / META_FILE).is_file():
            dvtorch.reference_bundle(bundle, seed=seed, overwrite=True)
    else:
        bundle = Path(model).expanduser()
    untrained = bool(read_meta(bundle).get("untrained", False))

    store_path, mos_store_path = out / "store", out / "mosaic_store"
    with _timed(seconds, "extract", log):
        common = dict(
            layers=layers,
            pool="max",
            device=device,
            batch_size=batch_size,
            workers=workers,
            dtype=dtype,
            progress=progress,
        )
        store = extract(bundle, spec, store_path, **common)
        mos_store = extract(bundle, mos_spec, mos_store_path, **common)

    with _timed(seconds, "annotate", log):
        columns = annotate_planted(store, sim_dir)
        annotate_planted(mos_store, sim_dir)
        store, mos_store = open_store(store_path), open_store(mos_store_path)

    with _timed(seconds, "cluster", log):
        pa.kmeans(
            store, "mixed5", k=k, pca=50, umap=True, backend=backend, seed=seed, run=KMEANS_RUN
        )
        pa.hierarchical_kmeans(
            store,
            "mixed5",
            k=3,
            split="auto",
            pca=50,
            umap=True,
            backend=backend,
            seed=seed,
            run=HKMEANS_RUN,
        )
        pa.multilayer(
            store, layers, k=multilayer_k, umap=True, backend=backend, seed=seed, run=MULTILAYER_RUN
        )
        applied = pa.apply(store, KMEANS_RUN, mos_store, name=MOSAIC_RUN, backend=backend)

    with _timed(seconds, "enrich", log):
        enrich_dir = out / "enrichment"
        enrich_dir.mkdir(exist_ok=True)
        recovery, written = {}, []
        for run, level in (
            (KMEANS_RUN, "cluster"),
            (HKMEANS_RUN, "node"),
            (MULTILAYER_RUN, "cluster"),
        ):
            res = enrich(store, run, columns, level=level)
            written.append(write_enrichment(res, enrich_dir / f"{run}.md"))
            written.append(write_enrichment(res, enrich_dir / f"{run}.csv"))
            if run != HKMEANS_RUN:
                recovery[run] = best_clusters(res.table)
        vc = applied.counts["n"]
        mosaic_landing = landing(applied.run.obs[applied.column], None, MOSAIC_RUN).where()

    with _timed(seconds, "probe", log):
        # Blocks of a twentieth of the simulated genome (20 kb for the default 400 kb): the
        # 1 Mb default of `dvprobe probe` is for whole genomes. A concept too rare for the
        # folds is listed as not probed; none probeable (a tiny test genome) is said, not fatal.
        try:
            probes = probe_layers(store, columns, layers, block_bp=max(1_000, length // 20),
                                  seed=seed, progress=False)
        except ProbeError as exc:
            probes = None
            log(f"linear probes skipped: {exc}")
        if probes is not None:
            save_probes(store, probes, "planted")
            written.append(write_probes(probes, enrich_dir / "probes.md"))
            for note in probes.notes:
                log(f"probe note: {note}")

    with _timed(seconds, "report", log):
        report = build_report(
            store,
            out / "report.html",
            max_points=report_points,
            examples=spec,
            seed=seed,
            title="dvprobe demo" + (" (UNTRAINED model)" if untrained else ""),
        )
        log(report.summary())

    return DemoResult(
        out=out,
        report=report.path,
        store=store_path,
        mosaic_store=mos_store_path,
        untrained=untrained,
        n_examples=store.n,
        n_mosaic_examples=mos_store.n,
        recovery=recovery,
        mosaic_landing=mosaic_landing,
        mosaic_counts=vc,
        seconds=seconds,
        enrichment_files=written,
        probes=probes.best() if probes is not None else None,
        probe_header=(f"linear probes, held-out AUROC over {probes.folds} folds by "
                      f"{probes.block_bp // 1000} kb block" if probes is not None else ""),
    )
