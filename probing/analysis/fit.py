"""Fit a :class:`~probing.analysis.methods.Plan` on a STORE and save it as one run.

Stages: :func:`prepare` (every option, the fit sample and the memory needed are checked
before any layer row is read, so a typo costs seconds, not a fit), features (normalise +
PCA from streamed moments, :mod:`features`) and the clusterer, both on the fit sample
(:mod:`sample`), then every row labelled chunk by chunk (:mod:`stream`), the UMAP, and
``Store.save_run``.

What a run keeps per row: its labels, UMAP coordinates, and for a PCA run its ``pca``
coordinates (the run's result). A clustering run does not keep its ``[n, out_dim]``
features: they are recomputed exactly from the stored models by :func:`run_features`
(``pa.features``), so a run costs a few bytes per example on disk instead of ~200 (~800
for multi-layer).
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone

import numpy as np
import pandas as pd

from probing.analysis.backends import Backend
from probing.analysis.cluster import Prototypes, fit_kmeans, fit_spectral
from probing.analysis.engines import get_engine
from probing.analysis.errors import AnalysisError
from probing.analysis.features import FeatureModel, check_layers, fit_features
from probing.analysis.guard import (
    check_scale,
    fixed_bytes,
    umap_transform_note,
    warn_if_partial,
)
from probing.analysis.hierarchical import Hierarchy, check_split, fit_hierarchy
from probing.analysis.methods import ClusterSpec, Plan, RunSettings, UmapSpec, at_least_one
from probing.analysis.normalize import NORMALIZE
from probing.analysis.passes import Passes, open_passes
from probing.analysis.sample import (
    DISPLAY_UMAP_ROWS,
    FitSample,
    choose_fit_rows,
    default_rows,
    parse_fit_sample,
    subsample,
)
from probing.analysis.stream import Predict
from probing.store import Run, Store, as_store

log = logging.getLogger("dvprobe.analysis")

ENGINE_VERSION = 2


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
    sample: FitSample
    umap_rows: np.ndarray | None  # sorted rows the UMAP fits on (None = every row)
    backend: Backend

    @property
    def rows(self) -> np.ndarray | None:
        return self.sample.rows

    @property
    def n_fit(self) -> int:
        return self.sample.n_fit

    @property
    def n_umap(self) -> int:
        return self.store.n if self.umap_rows is None else len(self.umap_rows)


def default_name(plan: Plan) -> str:
    """``<kind><k>-<layer>`` (``kmeans10-mixed5``, ``hkmeans3-mixed5``, ``pca-mixed5``) or
    ``multilayer12-3layers``: k is in the name so runs with another k never share it."""
    k = f"{plan.cluster.k}" if plan.cluster else ""
    layers = plan.layers
    return f"{plan.kind}{k}-{layers[0] if len(layers) == 1 else f'{len(layers)}layers'}"


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


def _display_umap(plan: Plan, n: int, backend: str) -> Plan:
    """Drop multilayer's default UMAP on a large STORE on the CPU (saying so)."""
    if plan.umap is None or not plan.umap_by_default or backend in ("cuml", "dask-cuda") \
            or n <= DISPLAY_UMAP_ROWS:
        return plan
    log.warning("multilayer: no display UMAP by default above %s rows on the CPU (%s here): "
                "transforming every row with umap-learn would take most of the run; --umap "
                "adds it anyway", f"{DISPLAY_UMAP_ROWS:,}", f"{n:,}")
    return replace(plan, umap=None)


def _umap_rows(plan: Plan, sample: FitSample, settings: RunSettings) -> np.ndarray | None:
    """The rows a UMAP fits on: a UMAP run's own sample; for a clustering's display UMAP,
    at most the UMAP default of the clusterer's sample (unless --fit-sample was given)."""
    if plan.umap is None or plan.kind == "umap" or settings.fit_sample is not None:
        return sample.rows
    return subsample(sample.rows, sample.n, default_rows("umap"), sample.seed)


def _out_dim(store: Store, plan: Plan) -> int:
    specs = store.layer_specs
    per_layer = sum(min(plan.pca, specs[ly].dim) if plan.pca else specs[ly].dim
                    for ly in plan.layers)
    return min(plan.pca2, per_layer) if plan.pca2 else per_layer


