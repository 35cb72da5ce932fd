"""CLI commands of the analysis engine: ``reduce``, ``cluster``, ``apply`` (see cli.py).

Thin wrappers: parse options, call :func:`probing.analysis.cluster` (or ``apply``), print a
summary. Only the options typed on the command line are passed, so every default, and
which options a method takes, is the API's (:mod:`probing.analysis.methods`); ``--help``
shows those defaults. The heavy
imports (scikit-learn, umap-learn, cuML) happen only when a command runs. Unlike the Python
API (which replaces runs, for notebooks that re-run cells), the commands refuse to replace
an existing run unless ``--overwrite`` is given, like ``extract`` and ``convert``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from probing.analysis.methods import (
    DEFAULT_CLUSTER_METHOD,
    DEFAULT_REDUCE_METHOD,
    METHODS,
    RunSettings,
    get_method,
    method_names,
)
from probing.analysis.sample import DISPLAY_UMAP_ROWS, FIT_ROWS
from probing.store import Run


class _Format(logging.Formatter):
    """``[12:00:01] message``; warnings say so, so they stand out among progress lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging API)
        text = super().formatMessage(record)
        if record.levelno >= logging.WARNING:
            return text.replace("] ", "] warning: ", 1)
        return text


def setup_analysis_logging() -> None:
    """Progress lines ("fit features ... done (3.1s)") go to stderr at INFO."""
    lg = logging.getLogger("dvprobe.analysis")
    if not lg.handlers:
        h = logging.StreamHandler()
        h.setFormatter(_Format("[%(asctime)s] %(message)s", "%H:%M:%S"))
        lg.addHandler(h)
        lg.setLevel(logging.INFO)
        lg.propagate = False


def _numeric_order(sizes: dict[str, int]) -> str:
    """``{0: 86, 1: 421, 2: 102, ..., 10: 5}`` (and ``0, 0.0, 0.1, 1``): JSON keeps the
    keys as strings, which would print 10 before 2."""
    from probing.enrich import sorted_levels

    return "{" + ", ".join(f"{c}: {sizes[c]}" for c in sorted_levels(sizes)) + "}"


def _summary(run: Run) -> str:
    m = run.meta
    lines = [f"run {run.name!r} ({m['kind']}, backend {m['backend']}, {m['n']} rows, "
             f"{m['n_fit']} fitted, {m['seconds']}s) -> {run.path}"]
    fs = m.get("fit_sample")
    if isinstance(fs, dict):
        lines.append("  " + _describe_sample(fs))
    f = m["features"]
    lines.append(f"  features: layers={f['layers']} normalize={f['normalize']} "
                 f"pca={f['pca']} pca2={f['pca2']} -> {f['out_dim']} dims")
    c = m.get("cluster")
    if c:
        sizes = _numeric_order(c.get("level_sizes") or c.get("sizes"))
        lines.append(f"  {c['method']} k={c['k']}" + (f" split={c['split']}" if "split" in c
                                                       else "") + f" sizes={sizes}")
    if m.get("umap"):
        lines.append(f"  umap: {m['umap']['impl']} fitted on {m['umap']['n_fit']:,} rows, "
                     "the others transformed")
    return "\n".join(lines)


def _describe_sample(fs: dict) -> str:
    if fs["rows"] >= fs["of"]:
        return f"fit: all {fs['of']:,} rows ({fs['why']})"
    how = f"stratified by {fs['stratified_by']}" if fs.get("stratified_by") else "uniform"
    return (f"fit: a sample of {fs['rows']:,} of {fs['of']:,} rows (seed {fs['seed']}, {how}): "
            f"{fs['why']}")


def _given(ctx: typer.Context, **values) -> dict:
    """The options typed on the command line (the others keep the API's defaults)."""
    sources = {k: ctx.get_parameter_source(k) for k in values}
    return {k: v for k, v in values.items()
            if sources[k] is not None and sources[k].name != "DEFAULT"}


def _default(method: str, option: str):
    return METHODS[method].default(option)


