"""Scanpy-like analysis API over a STORE; every call writes its result back as a named run.

>>> from probing import analysis as pa
>>> pa.cluster(store, "kmeans", layer="mixed5", k=10, normalize="l2", pca=50, run="km10")
>>> pa.cluster(store, "hkmeans", k=3, split="auto", run="hkm")
>>> pa.cluster(store, "multilayer", layers=["mixed3", "mixed5", "mixed7"], k=12, run="ml12")
>>> pa.apply(store, "km10", mosaic_store, label_col="mosaic").counts

:func:`cluster` is the one entry: ``method`` names a registered method
(:data:`probing.analysis.methods.METHODS`: pca, umap, kmeans, hkmeans, spectral, hspectral,
multilayer) and ``**options`` are that method's options (its dataclass in
:mod:`probing.analysis.methods` declares them and their defaults) plus the options every
method takes (:class:`~probing.analysis.methods.RunSettings`). ``pa.kmeans(store, layer,
...)`` and the other per-method functions are the same call spelled shorter.

A run holds (see ``probing/store.py``):

* ``obs``: ``key`` plus per-example results: ``cluster`` (flat int); for hierarchical runs
  also ``level1``, ``level2`` and ``node`` (``"2.1"``).
* ``arrays``: ``pca`` ``[n, k]`` (a PCA run's coordinates), ``umap`` ``[n, 2]``,
  ``fit_rows`` (rows the models were fitted on; ``umap_fit_rows`` when the UMAP fitted on
  fewer), and the fitted models as plain arrays: ``feat.*`` (normalisers, PCAs), ``flat.*``
  (k-means centres or spectral landmarks + their labels), ``h.*`` (hierarchy nodes). A
  clustering run keeps no per-row features: :func:`features` recomputes them exactly.
* ``meta["fit_sample"]``: how many rows the models were fitted on, of how many, the seed,
  stratification and why (above a per-method row count a run fits on a sample by default:
  :mod:`probing.analysis.sample`).
* ``files``: ``umap_model`` (the one pickle: UMAP has no array form; its sha256 is recorded and
  checked before it is unpickled).
* ``meta["params"]``: the method and every option it ran with (defaults included).

Clusters are always fitted in the normalised/PCA feature space, never in UMAP space.

A call replaces an existing run of the same name (notebooks re-run cells); pass
``overwrite=False`` to refuse instead, which is what the CLI does unless ``--overwrite`` is
given. Options are checked before any row is read, and a partial STORE (extraction stopped)
is analysed with a logged warning.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone

import numpy as np
import pandas as pd

from probing.analysis.backends import backend_for_umap
from probing.analysis.cluster import Prototypes
from probing.analysis.compat import check_applicable
from probing.analysis.engines import get_engine
from probing.analysis.errors import AnalysisError
from probing.analysis.features import FeatureModel
from probing.analysis.fit import (
    ENGINE_VERSION,
    check_new_run,
    check_run_name,
    cluster_sizes,
    fit_run,
    flat_predict,
    keyed_obs,
    open_for_analysis,
    run_features,
    step,
    tree_predict,
    umap_every_row,
)
from probing.analysis.guard import check_scale, fixed_bytes
from probing.analysis.hierarchical import Hierarchy
from probing.analysis.methods import (
    DEFAULT_CLUSTER_METHOD,
    DEFAULT_REDUCE_METHOD,
    METHODS,
    RUN_OPTIONS,
    RunSettings,
    get_method,
    options_for,
)
from probing.analysis.passes import open_passes
from probing.analysis.stream import Predict, RowOutputs
from probing.store import Run, Store

log = logging.getLogger("dvprobe.analysis")


def cluster(store, method: str = DEFAULT_CLUSTER_METHOD, **options) -> Run:
    """Fit ``method`` on ``store`` and save it as one run; returns the run.

    ``options``: the method's own (see its dataclass in :mod:`probing.analysis.methods`,
    e.g. ``k``, ``layer``, ``pca``) and ``run``, ``overwrite``, ``backend``, ``seed``,
    ``fit_sample`` (:class:`~probing.analysis.methods.RunSettings`). An unknown method or
    option is refused with the valid ones, before the STORE is read.
    """
    settings = RunSettings(**{k: options.pop(k) for k in RUN_OPTIONS if k in options})
    opts = options_for(method, options)
    plan = opts.plan()
    return fit_run(store, plan, settings, params={"method": method, **asdict(opts)})


def _given(**values) -> dict:
    """The arguments a caller actually gave (``None`` = the method's default)."""
    return {k: v for k, v in values.items() if v is not None}


def _spelled_as(method: str, first: str) -> Callable[[Callable], Callable]:
    """Give a per-method shortcut the signature and docstring of its method's options, so
    ``help(pa.kmeans)`` shows every option with its default (declared once, in the
    dataclass)."""
    m = METHODS[method]

    def decorate(fn: Callable) -> Callable:
        kw = inspect.Parameter.KEYWORD_ONLY
        params = [inspect.Parameter("store", inspect.Parameter.POSITIONAL_OR_KEYWORD),
                  inspect.Parameter(first, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                    default=m.default(first))]
        params += [inspect.Parameter(f.name, kw, default=f.default)
                   for f in fields(m.options) if f.name != first]
        params += [inspect.Parameter(f.name, kw, default=f.default)
                   for f in fields(RunSettings)]
        fn.__signature__ = inspect.Signature(params, return_annotation=Run)
        fn.__doc__ = (f"{inspect.getdoc(m.options)}\n\nThe same as "
                      f"``cluster(store, {method!r}, {first}=..., **options)``.")
        return fn

    return decorate


@_spelled_as("pca", "layer")
def pca(store, layer: str | None = None, **options) -> Run:
    return cluster(store, "pca", **_given(layer=layer), **options)


@_spelled_as("umap", "layer")
def umap(store, layer: str | None = None, **options) -> Run:
    return cluster(store, "umap", **_given(layer=layer), **options)


@_spelled_as("kmeans", "layer")
def kmeans(store, layer: str | None = None, **options) -> Run:
    return cluster(store, "kmeans", **_given(layer=layer), **options)


@_spelled_as("spectral", "layer")
def spectral(store, layer: str | None = None, **options) -> Run:
    return cluster(store, "spectral", **_given(layer=layer), **options)


@_spelled_as("hkmeans", "layer")
def hierarchical_kmeans(store, layer: str | None = None, **options) -> Run:
    return cluster(store, "hkmeans", **_given(layer=layer), **options)


@_spelled_as("hspectral", "layer")
def hierarchical_spectral(store, layer: str | None = None, **options) -> Run:
    return cluster(store, "hspectral", **_given(layer=layer), **options)


@_spelled_as("multilayer", "layers")
def multilayer(store, layers=None, **options) -> Run:
    return cluster(store, "multilayer", **_given(layers=layers), **options)


def reduce(store, layer: str | None = None, *, method: str = DEFAULT_REDUCE_METHOD,
           **options) -> Run:
    """A run of coordinates only: ``method`` pca (default 50 components) or umap (2-D).

    :func:`cluster` restricted to the methods whose runs hold no clusters (``dvprobe
    reduce``); ``n_components=0`` is an error, not "the default".
    """
    get_method(method, clusters=False, option="--method")
    return cluster(store, method, **_given(layer=layer), **options)


# -- apply -----------------------------------------------------------------------------------

@dataclass
class ApplyResult:
    """Where another STORE's examples landed under a fitted run."""

    run: Run
    column: str  # "cluster" or "node"
    counts: pd.DataFrame  # per cluster: n, fraction (every fitted cluster listed)
    crosstab: pd.DataFrame | None  # label_col x cluster, when asked

    def landings(self) -> list:
        """:class:`probing.enrich.Landing` of the whole applied set, then one per value of
        ``label_col`` ("mosaic=True: 12/42 in cluster 9 (10 in 3, ...)")."""
        from probing.enrich import landing_from_counts

        if not self.column:
            return []
        lands = [landing_from_counts(self.counts["n"], f"{int(self.counts['n'].sum())} "
                                                       f"examples by {self.column}")]
        if self.crosstab is not None:
            col = self.crosstab.index.name
            lands += [landing_from_counts(row, f"{col}={value}")
                      for value, row in self.crosstab.iterrows()]
        return lands

    def __str__(self) -> str:
        lines = [f"run {self.run.name!r} written to {self.run.path.parent.parent}"]
        lands = self.landings()
        if not lands:
            lines.append(f"{len(self.run.obs)} examples projected (the run has no clusters)")
        lines += [ld.summary(limit=None) for ld in lands]  # every cluster: it is the result
        return "\n".join(lines)


def _same_store(a: Store, b: Store) -> bool:
    return a.path.resolve() == b.path.resolve()


def _fitted_run(src: Store, run: str) -> Run:
    """Run ``run`` of ``src``, refused unless the analysis engine wrote it."""
    r = src.load_run(run)
    if r.meta.get("engine") != "dvprobe.analysis" or r.meta.get("kind") not in METHODS:
        raise AnalysisError(f"run {run!r} in {src.path} was not written by the analysis engine")
    return r


def _applied_name(src: Store, tgt: Store, run: str, name: str | None) -> str:
    """The applied run's name (default ``<run>-applied``), never the fitted run itself."""
    out_name = check_run_name(name, "--name") if name is not None else f"{run}-applied"
    if out_name == run and _same_store(src, tgt):
        raise AnalysisError(f"--name {out_name!r} is the run being applied: it would replace "
                            f"the fitted run in {src.path}; choose another --name")
    return out_name


def _check_target(tgt: Store, out_name: str, label_col: str | None, overwrite: bool) -> None:
    """What about the target can be refused before a row is read."""
    if tgt.n == 0:
        raise AnalysisError(f"{tgt.path}: the STORE has no examples")
    if label_col is not None and label_col not in tgt.obs_dtypes.index:
        raise AnalysisError(f"{tgt.path}: no obs column {label_col!r} for --label-col; "
                            f"columns: {list(tgt.obs_dtypes.index)}")
    check_new_run(tgt, out_name, overwrite, "--name")


def _predictor(r: Run) -> tuple[Predict | None, str, list[str]]:
    """How the run's fitted clusterer labels feature rows, the column that names a cluster
    (``cluster``, or ``node`` for hierarchies) and every fitted cluster."""
    cm = r.meta.get("cluster")
    if cm is None:
        return None, "", []
    if cm["method"] in ("kmeans", "spectral"):
        model = Prototypes(r.arrays["flat.protos"], r.arrays["flat.labels"], int(cm["k"]))
        return flat_predict(model), "cluster", [str(i) for i in range(model.k)]
    h = Hierarchy.from_arrays(r.arrays)
    return tree_predict(h), "node", [f"{a}.{b}" for a, b in h.nodes]


def features(store, run: str, rows: np.ndarray | None = None) -> np.ndarray:
    """The features run ``run`` clustered in (normalised / PCA space) for ``rows`` (sorted
    row indices; None = every row), recomputed exactly from its stored models: runs keep
    labels and coordinates per row, not their ``[n, out_dim]`` features."""
    return run_features(store, run, rows)


def _landed(tgt: Store, obs: pd.DataFrame, column: str, clusters: list[str],
            label_col: str | None) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Examples per fitted cluster (every one listed), and ``label_col`` x cluster."""
    if not column:
        return pd.DataFrame({"n": []}), None
    vc = pd.Series(obs[column]).astype(str).value_counts()
    counts = pd.DataFrame({"n": [int(vc.get(c, 0)) for c in clusters]},
                          index=pd.Index(clusters, name=column))
    counts["fraction"] = counts["n"] / max(1, tgt.n)
    crosstab = None
    if label_col is not None:
        crosstab = pd.crosstab(tgt.read_obs([label_col])[label_col].to_numpy(),
                               obs[column].astype(str).to_numpy(),
                               rownames=[label_col], colnames=[column])
    return counts, crosstab


def apply(store, run: str, target, *, name: str | None = None, backend: str = "auto",
          label_col: str | None = None, overwrite: bool = True,
          scheduler: str | None = None) -> ApplyResult:
    """Push ``target``'s examples through run ``run`` of ``store`` (same fitted models).

    Normalisers, PCAs, k-means centres / hierarchy nodes / spectral landmarks and the UMAP are
    re-applied, nothing is refitted (the blog's 42 mosaic examples). Writes run ``name``
    (default ``"<run>-applied"``) into ``target`` and returns counts per cluster. Refused
    before any work: a ``target`` extracted with another model or pooling (see
    :mod:`probing.analysis.compat`), a ``name`` that is ``run`` itself in the same STORE, an
    existing ``name`` unless ``overwrite``, and a missing ``label_col``. ``backend="dask"``
    (``scheduler``: a cluster's address) labels the rows on Dask workers, with the same
    result.
    """
    src = open_for_analysis(store)
    tgt = open_for_analysis(target, warn=False)
    if not _same_store(src, tgt):
        open_for_analysis(tgt)  # its own partial-STORE warning, once
    out_name = _applied_name(src, tgt, run, name)
    r = _fitted_run(src, run)
    _check_target(tgt, out_name, label_col, overwrite)
    fm = FeatureModel.from_run(r.meta, r.arrays)
    fm.check_store(tgt)
    for w in check_applicable(src, tgt, run, fm.layers):
        log.warning(w)
    kept = fm.out_dim if r.meta["kind"] == "pca" and fm.reduced else 0
    check_scale(0, fm.out_dim, "pca", "sklearn",
                fixed=fixed_bytes(tgt.n, list(fm.dims.values()), kept=kept))
    be = get_engine(backend, scheduler)
    umap_be = backend_for_umap(r.meta["umap"]["impl"], be) if r.meta.get("umap") else None
    with open_passes(be) as passes:
        out, arrays = _apply_every_row(r, tgt, fm, passes, umap_be, kept)
    obs = keyed_obs(tgt)
    for col, values in out.columns.items():
        obs[col] = values
    _, column, clusters = _predictor(r)
    counts, crosstab = _landed(tgt, obs, column, clusters, label_col)
    meta = {
        "engine": "dvprobe.analysis", "engine_version": ENGINE_VERSION, "kind": r.meta["kind"],
        "applied_from": {"store": str(src.path), "run": run, "created": r.meta.get("created")},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "store": str(tgt.path), "n": tgt.n, "features": r.meta["features"],
        "cluster": r.meta.get("cluster"), "umap": r.meta.get("umap"),
        "backend": be.name, "backend_version": be.version,
    }
    if column:
        meta["landed"] = {c: int(v) for c, v in counts["n"].items() if v}
        meta["cluster"] = {**(meta["cluster"] or {}), **cluster_sizes(out.columns)}
    saved = tgt.save_run(out_name, meta=meta, obs=obs, arrays=arrays)
    return ApplyResult(saved, column, counts, crosstab)


def _apply_every_row(r: Run, tgt: Store, fm: FeatureModel, passes, umap_be,
                     kept: int) -> tuple[RowOutputs, dict[str, np.ndarray]]:
    """Every target row labelled (and UMAP-transformed) by run ``r``'s models."""
    predict, _, _ = _predictor(r)
    with step(f"apply {r.name!r}: label {tgt.n} rows of {tgt.path} [{passes.name}]"):
        out = passes.label(tgt, fm, predict, kept or None)
    arrays: dict[str, np.ndarray] = dict(out.arrays)
    if umap_be is not None:
        blob = r.file_bytes("umap_model")  # sha256-checked before anything is unpickled
        arrays["umap"] = umap_every_row(passes, tgt, fm, umap_be, blob,
                                        int(r.meta["umap"]["n_components"]), None)
    return out, arrays