def _check_memory(job: Job) -> None:
    """The scale guard, for the clusterer's sample and the UMAP's (see :mod:`guard`)."""
    plan, store = job.plan, job.store
    be = "cuml" if job.backend.name in ("cuml", "dask-cuda") else "sklearn"  # where fits run
    out_dim = _out_dim(store, plan)
    fixed = fixed_bytes(store.n, [store.layer_specs[ly].dim for ly in plan.layers],
                        kept=out_dim if plan.kind == "pca" else 0)
    if plan.kind != "umap":
        check_scale(job.n_fit, out_dim, plan.cluster_method, be, fixed=fixed)
    if plan.umap is not None:
        check_scale(job.n_umap, out_dim, "umap", be, fixed=fixed)
        note = umap_transform_note(store.n - job.n_umap, be)
        if note:
            log.warning(note)


def prepare(store: Store, plan: Plan, settings: RunSettings) -> Job:
    """Every check that needs no layer row: options, run name, layers, the fit sample,
    memory for the fit."""
    if store.n == 0:
        raise AnalysisError(f"{store.path}: the STORE has no examples")
    name = check_run_name(settings.run) if settings.run is not None else default_name(plan)
    parse_fit_sample(settings.fit_sample)
    check_new_run(store, name, settings.overwrite)
    be = get_engine(settings.backend, settings.scheduler)
    check_layers(store, list(plan.layers))
    plan = _display_umap(plan, store.n, be.name)
    sample = choose_fit_rows(store, plan.cluster_method, settings.fit_sample, settings.seed)
    _check_plan(plan, sample.n_fit)
    job = Job(store, plan, settings, name, sample, _umap_rows(plan, sample, settings), be)
    _check_memory(job)
    log.info("%s", sample.describe())
    return job


def _sizes(labels: np.ndarray) -> dict[str, int]:
    values, counts = np.unique(np.asarray(labels), return_counts=True)
    return {str(v): int(c) for v, c in zip(values, counts, strict=True)}


def flat_fit(spec: ClusterSpec, backend: Backend):
    """``(x, k, seed) -> Prototypes`` for the flat clusterer of ``spec`` (each node of a
    hierarchy is fitted with it too)."""
    if spec.method in ("kmeans", "hkmeans"):
        return lambda x, k, seed: fit_kmeans(backend, x, k, seed, spec.n_init)
    return lambda x, k, seed: fit_spectral(backend, x, k, seed, n_landmarks=spec.n_landmarks,
                                           n_neighbors=spec.n_neighbors)


def flat_predict(model: Prototypes) -> Predict:
    return lambda x: {"cluster": model.predict(x)}


def tree_predict(h: Hierarchy) -> Predict:
    """Hierarchy labels of feature rows: ``level1``, ``level2``, flat ``cluster`` and
    ``node`` ("2.1"; one shared string object per node, not one per row)."""
    names = np.array([f"{a}.{b}" for a, b in h.nodes], dtype=object)

    def predict(x: np.ndarray) -> dict[str, np.ndarray]:
        l1, l2, flat = h.predict(x)
        return {"level1": l1, "level2": l2, "cluster": flat, "node": names[flat]}

    return predict


def _fit_flat(job: Job, fitted: np.ndarray, arrays: dict) -> tuple[Predict, dict]:
    spec = job.plan.cluster
    with step(f"{spec.method} k={spec.k} on {job.n_fit} x {fitted.shape[1]}"):
        model: Prototypes = flat_fit(spec, job.backend)(fitted, spec.k, job.settings.seed)
    arrays.update({"flat.protos": model.protos, "flat.labels": model.labels})
    return flat_predict(model), {"method": spec.method, "k": spec.k,
                                 "n_prototypes": int(len(model.protos))}