_WHO = {"hkmeans": "hierarchical", "hspectral": "hierarchical"}
#: cluster flags whose API option has another name
_API_NAME = {"landmarks": "n_landmarks", "layer_pca": "per_layer_pca"}


def _defaults_of(option: str, named: str = "{value} {who}", sep: str = ", ") -> str:
    """``10, 3 hierarchical, 12 multilayer``: the API's default of ``option`` per clustering
    method, the usual one first (``--help`` text, so no default is written twice)."""
    methods = method_names(clusters=True)
    usual = _default(methods[0], option)
    others = dict.fromkeys(named.format(value=_default(m, option), who=_WHO.get(m, m))
                           for m in methods if _default(m, option) != usual)
    return sep.join([str(usual), *others])


_RUN = RunSettings()
_CLUSTERING = method_names(clusters=True)
_REDUCING = method_names(clusters=False)

StoreArg = Annotated[Path, typer.Argument(help="STORE directory")]
Backend = Annotated[str, typer.Option(
    help="auto | cuml | sklearn (in this process) | dask | dask-cuda (row passes on a Dask "
         "cluster: --scheduler, or a local one for the run)")]
Scheduler = Annotated[str | None, typer.Option(
    metavar="ADDRESS", help="--backend dask/dask-cuda: a running Dask scheduler (e.g. "
                            "tcp://host:8786) that sees the STORE at the same path")]
Seed = Annotated[int, typer.Option()]
FitSample = Annotated[str | None, typer.Option(
    "--fit-sample", metavar="N|all|auto",
    help="rows the models are fitted on before every row is labelled: auto (default: a "
         "seeded sample stratified by chrom above each method's row count, e.g. "
         + ", ".join(f"{m} {FIT_ROWS[m]:,}" for m in ("kmeans", "hspectral", "umap"))
         + "), N rows, or all")]
Overwrite = Annotated[bool, typer.Option("--overwrite",
                                         help="replace an existing run of the same name")]


def reduce_cmd(
    ctx: typer.Context,
    store: StoreArg,
    layer: Annotated[str, typer.Option(help="layer to reduce")] = _default("pca", "layer"),
    method: Annotated[str, typer.Option(help=" | ".join(_REDUCING))] = DEFAULT_REDUCE_METHOD,
    n_components: Annotated[int | None, typer.Option(
        "--n-components", help="default " + ", ".join(
            f"{_default(m, 'n_components')} for {m}" for m in _REDUCING))] = None,
    normalize: Annotated[str, typer.Option(help="none | l2 | standardize")
                         ] = _default("pca", "normalize"),
    pca: Annotated[int, typer.Option(help="umap only: PCA components fed to UMAP (0 = raw)")
                   ] = _default("umap", "pca"),
    run: Annotated[str | None, typer.Option(help="run name (default: <method>-<layer>)")
                   ] = None,
    backend: Backend = _RUN.backend,
    scheduler: Scheduler = None,
    seed: Seed = _RUN.seed,
    fit_sample: FitSample = None,
    overwrite: Overwrite = False,
) -> None:
    """PCA or UMAP of one layer; saved as a run in the STORE."""
    setup_analysis_logging()
    from probing import analysis as pa

    r = pa.reduce(store, method=method, overwrite=overwrite,
                  **_given(ctx, layer=layer, n_components=n_components, normalize=normalize,
                           run=run, backend=backend, scheduler=scheduler, seed=seed,
                           fit_sample=fit_sample),
                  **{k: v or None for k, v in _given(ctx, pca=pca).items()})
    typer.echo(_summary(r))


