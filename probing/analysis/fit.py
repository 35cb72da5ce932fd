"""Fit a :class:`~probing.analysis.methods.Plan` on a STORE and save it as one run.

Stages: :func:`prepare` (every option and the memory needed are checked before any row is
read, so a typo costs seconds, not a fit), features (normalise + PCA, :mod:`features`),
clusters (flat or hierarchical), UMAP, then ``Store.save_run``.
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

from probing.analysis.backends import Backend, get_backend
from probing.analysis.cluster import Prototypes, fit_kmeans, fit_spectral
from probing.analysis.errors import AnalysisError
from probing.analysis.features import check_layers, fit_features
from probing.analysis.guard import check_all_rows, check_scale, warn_if_partial
from probing.analysis.hierarchical import check_split, fit_hierarchy
from probing.analysis.methods import ClusterSpec, Plan, RunSettings, UmapSpec, at_least_one
from probing.analysis.normalize import NORMALIZE
from probing.store import Run, Store, as_store

log = logging.getLogger("dvprobe.analysis")

ENGINE_VERSION = 1


@contextmanager
def step(what: str):
    """Log ``what ...`` and ``what done (1.2s)`` around a slow stage."""
    t = time.perf_counter()
    log.info("%s ...", what)
    yield
    log.info("%s done (%.1fs)", what, time.perf_counter() - t)


def open_for_analysis(store: Store | str | os.PathLike, *, warn: bool = True) -> Store:
    """:func:`probing.store.as_store`, warning (once per call) if its extraction stopped."""
    store = as_store(store)
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


@dataclass(frozen=True)
class Job:
    """A checked plan on one STORE: the run's name, the rows to fit on and the backend."""

    store: Store
    plan: Plan
    settings: RunSettings
    name: str
    rows: np.ndarray | None  # sorted row indices to fit on; None = all rows
    backend: Backend

    @property
    def n_fit(self) -> int:
        return self.store.n if self.rows is None else len(self.rows)


def default_name(plan: Plan) -> str:
    """``<kind><k>-<layer>`` (``kmeans10-mixed5``, ``hkmeans3-mixed5``, ``pca-mixed5``) or
    ``multilayer12-3layers``: k is in the name so runs with another k never share it."""
    k = f"{plan.cluster.k}" if plan.cluster else ""
    layers = plan.layers
    return f"{plan.kind}{k}-{layers[0] if len(layers) == 1 else f'{len(layers)}layers'}"