def _fit_tree(job: Job, fitted: np.ndarray, arrays: dict) -> tuple[Predict, dict]:
    spec = job.plan.cluster
    with step(f"{spec.method} k1={spec.k} split={spec.split or 'auto'}"):
        h = fit_hierarchy(fitted, flat_fit(spec, job.backend), spec.k, spec.split,
                          job.settings.seed, max_k=spec.max_split,
                          min_cluster_size=spec.min_cluster_size)
    arrays.update(h.to_arrays())
    return tree_predict(h), {
        "method": spec.method, "k": spec.k, "split": [ch.k for ch in h.children],
        "split_rule": "explicit" if spec.split else
        f"auto: silhouette over k=2..min({spec.max_split}, size//"
        f"{spec.min_cluster_size}) on <=2000 rows",
        "silhouette": {str(c): {str(k): v for k, v in s.items()}
                       for c, s in h.split_scores.items()},
        "nodes": [f"{a}.{b}" for a, b in h.nodes]}


def fit_clusters(job: Job, fitted: np.ndarray, arrays: dict) -> tuple[Predict, dict]:
    """Fit the plan's clusterer on the ``fitted`` rows, add its models to ``arrays``;
    returns how to label feature rows and the run's ``cluster`` metadata (sizes come once
    every row is labelled: :func:`cluster_sizes`)."""
    spec = job.plan.cluster
    predict, meta = (_fit_tree if spec.hierarchical else _fit_flat)(job, fitted, arrays)
    meta.update(n_init=spec.n_init, n_landmarks=spec.n_landmarks, n_neighbors=spec.n_neighbors)
    return predict, meta


def cluster_sizes(columns: dict[str, np.ndarray]) -> dict:
    """``sizes`` (flat) or ``level_sizes`` (hierarchy: level 1 and nodes) of labelled rows."""
    if "node" in columns:
        return {"level_sizes": {**_sizes(columns["level1"]), **_sizes(columns["node"])}}
    return {"sizes": _sizes(columns["cluster"])}


def _log_rate(rows: int, seconds: float, left: int) -> None:
    rate = rows / max(seconds, 1e-9)
    eta = left / rate
    log.info("UMAP transform: %s rows in %.1fs (%s rows/s); the other %s rows need ~%s",
             f"{rows:,}", seconds, f"{rate:,.0f}", f"{left:,}",
             f"{eta:.0f} s" if eta < 120 else f"{eta / 60:.0f} min")


def umap_every_row(passes: Passes, store: Store, fm: FeatureModel, be: Backend, blob: bytes,
                   n_components: int, fitted: tuple[np.ndarray, np.ndarray] | None
                   ) -> np.ndarray:
    """UMAP coordinates of every row: the fitted rows' embedding, the others transformed in
    fixed calls (:func:`probing.analysis.stream.umap_rows`, here or on Dask workers), the
    rate logged after the first."""
    left = store.n - (0 if fitted is None else len(fitted[0]))
    with step(f"UMAP transform of {left} rows [{be.name}]"):
        return passes.umap(store, fm, be, blob, n_components, fitted, on_first=_log_rate)


def fit_umap(job: Job, fitted: np.ndarray, passes: Passes, fm: FeatureModel, arrays: dict,
             files: dict) -> dict:
    """UMAP fitted on its rows, then every other row transformed; the model is the run's
    one pickle (``files["umap_model"]``)."""
    u: UmapSpec = job.plan.umap
    be, rows, urows = job.backend, job.rows, job.umap_rows
    x = fitted if urows is rows else fitted[np.searchsorted(
        np.arange(job.store.n) if rows is None else rows, urows)]
    with step(f"UMAP({u.n_components}) fit on {len(x)} x {x.shape[1]} [{be.name}]"):
        emb_fit, blob, impl = be.umap_fit(x, u.n_components, u.n_neighbors, u.min_dist,
                                          job.settings.seed)
    where = np.arange(job.store.n) if urows is None else urows
    arrays["umap"] = umap_every_row(passes, job.store, fm, be, blob, u.n_components,
                                    (where, emb_fit))
    files["umap_model"] = blob
    return {"n_components": u.n_components, "n_neighbors": u.n_neighbors,
            "min_dist": u.min_dist, "impl": impl, "n_fit": len(x)}


