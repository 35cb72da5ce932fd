"""The one-command demo: the blog's whole analysis on a simulated sample with planted concepts.

``run_demo(DemoConfig(out))`` chains the public APIs, exactly as a user would on real data,
one named stage each:

1. ``simulate`` -- :func:`probing.simulate.simulate`: FASTA, BAM, truth VCFs, rmsk and
   stratification BEDs with planted LINEs, segdup, CN gain, low-complexity runs, germline and
   mosaic variants;
2. ``make_examples`` -- :func:`probing.make_examples.make_examples`: DeepVariant-format
   examples at candidate sites plus a sample of hom-ref positions (labels from the truth
   VCFs), and a second set at the mosaic truth sites (the blog's "42 known mosaic variants");
3. the model -- the user's converted bundle (``model=``) or an *untrained* seeded reference
   bundle, which is said loudly in the summary: its clusters reflect how an arbitrary
   Inception-v3 responds to pileups, not what DeepVariant learned;
4. ``extract`` -- :func:`probing.extract.extract` of six layers (max-pooled);
5. ``annotate`` -- :mod:`probing.annotate` with the planted truth;
6. ``cluster`` -- k-means (k=10) + UMAP on mixed5, hierarchical k-means (3 -> auto split)
   on mixed5, the multi-layer pipeline (k=12), and ``apply`` of the mosaic set through the
   k-means run;
7. ``enrich`` -- :mod:`probing.enrich` of every run against the planted concepts;
8. ``probe`` -- a linear probe of every layer for every planted concept
   (:mod:`probing.probe`);
9. ``explain`` -- what the calls depend on: channel ablation over a seeded sample of the
   examples (:mod:`probing.ablate`, each channel in turn set to zero signal; a table and bar
   chart in ``out/explain/ablation`` and in the report) and integrated-gradients panels of a
   few mosaic truth calls (:mod:`probing.explain`, PNGs in ``out/explain``, saved in the STORE
   so the report shows them beside the pileup). Sized to add <= 20 s on 2 CPU cores
   (docs/performance.md, "The demo's explain step"); TCAV (:mod:`probing.tcav`) is off by
   default for that budget (``tcav_examples``), ``explain=False`` skips the step;
10. ``report`` -- the offline HTML report.

Every intermediate is an ordinary file the other commands accept (the STORE can be clustered
again, the examples re-extracted with another model), so the demo doubles as a template.
Re-running with the same ``out`` reuses finished steps (simulation, examples, extraction).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
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

#: concepts the mosaic truth set is annotated with: not ``germline``, because the simulation
#: places every mosaic SNV at least 160 bp from the germline variants, so none of its
#: examples can match one (annotating would only warn that the truth VCF matched nothing).
MOSAIC_SET_CONCEPTS = tuple(c for c in CONCEPT_COLUMNS if c != "germline")


@dataclass(frozen=True)
class DemoConfig:
    """Where the demo writes, which model it probes, and the sizes of every stage.

    ``model`` is a BUNDLE from ``dvprobe convert`` (or ``weights fetch`` + convert); without
    it a seeded untrained reference bundle is written to ``out/model``. Sizes are fields so
    tests can run the same path in seconds; ``sim_options`` holds further fields of
    :class:`probing.simulate.SimulationConfig` (e.g. fewer, shorter LINE copies for a tiny
    genome). Checked when built (``DvprobeError``), simulation parameters included.
    """

    out: str | os.PathLike
    model: str | os.PathLike | None = None
    seed: int = 0
    length: int = 400_000
    coverage: float = 30.0
    n_mosaic: int = 42
    ref_sites_fraction: float = 0.005
    layers: Sequence[str] = DEMO_LAYERS
    dtype: str = "fp32"
    device: str = "auto"
    batch_size: int = 32
    workers: int | None = None
    backend: str = "auto"
    k: int = 10
    multilayer_k: int = 12
    report_points: int = 20000
    # The explain step's sizes: together <= 20 s on 2 CPU cores (docs/performance.md, "The
    # demo's explain step"): two panels at IG's default steps rather than three at half
    # (half left every measured panel of the demo over 1 % of completeness).
    explain: bool = True
    ablate_examples: int = 64
    explain_panels: int = 2
    explain_steps: int = 100
    tcav_examples: int = 0  # 0: no TCAV in the demo (over the budget); `dvprobe tcav` does it
    sim_options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out).expanduser())
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "sim_options", dict(self.sim_options or {}))
        self.validate()

    def validate(self) -> None:
        """Refuse what would fail later (no mixed5, bad simulation parameters) now."""
        if "mixed5" not in self.layers:
            raise DvprobeError(
                f"the demo clusters mixed5 (as the blog); --layers {list(self.layers)} lacks it"
            )
        for name in ("ablate_examples", "explain_panels", "tcav_examples"):
            if getattr(self, name) < 0:
                raise DvprobeError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.explain_steps < 1:
            raise DvprobeError(f"explain_steps must be >= 1, got {self.explain_steps}")
        self.simulation(self.out / "sim")

    def simulation(self, out: Path):
        """The :class:`probing.simulate.SimulationConfig` of the demo's sample in ``out``."""
        from probing.simulate import SimulationConfig

        try:
            return SimulationConfig(out, seed=self.seed, length=self.length,
                                    coverage=self.coverage, n_mosaic=self.n_mosaic,
                                    overwrite=True,  # an unfinished earlier attempt
                                    **self.sim_options)
        except TypeError as exc:  # an unknown or repeated name in sim_options
            raise DvprobeError(f"sim_options: {exc}") from None

    def stamp(self) -> dict:
        """The parameters that decide whether finished steps in ``out`` can be reused."""
        return {
            "model": str(self.model) if self.model else None,
            "seed": self.seed,
            "length": self.length,
            "coverage": self.coverage,
            "n_mosaic": self.n_mosaic,
            "ref_sites_fraction": self.ref_sites_fraction,
            "layers": list(self.layers),
            "dtype": self.dtype,
            "sim_options": self.sim_options,
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
    # the explain step (empty when it was skipped)
    channels: pd.DataFrame | None = None  # channel ablation, one row per channel
    channels_header: str = ""
    panels: list[Path] = field(default_factory=list)  # attribution panels (PNG)
    panel_lines: list[str] = field(default_factory=list)  # one line per panel
    panel_header: str = ""
    tcav: list[str] = field(default_factory=list)  # one line per layer

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
        if self.channels is not None:
            lines += [f"which channels the calls depend on ({self.channels_header}):",
                      format_channels(self.channels), ""]
        if self.panel_lines:
            lines += [f"attribution panels ({self.panel_header}):",
                      *[f"  {t}" for t in self.panel_lines], ""]
        if self.tcav:
            lines += ["is the concept used? (TCAV of the called genotype's logit, "
                      "dvprobe tcav):", *[f"  {t}" for t in self.tcav], ""]
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


def format_channels(table: pd.DataFrame) -> str:
    """Fixed-width text of a :class:`probing.ablate.Ablation` table (one mode)."""
    rows = [("channel", "importance", "95% CI", "calls flipped", "label agreement")]
    rows += [(r.channel, f"{r.importance:.4f}", f"{r.importance_lo:.4f}-{r.importance_hi:.4f}",
              f"{r.flip_fraction:.1%}",
              "-" if pd.isna(r.agreement_change) else f"{r.agreement_change:+.1%}")
             for r in table.itertuples(index=False)]
    return _fixed_width(rows)


def annotate_planted(store, truth_dir: str | os.PathLike,
                     concepts: Iterable[str] | None = None) -> list[str]:
    """Annotate ``store`` with the planted concepts of a simulation (all of them, or those
    named in ``concepts``); returns the columns written."""
    from probing.annotate import annotate_bed, annotate_rmsk, annotate_vcf
    from probing.simulate import planted_concepts

    files = planted_concepts(truth_dir)
    wanted = set(CONCEPT_COLUMNS if concepts is None else concepts)
    cols = []
    for concept, (column, kind) in CONCEPT_COLUMNS.items():
        if concept not in files or concept not in wanted:
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


OWNED = ("sim", "examples", "mosaic_examples", "model", "store", "mosaic_store", "enrichment",
         "explain")


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
        if old == json.loads(json.dumps(params)):  # as read back: tuples become lists
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


@dataclass(frozen=True)
class _Paths:
    """Where each stage writes inside the demo's ``out``."""

    out: Path

    @property
    def sim(self) -> Path:
        return self.out / "sim"

    @property
    def examples(self) -> Path:
        return self.out / "examples"

    @property
    def examples_spec(self) -> str:
        return str(self.examples / "examples.tfrecord@2.gz")

    @property
    def mosaic_examples(self) -> Path:
        return self.out / "mosaic_examples"

    @property
    def mosaic_spec(self) -> str:
        return str(self.mosaic_examples / "mosaic.tfrecord.gz")

    @property
    def model(self) -> Path:
        return self.out / "model"

    @property
    def store(self) -> Path:
        return self.out / "store"

    @property
    def mosaic_store(self) -> Path:
        return self.out / "mosaic_store"

    @property
    def enrichment(self) -> Path:
        return self.out / "enrichment"

    @property
    def explain(self) -> Path:
        return self.out / "explain"


@dataclass
class _Demo:
    """One demo run: its config, where it writes, its log and the time of each stage."""

    config: DemoConfig
    progress: bool
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def paths(self) -> _Paths:
        return _Paths(self.config.out)

    def log(self, msg: str) -> None:
        if self.progress:
            print(f"[dvprobe demo] {msg}", flush=True)

    @contextmanager
    def stage(self, name: str):
        """Log the stage and add its wall time to ``seconds[name]``."""
        self.log(f"== {name}")
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t


@dataclass(frozen=True)
class _Sample:
    """The simulated files the later stages read."""

    directory: Path
    ref: Path
    bam: Path
    germline: Path
    mosaic: Path


def run_demo(config: DemoConfig, *, progress: bool = True) -> DemoResult:
    """Run the whole pipeline into ``config.out`` (see the module docstring) and return a
    :class:`DemoResult`. ``progress``: log each stage and show progress bars."""
    _check_device_and_model(config)
    demo = _Demo(config, progress)
    config.out.mkdir(parents=True, exist_ok=True)
    _reset_if_changed(config.out, config.stamp(), demo.log)
    paths = demo.paths
    with demo.stage("simulate"):
        sample = _simulate(demo)
    with demo.stage("make_examples"):
        _make_examples(demo, sample)
    bundle, untrained = _model(demo)
    with demo.stage("extract"):
        store = _extract(demo, bundle, paths.examples_spec, paths.store)
        mos_store = _extract(demo, bundle, paths.mosaic_spec, paths.mosaic_store)
    with demo.stage("annotate"):
        store, mos_store, columns = _annotate(paths, store, mos_store, sample)
    with demo.stage("cluster"):
        applied = _cluster(demo, store, mos_store)
    with demo.stage("enrich"):
        enriched = _enrich(demo, store, columns, applied)
    with demo.stage("probe"):
        probes = _probe(demo, store, columns, enriched.files)
    explained = _Explained()
    if config.explain:
        with demo.stage("explain"):
            explained = _explain(demo, store, bundle)
    with demo.stage("report"):
        report = _report(demo, store, untrained)
    return DemoResult(
        out=config.out,
        report=report,
        store=paths.store,
        mosaic_store=paths.mosaic_store,
        untrained=untrained,
        n_examples=store.n,
        n_mosaic_examples=mos_store.n,
        recovery=enriched.recovery,
        mosaic_landing=enriched.mosaic_landing,
        mosaic_counts=enriched.mosaic_counts,
        seconds=demo.seconds,
        enrichment_files=enriched.files,
        probes=probes.best() if probes is not None else None,
        probe_header=(f"linear probes, held-out AUROC over {probes.folds} folds by "
                      f"{probes.block_bp // 1000} kb block" if probes is not None else ""),
        channels=explained.channels,
        channels_header=explained.channels_header,
        panels=explained.panels,
        panel_lines=explained.panel_lines,
        panel_header=explained.panel_header,
        tcav=explained.tcav,
    )


def _check_device_and_model(config: DemoConfig) -> None:
    """Refuse a bad device or model now, not after simulating and making examples."""
    from dvtorch.bundle import read_meta
    from probing.extract import resolve_device

    resolve_device(config.device)
    if config.model:
        read_meta(config.model)


def _simulate(demo: _Demo) -> _Sample:
    """The simulated sample (reused when a finished earlier run left it)."""
    from probing.simulate import simulate

    config, directory = demo.config, demo.paths.sim
    if not _done(directory):
        simulate(config.simulation(directory), progress=demo.progress)
        _mark(directory, {"seed": config.seed, "length": config.length,
                          "coverage": config.coverage})
    else:
        demo.log(f"reusing {directory}")
    files = json.loads((directory / "truth.json").read_text())["files"]
    return _Sample(directory, directory / files["reference"], directory / files["bam"],
                   directory / files["truth_vcf"], directory / files["mosaic_vcf"])


def _make_examples(demo: _Demo, sample: _Sample) -> None:
    """Examples at candidate sites (plus hom-ref sites), and the mosaic truth set."""
    paths = demo.paths
    _encode(demo, sample, paths.examples, paths.examples_spec, candidates=True,
            ref_sites_fraction=demo.config.ref_sites_fraction)
    _encode(demo, sample, paths.mosaic_examples, paths.mosaic_spec, sites=sample.mosaic,
            het_alt_images=False)


def _encode(demo: _Demo, sample: _Sample, directory: Path, spec: str, **options) -> None:
    """make_examples into ``directory`` unless a finished earlier run left it there."""
    from probing.make_examples import MakeExamplesConfig, make_examples

    if _done(directory):
        return
    directory.mkdir(parents=True, exist_ok=True)
    config = MakeExamplesConfig(sample.ref, sample.bam, spec,
                                truth=[sample.germline, sample.mosaic], overwrite=True,
                                **options)
    res = make_examples(config, progress=demo.progress)
    demo.log(res.summary())
    _mark(directory, {"n": res.n_examples})


def _model(demo: _Demo) -> tuple[Path, bool]:
    """(BUNDLE, untrained): the user's model, or a seeded untrained reference bundle."""
    import dvtorch
    from dvtorch.bundle import META_FILE, read_meta

    config = demo.config
    if config.model is None:
        bundle = demo.paths.model
        if not (bundle / META_FILE).is_file():
            dvtorch.reference_bundle(bundle, seed=config.seed, overwrite=True)
    else:
        bundle = Path(config.model).expanduser()
    return bundle, bool(read_meta(bundle).get("untrained", False))


def _extract(demo: _Demo, bundle: Path, examples: str, out: Path):
    """The demo's layers of ``examples``, max-pooled, into STORE ``out`` (a finished STORE
    is reused by extract itself)."""
    from probing.extract import ExtractConfig, extract

    config = demo.config
    return extract(ExtractConfig(bundle, examples, out, layers=list(config.layers), pool="max",
                                 device=config.device, batch_size=config.batch_size,
                                 workers=config.workers, dtype=config.dtype),
                   progress=demo.progress)


def _annotate(paths: _Paths, store, mos_store, sample: _Sample) -> tuple:
    """Both STOREs annotated with the planted truth (the mosaic set without the germline
    truth, see ``MOSAIC_SET_CONCEPTS``); returns (store, mosaic store, columns), the STOREs
    opened again with their new columns."""
    from probing.store import open_store

    columns = annotate_planted(store, sample.directory)
    annotate_planted(mos_store, sample.directory, concepts=MOSAIC_SET_CONCEPTS)
    return open_store(paths.store), open_store(paths.mosaic_store), columns


def _cluster(demo: _Demo, store, mos_store):
    """The three clusterings of the main STORE, and the mosaic set through the k-means run;
    returns what :func:`probing.analysis.apply` returned."""
    from probing import analysis as pa

    c = demo.config
    pa.kmeans(store, "mixed5", k=c.k, pca=50, umap=True, backend=c.backend, seed=c.seed,
              run=KMEANS_RUN)
    pa.hierarchical_kmeans(store, "mixed5", k=3, split="auto", pca=50, umap=True,
                           backend=c.backend, seed=c.seed, run=HKMEANS_RUN)
    pa.multilayer(store, list(c.layers), k=c.multilayer_k, umap=True, backend=c.backend,
                  seed=c.seed, run=MULTILAYER_RUN)
    return pa.apply(store, KMEANS_RUN, mos_store, name=MOSAIC_RUN, backend=c.backend)


@dataclass
class _Enrichment:
    recovery: dict[str, pd.DataFrame]
    files: list[Path]
    mosaic_landing: str
    mosaic_counts: pd.Series


def _enrich(demo: _Demo, store, columns: list[str], applied) -> _Enrichment:
    """Enrichment tables of every run, the best cluster per concept, and where the mosaic
    truth set landed."""
    from probing.enrich import best_clusters, enrich, landing, write_enrichment

    enrich_dir = demo.paths.enrichment
    enrich_dir.mkdir(exist_ok=True)
    recovery, written = {}, []
    for run, level in ((KMEANS_RUN, "cluster"), (HKMEANS_RUN, "node"),
                       (MULTILAYER_RUN, "cluster")):
        res = enrich(store, run, columns, level=level)
        written.append(write_enrichment(res, enrich_dir / f"{run}.md"))
        written.append(write_enrichment(res, enrich_dir / f"{run}.csv"))
        if run != HKMEANS_RUN:
            recovery[run] = best_clusters(res.table)
    where = landing(applied.run.obs[applied.column], None, MOSAIC_RUN).where()
    return _Enrichment(recovery, written, where, applied.counts["n"])


def _probe(demo: _Demo, store, columns: list[str], written: list[Path]):
    """Linear probes of every layer for every planted concept (None if none is probeable);
    the table is saved in the STORE and written beside the enrichment tables."""
    from probing.probe import ProbeError, probe_layers, save_probes, write_probes

    config = demo.config
    # Blocks of a twentieth of the simulated genome (20 kb for the default 400 kb): the
    # 1 Mb default of `dvprobe probe` is for whole genomes. A concept too rare for the
    # folds is listed as not probed; none probeable (a tiny test genome) is said, not fatal.
    try:
        probes = probe_layers(store, columns, list(config.layers),
                              block_bp=max(1_000, config.length // 20), seed=config.seed,
                              progress=False)
    except ProbeError as exc:
        demo.log(f"linear probes skipped: {exc}")
        return None
    save_probes(store, probes, "planted")
    written.append(write_probes(probes, demo.paths.enrichment / "probes.md"))
    for note in probes.notes:
        demo.log(f"probe note: {note}")
    return probes


@dataclass
class _Explained:
    channels: pd.DataFrame | None = None
    channels_header: str = ""
    panels: list[Path] = field(default_factory=list)
    panel_lines: list[str] = field(default_factory=list)
    panel_header: str = ""
    tcav: list[str] = field(default_factory=list)


def _explain(demo: _Demo, store, bundle: Path) -> _Explained:
    """What the calls depend on: channel ablation over a seeded sample of the examples,
    integrated-gradients panels of a few mosaic truth calls (the first examples when the
    STORE has none), and TCAV when ``tcav_examples`` asks for it; each saved in the STORE
    for the report. Each part's time is logged (the step's sizes are a 20 s budget)."""
    from probing.extract import resolve_device

    config, paths = demo.config, demo.paths
    device = str(resolve_device(config.device))
    if paths.explain.exists():  # the demo's own (OWNED): no stale panels of another run
        shutil.rmtree(paths.explain)
    paths.explain.mkdir(parents=True)
    obs = store.read_obs([c for c in ("key", "mosaic") if c in store.obs_dtypes.index])
    done = _Explained()
    t = time.perf_counter()
    if config.ablate_examples:
        _ablate_channels(demo, store, bundle, obs, device, done)
    if config.explain_panels:
        _attribution_panels(demo, store, bundle, obs, device, done)
    if config.tcav_examples:
        done.tcav = _tcav(demo, store, device)
    demo.log(f"explain: {time.perf_counter() - t:.1f}s")
    return done


def _keys_file(path: Path, keys: Sequence[str]) -> Path:
    path.write_text("".join(f"{k}\n" for k in keys))
    return path


def _ablate_channels(demo: _Demo, store, bundle: Path, obs: pd.DataFrame, device: str,
                     done: _Explained) -> None:
    """Zero-signal ablation of every channel over a seeded sample of the STORE's examples
    (a sample, not the first ones: those are one end of the genome)."""
    import numpy as np

    from probing.ablate import ablate
    from probing.explain import Selection

    config, paths = demo.config, demo.paths
    t = time.perf_counter()
    n = min(config.ablate_examples, store.n)
    rows = np.sort(np.random.default_rng(config.seed).choice(store.n, n, replace=False))
    keys = _keys_file(paths.explain / "ablation_keys.txt", obs["key"].to_numpy()[rows])
    res = ablate(bundle, paths.examples_spec, select=Selection(keys_file=keys), n=n,
                 seed=config.seed, device=device, out=paths.explain / "ablation",
                 save_in=store, name="demo", progress=False)
    done.channels = res.table
    done.channels_header = (
        f"dvprobe ablate: {n} examples, each channel in turn set to zero signal; importance "
        "= mean change of the genotype probabilities (total variation) with its 95% "
        f"bootstrap interval; table and chart: {paths.explain / 'ablation'}")
    demo.log(f"explain: ablation of {len(res.channels)} channels over {n} examples "
             f"{time.perf_counter() - t:.1f}s")


def _attribution_panels(demo: _Demo, store, bundle: Path, obs: pd.DataFrame, device: str,
                        done: _Explained) -> None:
    """Integrated gradients of the called genotype's probability for a seeded few of the
    mosaic truth examples (the first examples when there is none), a PNG panel each."""
    import numpy as np

    from probing.explain import Selection, explain

    config, paths = demo.config, demo.paths
    t = time.perf_counter()
    hits = obs["mosaic"].fillna(False).to_numpy(bool) if "mosaic" in obs else np.zeros(0, bool)
    pool = np.flatnonzero(hits)
    what = "mosaic truth calls"
    if not len(pool):
        pool, what = np.arange(store.n), "the first examples (no mosaic truth call here)"
    rng = np.random.default_rng(config.seed)
    rows = np.sort(rng.choice(pool, min(config.explain_panels, len(pool)), replace=False))
    keys = _keys_file(paths.explain / "keys.txt", obs["key"].to_numpy()[rows])
    res = explain(bundle, paths.examples_spec, Selection(keys_file=keys),
                  steps=config.explain_steps, device=device, out=paths.explain,
                  save_in=store, name="mosaic", progress=False)
    done.panels = [e.files["png"] for e in res]
    done.panel_lines = [_panel_line(e) for e in res]
    done.panel_header = (f"dvprobe explain: integrated gradients of {what} at "
                         f"{config.explain_steps} steps against the reads-blanked pileup; "
                         "delta = how far the attributions miss f(x) - f(baseline)")
    demo.log(f"explain: {len(res)} panel(s) {time.perf_counter() - t:.1f}s")


def _panel_line(e) -> str:
    verdict = "" if e.converged else ", over 1 %: raise explain_steps"
    return (f"{e.example.key} {e.target_name} p={e.probs[e.target]:.3f}, delta "
            f"{e.relative_delta:.1%} of the change{verdict}: {e.files['png']}")


def _tcav(demo: _Demo, store, device: str) -> list[str]:
    """TCAV of the planted mosaic concept (LINE when mosaic is too rare) at every layer,
    saved in the STORE; a concept too rare for TCAV is said, not fatal."""
    from probing.tcav import TcavError, save_tcav, tcav

    config = demo.config
    t = time.perf_counter()
    for concept in ("mosaic", "LINE"):
        try:
            found = tcav(store, concepts=[concept], layers=list(config.layers),
                         n_examples=config.tcav_examples, seed=config.seed, device=device,
                         block_bp=max(1_000, config.length // 20), progress=False)
        except TcavError as exc:
            demo.log(f"TCAV of {concept} skipped: {exc}")
            continue
        save_tcav(store, found, "planted")
        demo.log(f"explain: TCAV of {concept} {time.perf_counter() - t:.1f}s")
        return found.lines()
    return []


def _report(demo: _Demo, store, untrained: bool) -> Path:
    """The offline HTML report of the main STORE; returns its path."""
    from probing.report import build_report

    config = demo.config
    report = build_report(
        store,
        config.out / "report.html",
        max_points=config.report_points,
        examples=demo.paths.examples_spec,
        seed=config.seed,
        title="dvprobe demo" + (" (UNTRAINED model)" if untrained else ""),
    )
    demo.log(report.summary())
    return report.path