def _fit_rows(n: int, fit_sample: int | None, seed: int) -> np.ndarray | None:
    """Sorted random row indices to fit on, or None for all rows."""
    if fit_sample is None or fit_sample >= n:
        return None
    if fit_sample < 2:
        raise AnalysisError(f"--fit-sample must be at least 2, got {fit_sample}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=fit_sample, replace=False))


def _check_plan(plan: Plan, n_fit: int) -> None:
    """Option errors that would otherwise surface only after minutes of reading/fitting."""
    if plan.normalize not in NORMALIZE:
        raise AnalysisError(f"--normalize must be one of {', '.join(NORMALIZE)}, "
                            f"not {plan.normalize!r}")
    at_least_one(plan.pca, plan.pca_option)
    at_least_one(plan.pca2, "--pca")
    spec = plan.cluster
    if spec is None:
        return
    at_least_one(spec.k, "--k")
    at_least_one(spec.n_init, "--n-init")
    if spec.k > n_fit:
        raise AnalysisError(f"--k {spec.k}: {n_fit} fitted rows cannot form {spec.k} "
                            "clusters; use a smaller --k")
    if spec.hierarchical:
        check_split(spec.split, spec.k)


def prepare(store: Store, plan: Plan, settings: RunSettings) -> Job:
    """Every check that needs no row: options, run name, layers, memory for the fit."""
    if store.n == 0:
        raise AnalysisError(f"{store.path}: the STORE has no examples")
    name = check_run_name(settings.run) if settings.run is not None else default_name(plan)
    rows = _fit_rows(store.n, settings.fit_sample, settings.seed)
    n_fit = store.n if rows is None else len(rows)
    _check_plan(plan, n_fit)
    check_new_run(store, name, settings.overwrite)
    be = get_backend(settings.backend)
    layers = list(plan.layers)
    check_layers(store, layers)
    specs = store.layer_specs
    check_scale(n_fit, sum(specs[ly].dim for ly in layers), plan.scale_method, be.name)
    # --fit-sample bounds the fit; the features of every row come after it
    per_layer = sum(min(plan.pca, specs[ly].dim) if plan.pca else specs[ly].dim
                    for ly in layers)
    check_all_rows(store.n, min(plan.pca2, per_layer) if plan.pca2 else per_layer)
    if settings.fit_sample is not None and rows is None and settings.fit_sample != store.n:
        log.info("--fit-sample %d >= %d rows: fitting on all of them", settings.fit_sample,
                 store.n)
    return Job(store, plan, settings, name, rows, be)


def _sizes(labels: pd.Series) -> dict[str, int]:
    return {str(k): int(v) for k, v in labels.value_counts().sort_index().items()}


def flat_fit(spec: ClusterSpec, backend: Backend):
    """``(x, k, seed) -> Prototypes`` for the flat clusterer of ``spec`` (each node of a
    hierarchy is fitted with it too)."""
    if spec.method in ("kmeans", "hkmeans"):
        return lambda x, k, seed: fit_kmeans(backend, x, k, seed, spec.n_init)
    return lambda x, k, seed: fit_spectral(backend, x, k, seed, n_landmarks=spec.n_landmarks,
                                           n_neighbors=spec.n_neighbors)


def _fit_flat(job: Job, fitted: np.ndarray, feats: np.ndarray, obs: pd.DataFrame,
              arrays: dict) -> dict:
    spec = job.plan.cluster
    with step(f"{spec.method} k={spec.k} on {job.n_fit} x {fitted.shape[1]}"):
        model: Prototypes = flat_fit(spec, job.backend)(fitted, spec.k, job.settings.seed)
    obs["cluster"] = model.predict(feats)
    arrays.update({"flat.protos": model.protos, "flat.labels": model.labels})
    return {"method": spec.method, "k": spec.k, "sizes": _sizes(obs["cluster"]),
            "n_prototypes": int(len(model.protos))}


def _fit_tree(job: Job, fitted: np.ndarray, feats: np.ndarray, obs: pd.DataFrame,
              arrays: dict) -> dict:
    spec = job.plan.cluster
    with step(f"{spec.method} k1={spec.k} split={spec.split or 'auto'}"):
        h = fit_hierarchy(fitted, flat_fit(spec, job.backend), spec.k, spec.split,
                          job.settings.seed, max_k=spec.max_split,
                          min_cluster_size=spec.min_cluster_size)
    l1, l2, flat = h.predict(feats)
    obs["level1"], obs["level2"], obs["cluster"] = l1, l2, flat
    obs["node"] = [f"{a}.{b}" for a, b in zip(l1, l2, strict=True)]
    arrays.update(h.to_arrays())
    return {"method": spec.method, "k": spec.k, "split": [ch.k for ch in h.children],
            "split_rule": "explicit" if spec.split else
            f"auto: silhouette over k=2..min({spec.max_split}, size//"
            f"{spec.min_cluster_size}) on <=2000 rows",
            "silhouette": {str(c): {str(k): v for k, v in s.items()}
                           for c, s in h.split_scores.items()},
            "level_sizes": {**_sizes(obs["level1"]), **_sizes(obs["node"])},
            "nodes": [f"{a}.{b}" for a, b in h.nodes]}


def fit_clusters(job: Job, fitted: np.ndarray, feats: np.ndarray, obs: pd.DataFrame,
                 arrays: dict) -> dict:
    """Fit the plan's clusterer on ``fitted`` rows, label every row of ``feats`` into
    ``obs``, add its models to ``arrays``; returns the run's ``cluster`` metadata."""
    spec = job.plan.cluster
    fit = _fit_tree if spec.hierarchical else _fit_flat
    meta = fit(job, fitted, feats, obs, arrays)
    meta.update(n_init=spec.n_init, n_landmarks=spec.n_landmarks, n_neighbors=spec.n_neighbors)
    return meta


def fit_umap(job: Job, fitted: np.ndarray, feats: np.ndarray, arrays: dict,
             files: dict) -> dict:
    """UMAP fitted on the fitted rows, then applied to the others; the model is the run's
    one pickle (``files["umap_model"]``)."""
    u: UmapSpec = job.plan.umap
    be, rows, n = job.backend, job.rows, job.store.n
    with step(f"UMAP({u.n_components}) fit on {job.n_fit} x {feats.shape[1]} [{be.name}]"):
        emb_fit, blob, impl = be.umap_fit(fitted, u.n_components, u.n_neighbors, u.min_dist,
                                          job.settings.seed)
    emb = np.empty((n, u.n_components), dtype=np.float32)
    if rows is None:
        emb[:] = emb_fit
    else:
        emb[rows] = emb_fit
        rest = np.setdiff1d(np.arange(n), rows)
        with step(f"UMAP transform of the other {len(rest)} rows"):
            emb[rest] = be.umap_transform(blob, feats[rest])
    arrays["umap"] = emb
    files["umap_model"] = blob
    return {"n_components": u.n_components, "n_neighbors": u.n_neighbors,
            "min_dist": u.min_dist, "impl": impl, "n_fit": job.n_fit}


def keyed_obs(store: Store) -> pd.DataFrame:
    """A run's per-example frame, starting with the STORE's ``key`` column."""
    obs = pd.DataFrame(index=range(store.n))
    if "key" in store.obs.columns:
        obs["key"] = store.obs["key"].to_numpy()
    return obs


def fit_run(store: Store | str | os.PathLike, plan: Plan, settings: RunSettings,
            params: dict | None = None) -> Run:
    """Fit ``plan`` on ``store`` (features, + clusters, + UMAP) and save it as one run."""
    t0 = time.perf_counter()
    store = open_for_analysis(store)
    job = prepare(store, plan, settings)
    log.info("%s on %s: %d rows (%d fitted) x %d features, backend %s", plan.kind,
             list(plan.layers), store.n, job.n_fit,
             sum(store.layer_specs[ly].dim for ly in plan.layers), job.backend.name)
    with step(f"fit features (normalize={plan.normalize}, pca={plan.pca}, pca2={plan.pca2})"):
        fm = fit_features(store, list(plan.layers), normalize=plan.normalize, pca=plan.pca,
                          pca2=plan.pca2, backend=job.backend, seed=settings.seed,
                          rows=job.rows)
    with step(f"transform {store.n} rows -> {fm.out_dim} features"):
        feats = fm.transform(store)
    fitted = feats if job.rows is None else feats[job.rows]
    obs = keyed_obs(store)
    arrays: dict[str, np.ndarray] = dict(fm.to_arrays())
    arrays["fit_rows"] = (np.arange(store.n, dtype=np.int64) if job.rows is None
                          else job.rows.astype(np.int64))
    if fm.reduced:
        arrays["pca"] = feats
    files: dict[str, bytes] = {}
    cmeta = fit_clusters(job, fitted, feats, obs, arrays) if plan.cluster else None
    umeta = fit_umap(job, fitted, feats, arrays, files) if plan.umap else None
    meta = {
        "engine": "dvprobe.analysis", "engine_version": ENGINE_VERSION, "kind": plan.kind,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "store": str(store.path), "n": store.n, "n_fit": job.n_fit,
        "fit_sample": settings.fit_sample, "seed": settings.seed, "backend": job.backend.name,
        "backend_version": job.backend.version, "features": fm.to_meta(), "cluster": cmeta,
        "umap": umeta, "params": params or {}, "seconds": round(time.perf_counter() - t0, 2),
    }
    saved = store.save_run(job.name, meta=meta, obs=obs, arrays=arrays, files=files)
    log.info("saved run %r in %s (%.1fs)", job.name, store.path, time.perf_counter() - t0)
    return saved