def keyed_obs(store: Store) -> pd.DataFrame:
    """A run's per-example frame, starting with the STORE's ``key`` column (only that
    column of obs is read)."""
    obs = pd.DataFrame(index=range(store.n))
    if "key" in store.obs_dtypes.index:
        obs["key"] = store.keys.array
    return obs


def run_features(store: Store | str | os.PathLike, run: str,
                 rows: np.ndarray | None = None) -> np.ndarray:
    """The features run ``run`` clustered in (its normalised / PCA space), recomputed from
    its stored models for ``rows`` (sorted; None = every row): the same code path as the
    fit, so equal to what the clusterer saw."""
    store = as_store(store)
    r = store.load_run(run)
    return FeatureModel.from_run(r.meta, r.arrays).transform(store, rows)


def fit_run(store: Store | str | os.PathLike, plan: Plan, settings: RunSettings,
            params: dict | None = None) -> Run:
    """Fit ``plan`` on ``store`` (features, + clusters, + UMAP) and save it as one run.

    Nothing is saved until every pass is done: an error, a lost Dask worker or Ctrl-C
    before that leaves no ``runs/<name>`` (and ``Store.save_run`` itself is atomic)."""
    t0 = time.perf_counter()
    store = open_for_analysis(store)
    job = prepare(store, plan, settings)
    plan = job.plan
    log.info("%s on %s: %d rows (%d fitted) x %d features, backend %s", plan.kind,
             list(plan.layers), store.n, job.n_fit,
             sum(store.layer_specs[ly].dim for ly in plan.layers), job.backend.name)
    with open_passes(job.backend) as passes:
        meta, obs, arrays, files = _fit_every_row(job, passes)
    meta.update({"params": params or {}, "seconds": round(time.perf_counter() - t0, 2)})
    saved = store.save_run(job.name, meta=meta, obs=obs, arrays=arrays, files=files)
    log.info("saved run %r in %s (%.1fs)", job.name, store.path, time.perf_counter() - t0)
    return saved


def _fit_every_row(job: Job, passes: Passes) -> tuple[dict, pd.DataFrame, dict, dict]:
    """The run's models fitted and every row labelled: (meta, obs, arrays, files)."""
    store, plan, settings = job.store, job.plan, job.settings
    with step(f"fit features (normalize={plan.normalize}, pca={plan.pca}, pca2={plan.pca2})"):
        fm = fit_features(store, list(plan.layers), normalize=plan.normalize, pca=plan.pca,
                          pca2=plan.pca2, rows=job.rows, passes=passes)
    fitted = fm.transform(store, job.rows) if plan.cluster or plan.umap else None
    arrays: dict[str, np.ndarray] = dict(fm.to_arrays())
    arrays["fit_rows"] = (np.arange(store.n, dtype=np.int64) if job.rows is None
                          else job.rows.astype(np.int64))
    if plan.umap is not None and job.umap_rows is not job.rows and job.umap_rows is not None:
        arrays["umap_fit_rows"] = job.umap_rows.astype(np.int64)
    predict, cmeta = fit_clusters(job, fitted, arrays) if plan.cluster else (None, None)
    with step(f"label {store.n} rows -> {fm.out_dim} features [{passes.name}]"):
        out = passes.label(store, fm, predict,
                           fm.out_dim if plan.kind == "pca" and fm.reduced else None)
    if cmeta is not None:
        cmeta.update(cluster_sizes(out.columns))
    arrays.update(out.arrays)
    files: dict[str, bytes] = {}
    umeta = fit_umap(job, fitted, passes, fm, arrays, files) if plan.umap else None
    del fitted
    obs = keyed_obs(store)
    for name, values in out.columns.items():
        obs[name] = values
    meta = {
        "engine": "dvprobe.analysis", "engine_version": ENGINE_VERSION, "kind": plan.kind,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "store": str(store.path), "n": store.n, "n_fit": job.n_fit,
        "fit_sample": job.sample.to_meta(), "seed": settings.seed,
        "backend": job.backend.name, "backend_version": job.backend.version,
        "features": fm.to_meta(), "cluster": cmeta, "umap": umeta,
    }
    return meta, obs, arrays, files
