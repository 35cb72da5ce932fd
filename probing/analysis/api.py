"""Scanpy-like analysis API over a STORE; every call writes its result back as a named run.

>>> from probing import analysis as pa
>>> pa.kmeans(store, layer="mixed5", k=10, normalize="l2", pca=50, seed=0, run="km10")
>>> pa.hierarchical_kmeans(store, layer="mixed5", k=3, split="auto", run="hkm")
>>> pa.multilayer(store, layers=["mixed3", "mixed5", "mixed7"], k=12, run="ml12")
>>> pa.apply(store, "km10", mosaic_store, label_col="mosaic").counts

A run holds (see ``probing/store.py``):

* ``obs``: ``key`` plus per-example results: ``cluster`` (flat int); for hierarchical runs
  also ``level1``, ``level2`` and ``node`` (``"2.1"``).
* ``arrays``: ``pca`` ``[n, k]`` (the space clusters were fitted in, when PCA ran), ``umap``
  ``[n, 2]``, ``fit_rows`` (rows the models were fitted on), and the fitted models as plain
  arrays: ``feat.*`` (normalisers, PCAs), ``flat.*`` (k-means centres or spectral landmarks +
  their labels), ``h.*`` (hierarchy nodes).
* ``files``: ``umap_model`` (the one pickle: UMAP has no array form; its sha256 is recorded and
  checked before it is unpickled).

Clusters are always fitted in the normalised/PCA feature space, never in UMAP space.

A call replaces an existing run of the same name (notebooks re-run cells); pass
``overwrite=False`` to refuse instead, which is what the CLI does unless ``--overwrite`` is
given. Options are checked before any row is read, and a partial STORE (extraction stopped)
is analysed with a logged warning.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pandas as pd

from probing.analysis.backends import Backend, backend_for_umap, get_backend
from probing.analysis.cluster import Prototypes, fit_kmeans, fit_spectral
from probing.analysis.compat import check_applicable
from probing.analysis.errors import AnalysisError
from probing.analysis.features import FeatureModel, check_layers, fit_features
from probing.analysis.guard import check_all_rows, check_scale, warn_if_partial
from probing.analysis.hierarchical import Hierarchy, check_split, fit_hierarchy, parse_split
from probing.analysis.normalize import NORMALIZE
from probing.store import Run, Store, open_store

log = logging.getLogger("dvprobe.analysis")

ENGINE_VERSION = 1
KINDS = ("pca", "umap", "kmeans", "spectral", "hkmeans", "hspectral", "multilayer")


@contextmanager
def _step(what: str):
    t = time.perf_counter()
    log.info("%s ...", what)
    yield
    log.info("%s done (%.1fs)", what, time.perf_counter() - t)


def _as_store(store: Store | str | os.PathLike, *, warn: bool = True) -> Store:
    """Open ``store`` (or take it as is) and warn if its extraction did not finish."""
    store = store if isinstance(store, Store) else open_store(store)
    if warn:
        warn_if_partial(store, log)
    return store


def check_run_name(name: str, option: str = "--run") -> str:
    """Refuse a name ``STORE/runs/<name>`` cannot hold *before* fitting: the STORE itself
    only checks when saving, i.e. after the slow part."""
    if not name or name.startswith(".") or any(c in name for c in "/\\\0"):
        raise AnalysisError(f"{option} {name!r}: not a valid run name (it names a folder "
                            "in STORE/runs: no '/' or '\\', no leading '.')")
    return name


def check_new_run(store: Store, name: str, overwrite: bool, option: str = "--run") -> None:
    """Refuse to replace an existing run unless asked to (the CLI's ``--overwrite``)."""
    if not overwrite and name in store.runs:
        raise AnalysisError(f"run {name!r} already exists in {store.path}; pass --overwrite "
                            "(overwrite=True from Python) to replace it or choose another "
                            f"{option}")


def _at_least_one(value: int | None, option: str) -> None:
    if value is not None and value < 1:
        raise AnalysisError(f"{option} must be >= 1, got {value}")


def _check_options(kind: str, n_fit: int, normalize: str, pca: int | None, pca2: int | None,
                   cluster: ClusterSpec | None) -> None:
    """Option errors that would otherwise surface only after minutes of reading/fitting."""
    if normalize not in NORMALIZE:
        raise AnalysisError(f"--normalize must be one of {', '.join(NORMALIZE)}, "
                            f"not {normalize!r}")
    _at_least_one(pca, {"multilayer": "--layer-pca", "pca": "--n-components"}.get(kind,
                                                                                   "--pca"))
    _at_least_one(pca2, "--pca")
    if cluster is None:
        return
    _at_least_one(cluster.k, "--k")
    _at_least_one(cluster.n_init, "--n-init")
    if cluster.k > n_fit:
        raise AnalysisError(f"--k {cluster.k}: {n_fit} fitted rows cannot form {cluster.k} "
                            "clusters; use a smaller --k")
    if cluster.method in ("hkmeans", "hspectral"):
        check_split(cluster.split, cluster.k)


def _fit_rows(n: int, fit_sample: int | None, seed: int) -> np.ndarray | None:
    """Sorted random row indices to fit on, or None for all rows."""
    if fit_sample is None or fit_sample >= n:
        return None
    if fit_sample < 2:
        raise AnalysisError(f"--fit-sample must be at least 2, got {fit_sample}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=fit_sample, replace=False))


@dataclass(frozen=True)
class ClusterSpec:
    """What to cluster with: ``method`` in kmeans|spectral|hkmeans|hspectral (+ options)."""

    method: str
    k: int
    n_init: int = 10
    split: list[int] | None = None
    max_split: int = 5
    min_cluster_size: int = 50
    n_landmarks: int = 1000
    n_neighbors: int = 15

    def flat_fit(self, backend: Backend):
        if self.method in ("kmeans", "hkmeans"):
            return lambda x, k, seed: fit_kmeans(backend, x, k, seed, self.n_init)
        return lambda x, k, seed: fit_spectral(backend, x, k, seed,
                                               n_landmarks=self.n_landmarks,
                                               n_neighbors=self.n_neighbors)


def _sizes(labels: pd.Series) -> dict[str, int]:
    return {str(k): int(v) for k, v in labels.value_counts().sort_index().items()}


def _run_analysis(store: Store | str | os.PathLike, *, kind: str, layers: list[str],
                  normalize: str, pca: int | None, pca2: int | None,
                  cluster: ClusterSpec | None, umap: bool, umap_components: int = 2,
                  n_neighbors: int = 15, min_dist: float = 0.1, backend: str = "auto",
                  seed: int = 0, fit_sample: int | None = None, run: str | None = None,
                  params: dict | None = None, overwrite: bool = True) -> Run:
    """Fit features (+ clustering, + UMAP) on a STORE and save everything as one run.

    Every option is checked before any row is read, so a typo costs seconds, not a fit.
    """
    t0 = time.perf_counter()
    store = _as_store(store)
    if store.n == 0:
        raise AnalysisError(f"{store.path}: the STORE has no examples")
    name = check_run_name(run) if run is not None else _default_name(kind, layers, cluster)
    rows = _fit_rows(store.n, fit_sample, seed)
    n_fit = store.n if rows is None else len(rows)
    _check_options(kind, n_fit, normalize, pca, pca2, cluster)
    check_new_run(store, name, overwrite)
    be = get_backend(backend)
    check_layers(store, layers)
    specs = store.layer_specs
    d_in = sum(specs[ly].dim for ly in layers)
    guard_method = "umap" if umap else (cluster.method if cluster else "pca")
    if kind == "multilayer":
        guard_method = "multilayer"
    check_scale(n_fit, d_in, guard_method, be.name)
    # --fit-sample bounds the fit; the features of every row come after it
    per_layer = sum(min(pca, specs[ly].dim) if pca else specs[ly].dim for ly in layers)
    check_all_rows(store.n, min(pca2, per_layer) if pca2 else per_layer)
    if fit_sample is not None and rows is None and fit_sample != store.n:
        log.info("--fit-sample %d >= %d rows: fitting on all of them", fit_sample, store.n)
    log.info("%s on %s: %d rows (%d fitted) x %d features, backend %s", kind, layers,
             store.n, n_fit, d_in, be.name)

    with _step(f"fit features (normalize={normalize}, pca={pca}, pca2={pca2})"):
        fm = fit_features(store, layers, normalize=normalize, pca=pca, pca2=pca2,
                          backend=be, seed=seed, rows=rows)
    with _step(f"transform {store.n} rows -> {fm.out_dim} features"):
        feats = fm.transform(store)
    ffit = feats if rows is None else feats[rows]

    obs = pd.DataFrame(index=range(store.n))
    if "key" in store.obs.columns:
        obs["key"] = store.obs["key"].to_numpy()
    arrays: dict[str, np.ndarray] = dict(fm.to_arrays())
    arrays["fit_rows"] = (np.arange(store.n, dtype=np.int64) if rows is None
                          else rows.astype(np.int64))
    if fm.reduced:
        arrays["pca"] = feats
    cmeta: dict | None = None
    if cluster is not None:
        fit = cluster.flat_fit(be)
        if cluster.method in ("kmeans", "spectral"):
            with _step(f"{cluster.method} k={cluster.k} on {n_fit} x {fm.out_dim}"):
                model = fit(ffit, cluster.k, seed)
            labels = model.predict(feats)
            obs["cluster"] = labels
            arrays.update({"flat.protos": model.protos, "flat.labels": model.labels})
            cmeta = {"method": cluster.method, "k": cluster.k, "sizes": _sizes(obs["cluster"]),
                     "n_prototypes": int(len(model.protos))}
        else:
            with _step(f"{cluster.method} k1={cluster.k} split={cluster.split or 'auto'}"):
                h = fit_hierarchy(ffit, fit, cluster.k, cluster.split, seed,
                                  max_k=cluster.max_split,
                                  min_cluster_size=cluster.min_cluster_size)
            l1, l2, flat = h.predict(feats)
            obs["level1"], obs["level2"], obs["cluster"] = l1, l2, flat
            obs["node"] = [f"{a}.{b}" for a, b in zip(l1, l2, strict=True)]
            arrays.update(h.to_arrays())
            cmeta = {"method": cluster.method, "k": cluster.k,
                     "split": [ch.k for ch in h.children],
                     "split_rule": "explicit" if cluster.split else
                     f"auto: silhouette over k=2..min({cluster.max_split}, size//"
                     f"{cluster.min_cluster_size}) on <=2000 rows",
                     "silhouette": {str(c): {str(k): v for k, v in s.items()}
                                    for c, s in h.split_scores.items()},
                     "level_sizes": {**_sizes(obs["level1"]), **_sizes(obs["node"])},
                     "nodes": [f"{a}.{b}" for a, b in h.nodes]}
        cmeta.update(n_init=cluster.n_init, n_landmarks=cluster.n_landmarks,
                     n_neighbors=cluster.n_neighbors)

    files: dict[str, bytes] = {}
    umeta = None
    if umap:
        with _step(f"UMAP({umap_components}) fit on {n_fit} x {fm.out_dim} [{be.name}]"):
            emb_fit, blob, impl = be.umap_fit(ffit, umap_components, n_neighbors, min_dist,
                                              seed)
        emb = np.empty((store.n, umap_components), dtype=np.float32)
        if rows is None:
            emb[:] = emb_fit
        else:
            emb[rows] = emb_fit
            rest = np.setdiff1d(np.arange(store.n), rows)
            with _step(f"UMAP transform of the other {len(rest)} rows"):
                emb[rest] = be.umap_transform(blob, feats[rest])
        arrays["umap"] = emb
        files["umap_model"] = blob
        umeta = {"n_components": umap_components, "n_neighbors": n_neighbors,
                 "min_dist": min_dist, "impl": impl, "n_fit": n_fit}

    meta = {
        "engine": "dvprobe.analysis", "engine_version": ENGINE_VERSION, "kind": kind,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "store": str(store.path), "n": store.n, "n_fit": n_fit, "fit_sample": fit_sample,
        "seed": seed, "backend": be.name, "backend_version": be.version, "features": fm.to_meta(), "cluster": cmeta,
        "umap": umeta, "params": params or {},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    saved = store.save_run(name, meta=meta, obs=obs, arrays=arrays, files=files)
    log.info("saved run %r in %s (%.1fs)", name, store.path, time.perf_counter() - t0)
    return saved


def _default_name(kind: str, layers: list[str], cluster: ClusterSpec | None) -> str:
    """``<kind><k>-<layer>`` (``kmeans10-mixed5``, ``hkmeans3-mixed5``, ``pca-mixed5``) or
    ``multilayer12-3layers``: k is in the name so runs with another k never share it."""
    k = f"{cluster.k}" if cluster else ""
    return f"{kind}{k}-{layers[0] if len(layers) == 1 else f'{len(layers)}layers'}"


# -- public API ------------------------------------------------------------------------------

def pca(store, layer: str = "mixed5", *, n_components: int = 50, normalize: str = "none",
        backend: str = "auto", seed: int = 0, fit_sample: int | None = None,
        run: str | None = None, overwrite: bool = True) -> Run:
    """PCA of one layer; ``arrays['pca']`` is ``[n, n_components]``."""
    return _run_analysis(store, kind="pca", layers=[layer], normalize=normalize,
                         pca=n_components, pca2=None, cluster=None, umap=False,
                         backend=backend, seed=seed, fit_sample=fit_sample, run=run,
                         overwrite=overwrite)


def umap(store, layer: str = "mixed5", *, n_components: int = 2, normalize: str = "none",
         pca: int | None = 50, n_neighbors: int = 15, min_dist: float = 0.1,
         backend: str = "auto", seed: int = 0, fit_sample: int | None = None,
         run: str | None = None, overwrite: bool = True) -> Run:
    """UMAP of one layer (on its PCA when ``pca`` is set); seeded, and re-appliable."""
    return _run_analysis(store, kind="umap", layers=[layer], normalize=normalize, pca=pca,
                         pca2=None, cluster=None, umap=True, umap_components=n_components,
                         n_neighbors=n_neighbors, min_dist=min_dist, backend=backend,
                         seed=seed, fit_sample=fit_sample, run=run, overwrite=overwrite)


def kmeans(store, layer: str = "mixed5", *, k: int = 10, normalize: str = "none",
           pca: int | None = 50, n_init: int = 10, umap: bool = False, backend: str = "auto",
           seed: int = 0, fit_sample: int | None = None, run: str | None = None,
           overwrite: bool = True) -> Run:
    """k-means (the blog's k = 10 on mixed5) in the normalised/PCA space."""
    return _run_analysis(store, kind="kmeans", layers=[layer], normalize=normalize, pca=pca,
                         pca2=None, cluster=ClusterSpec("kmeans", k, n_init=n_init),
                         umap=umap, backend=backend, seed=seed, fit_sample=fit_sample, run=run,
                         overwrite=overwrite)


def spectral(store, layer: str = "mixed5", *, k: int = 10, normalize: str = "none",
             pca: int | None = 50, n_landmarks: int = 1000, n_neighbors: int = 15,
             umap: bool = False, backend: str = "auto", seed: int = 0,
             fit_sample: int | None = None, run: str | None = None,
             overwrite: bool = True) -> Run:
    """Landmark spectral clustering (see :mod:`probing.analysis.cluster`)."""
    spec = ClusterSpec("spectral", k, n_landmarks=n_landmarks, n_neighbors=n_neighbors)
    return _run_analysis(store, kind="spectral", layers=[layer], normalize=normalize, pca=pca,
                         pca2=None, cluster=spec, umap=umap, backend=backend, seed=seed,
                         fit_sample=fit_sample, run=run, overwrite=overwrite)


def hierarchical_kmeans(store, layer: str = "mixed5", *, k: int = 3,
                        split: str | list[int] | None = "auto", max_split: int = 5,
                        min_cluster_size: int = 50, normalize: str = "none",
                        pca: int | None = 50, n_init: int = 10, umap: bool = False,
                        backend: str = "auto", seed: int = 0, fit_sample: int | None = None,
                        run: str | None = None, overwrite: bool = True) -> Run:
    """The blog's hierarchical k-means: k-means(k), then each cluster split again.

    ``split="3,2,4"`` (or a list) gives each level-1 cluster's sub-cluster count; ``"auto"``
    chooses it per cluster by :func:`probing.analysis.cluster.choose_k` (silhouette over
    k = 2..min(max_split, size // min_cluster_size) on a <= 2000-row subsample; clusters
    smaller than 2 * min_cluster_size stay whole).
    """
    spec = ClusterSpec("hkmeans", k, n_init=n_init, split=parse_split(split),
                       max_split=max_split, min_cluster_size=min_cluster_size)
    return _run_analysis(store, kind="hkmeans", layers=[layer], normalize=normalize, pca=pca,
                         pca2=None, cluster=spec, umap=umap, backend=backend, seed=seed,
                         fit_sample=fit_sample, run=run, overwrite=overwrite)


def hierarchical_spectral(store, layer: str = "mixed5", *, k: int = 3,
                          split: str | list[int] | None = "auto", max_split: int = 5,
                          min_cluster_size: int = 50, normalize: str = "none",
                          pca: int | None = 50, n_landmarks: int = 1000,
                          n_neighbors: int = 15, umap: bool = False, backend: str = "auto",
                          seed: int = 0, fit_sample: int | None = None,
                          run: str | None = None, overwrite: bool = True) -> Run:
    """Hierarchical clustering with landmark spectral clustering at every node."""
    spec = ClusterSpec("hspectral", k, split=parse_split(split), max_split=max_split,
                       min_cluster_size=min_cluster_size, n_landmarks=n_landmarks,
                       n_neighbors=n_neighbors)
    return _run_analysis(store, kind="hspectral", layers=[layer], normalize=normalize,
                         pca=pca, pca2=None, cluster=spec, umap=umap, backend=backend,
                         seed=seed, fit_sample=fit_sample, run=run, overwrite=overwrite)


def multilayer(store, layers: list[str], *, per_layer_pca: int = 200, pca: int = 200,
               k: int = 12, normalize: str = "l2", n_init: int = 10, umap: bool = True,
               backend: str = "auto", seed: int = 0, fit_sample: int | None = None,
               run: str | None = None, overwrite: bool = True) -> Run:
    """The blog's multi-layer pipeline: per-layer normalise + PCA(200), concat, PCA(200),
    k-means(12) (+ UMAP for display).

    ``normalize="l2"`` by default so each layer enters the concatenation with the same row
    norm (otherwise wide or high-activation layers dominate the second PCA). PCA sizes are
    clipped to what the data allows, with a logged warning.
    """
    if not layers:
        raise AnalysisError("multilayer: give at least one layer (--layers a,b,c)")
    return _run_analysis(store, kind="multilayer", layers=list(layers), normalize=normalize,
                         pca=per_layer_pca, pca2=pca,
                         cluster=ClusterSpec("kmeans", k, n_init=n_init), umap=umap,
                         backend=backend, seed=seed, fit_sample=fit_sample, run=run,
                         overwrite=overwrite)


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


def apply(store, run: str, target, *, name: str | None = None, backend: str = "auto",
          label_col: str | None = None, overwrite: bool = True) -> ApplyResult:
    """Push ``target``'s examples through run ``run`` of ``store`` (same fitted models).

    Normalisers, PCAs, k-means centres / hierarchy nodes / spectral landmarks and the UMAP are
    re-applied, nothing is refitted (the blog's 42 mosaic examples). Writes run ``name``
    (default ``"<run>-applied"``) into ``target`` and returns counts per cluster. Refused
    before any work: a ``target`` extracted with another model or pooling (see
    :mod:`probing.analysis.compat`), a ``name`` that is ``run`` itself in the same STORE, an
    existing ``name`` unless ``overwrite``, and a missing ``label_col``.
    """
    src = _as_store(store)
    tgt = _as_store(target, warn=False)
    if not _same_store(src, tgt):
        _as_store(tgt)  # its own partial-STORE warning, once
    out_name = check_run_name(name, "--name") if name is not None else f"{run}-applied"
    if out_name == run and _same_store(src, tgt):
        raise AnalysisError(f"--name {out_name!r} is the run being applied: it would replace "
                            f"the fitted run in {src.path}; choose another --name")
    r = src.load_run(run)
    kind = r.meta.get("kind")
    if r.meta.get("engine") != "dvprobe.analysis" or kind not in KINDS:
        raise AnalysisError(f"run {run!r} in {src.path} was not written by the analysis engine")
    if tgt.n == 0:
        raise AnalysisError(f"{tgt.path}: the STORE has no examples")
    if label_col is not None and label_col not in tgt.obs.columns:
        raise AnalysisError(f"{tgt.path}: no obs column {label_col!r} for --label-col; "
                            f"columns: {list(tgt.obs.columns)}")
    check_new_run(tgt, out_name, overwrite, "--name")
    fm = FeatureModel.from_run(r.meta, r.arrays)
    for w in check_applicable(src, tgt, run, fm.layers):
        log.warning(w)
    check_all_rows(tgt.n, fm.out_dim)
    with _step(f"apply {run!r}: transform {tgt.n} rows of {tgt.path}"):
        feats = fm.transform(tgt)
    obs = pd.DataFrame(index=range(tgt.n))
    if "key" in tgt.obs.columns:
        obs["key"] = tgt.obs["key"].to_numpy()
    arrays: dict[str, np.ndarray] = {}
    if fm.reduced:
        arrays["pca"] = feats
    column, all_labels = None, []
    cm = r.meta.get("cluster")
    if cm is not None:
        if cm["method"] in ("kmeans", "spectral"):
            model = Prototypes(r.arrays["flat.protos"], r.arrays["flat.labels"], int(cm["k"]))
            obs["cluster"] = model.predict(feats)
            column, all_labels = "cluster", [str(i) for i in range(model.k)]
        else:
            h = Hierarchy.from_arrays(r.arrays)
            l1, l2, flat = h.predict(feats)
            obs["level1"], obs["level2"], obs["cluster"] = l1, l2, flat
            obs["node"] = [f"{a}.{b}" for a, b in zip(l1, l2, strict=True)]
            column, all_labels = "node", [f"{a}.{b}" for a, b in h.nodes]
    if r.meta.get("umap"):
        blob = r.file_bytes("umap_model")  # sha256-checked before anything is unpickled
        be = backend_for_umap(r.meta["umap"]["impl"], get_backend(backend))
        with _step(f"UMAP transform of {tgt.n} rows [{be.name}]"):
            arrays["umap"] = be.umap_transform(blob, feats)
    meta = {
        "engine": "dvprobe.analysis", "engine_version": ENGINE_VERSION, "kind": kind,
        "applied_from": {"store": str(src.path), "run": run, "created": r.meta.get("created")},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "store": str(tgt.path), "n": tgt.n, "features": r.meta["features"], "cluster": cm,
        "umap": r.meta.get("umap"),
    }
    counts = pd.DataFrame({"n": []})
    crosstab = None
    if column is not None:
        vc = obs[column].astype(str).value_counts()
        counts = pd.DataFrame({"n": [int(vc.get(c, 0)) for c in all_labels]},
                              index=pd.Index(all_labels, name=column))
        counts["fraction"] = counts["n"] / max(1, tgt.n)
        meta["landed"] = {c: int(v) for c, v in counts["n"].items() if v}
        if label_col is not None:
            crosstab = pd.crosstab(tgt.obs[label_col].to_numpy(),
                                   obs[column].astype(str).to_numpy(),
                                   rownames=[label_col], colnames=[column])
    saved = tgt.save_run(out_name, meta=meta, obs=obs, arrays=arrays)
    return ApplyResult(saved, column or "", counts, crosstab)


def reduce(store, layer: str = "mixed5", *, method: str = "pca",
           n_components: int | None = None, normalize: str = "none", pca: int | None = 50,
           backend: str = "auto", seed: int = 0, fit_sample: int | None = None,
           run: str | None = None, overwrite: bool = True) -> Run:
    """CLI entry: ``method="pca"`` (default 50 components) or ``"umap"`` (default 2-D).

    ``n_components=None`` means the default; 0 is an error, not "the default".
    """
    _at_least_one(n_components, "--n-components")
    if method == "pca":  # (the ``pca`` argument shadows pca() here)
        return _run_analysis(store, kind="pca", layers=[layer], normalize=normalize,
                             pca=50 if n_components is None else n_components, pca2=None,
                             cluster=None, umap=False, backend=backend, seed=seed,
                             fit_sample=fit_sample, run=run, overwrite=overwrite)
    if method == "umap":
        return umap(store, layer, n_components=2 if n_components is None else n_components,
                    normalize=normalize, pca=pca, backend=backend, seed=seed,
                    fit_sample=fit_sample, run=run, overwrite=overwrite)
    raise AnalysisError(f"--method must be pca or umap, not {method!r}")