def cluster_cmd(
    ctx: typer.Context,
    store: StoreArg,
    layer: Annotated[str | None, typer.Option(
        help=f"layer for {'/'.join(m for m in _CLUSTERING if m != 'multilayer')} "
             f"(default {_default('kmeans', 'layer')})")] = None,
    method: Annotated[str, typer.Option(help=" | ".join(_CLUSTERING))] = DEFAULT_CLUSTER_METHOD,
    k: Annotated[int | None, typer.Option(
        help="clusters (first level for hkmeans/hspectral); default "
             + _defaults_of("k"))] = None,
    split: Annotated[str, typer.Option(help="hierarchical: 'auto' or per-cluster counts like "
                                            "3,2,4")] = _default("hkmeans", "split"),
    layers: Annotated[str | None, typer.Option(help="multilayer only: comma-separated layers")
                      ] = None,
    pca: Annotated[int | None, typer.Option(
        help="PCA components before clustering (0 = none); default "
             + _defaults_of("pca", "{who} {value}") + " (after concat)")] = None,
    layer_pca: Annotated[int, typer.Option("--layer-pca", help="multilayer: PCA per layer")
                         ] = _default("multilayer", "per_layer_pca"),
    normalize: Annotated[str | None, typer.Option(
        help="none | l2 | standardize (default "
             + _defaults_of("normalize", "{who} {value}", "; ") + ")")] = None,
    umap: Annotated[bool | None, typer.Option(
        "--umap/--no-umap", help="also fit a 2-D UMAP (default: multilayer only, up to "
                                 f"{DISPLAY_UMAP_ROWS:,} rows on the CPU)")] = None,
    n_init: Annotated[int, typer.Option("--n-init", help="k-means restarts")
                      ] = _default("kmeans", "n_init"),
    landmarks: Annotated[int, typer.Option(help="spectral: k-means landmarks")
                         ] = _default("spectral", "n_landmarks"),
    run: Annotated[str | None, typer.Option(
        help="run name (default <method><k>-<layer>, e.g. kmeans10-mixed5, "
             "multilayer12-3layers)")] = None,
    backend: Backend = _RUN.backend,
    scheduler: Scheduler = None,
    seed: Seed = _RUN.seed,
    fit_sample: FitSample = None,
    overwrite: Overwrite = False,
) -> None:
    """Cluster a layer (or several) and save labels, models and coordinates as a run."""
    setup_analysis_logging()
    from probing import analysis as pa

    get_method(method, clusters=True, option="--method")
    given = _given(ctx, layer=layer, k=k, split=split, layers=layers, pca=pca,
                   layer_pca=layer_pca, normalize=normalize, umap=umap, n_init=n_init,
                   landmarks=landmarks, run=run,
                   backend=backend, scheduler=scheduler, seed=seed, fit_sample=fit_sample)
    options = {_API_NAME.get(name, name): value for name, value in given.items()}
    if "pca" in options:
        options["pca"] = options["pca"] or None  # --pca 0: no PCA
    if "layers" in options:
        options["layers"] = [s.strip() for s in options["layers"].split(",") if s.strip()]
    r = pa.cluster(store, method, overwrite=overwrite, **options)
    typer.echo(_summary(r))


def apply_cmd(
    store: Annotated[Path, typer.Argument(help="STORE holding the fitted run")],
    run: Annotated[str, typer.Option(help="fitted run to re-apply")],
    to: Annotated[Path, typer.Option("--to", help="STORE whose examples are projected "
                                                  "(extracted with the same model and --pool)")],
    name: Annotated[str | None, typer.Option(
        help="run name in the target (default <run>-applied)")] = None,
    label_col: Annotated[str | None, typer.Option(
        "--label-col", help="target obs column to cross-tabulate, e.g. mosaic")] = None,
    backend: Backend = _RUN.backend,
    scheduler: Scheduler = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="replace an existing run of the same name in the target (never "
                            "the applied run itself)")] = False,
) -> None:
    """Push another STORE's examples through a run's fitted models; print where they land."""
    setup_analysis_logging()
    from probing import analysis as pa

    res = pa.apply(store, run, to, name=name, backend=backend, label_col=label_col,
                   overwrite=overwrite, scheduler=scheduler)
    typer.echo(str(res))


def register(app: typer.Typer) -> None:
    """Attach ``reduce``, ``cluster`` and ``apply`` to the ``dvprobe`` app."""
    app.command("reduce")(reduce_cmd)
    app.command("cluster")(cluster_cmd)
    app.command("apply")(apply_cmd)
