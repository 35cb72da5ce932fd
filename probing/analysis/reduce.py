"""Exact PCA from streamed moments and the pure-numpy transform shared by fit and ``apply``."""

from __future__ import annotations

import logging

import numpy as np

from probing.analysis.backends import Backend, PCAModel, canonical_signs
from probing.analysis.errors import AnalysisError

log = logging.getLogger("dvprobe.analysis")


def clip_components(requested: int, n_rows: int, n_features: int, what: str) -> int:
    """PCA cannot have more components than min(rows, features); clip with a warning.

    Keeps the blog's "PCA to 200 per layer" usable on layers narrower than 200 (mixed8-10
    pooled outputs are wider, but small test STOREs and subsamples are not).
    """
    if requested < 1:
        raise AnalysisError(f"{what}: PCA needs at least 1 component, got {requested}")
    limit = min(n_rows, n_features)
    if requested > limit:
        log.warning("%s: PCA(%d) clipped to %d (data has %d rows x %d features)",
                    what, requested, limit, n_rows, n_features)
        return limit
    return requested


def fit_pca(backend: Backend, x: np.ndarray, n_components: int, seed: int,
            what: str = "pca") -> PCAModel:
    """PCA of rows held in memory, by a backend (``bench/bench_analysis.py`` compares the
    backends' PCAs); runs fit theirs from streamed moments (:func:`pca_from_moments`)."""
    k = clip_components(n_components, x.shape[0], x.shape[1], what)
    return backend.pca(np.ascontiguousarray(x, dtype=np.float32), k, seed)


def pca_from_moments(mom, n_components: int, what: str = "pca") -> PCAModel:
    """The exact PCA of the rows fed to ``mom`` (:class:`probing.analysis.stream.Moments`):
    the top eigenvectors of their ``d x d`` covariance, as scikit-learn's full PCA gives
    (``explained_variance`` with ``ddof=1``, the ratio to the total variance, canonical
    signs). Memory is ``d x d``, whatever the rows."""
    cov = mom.cov(ddof=1)
    d = cov.shape[0]
    k = clip_components(n_components, mom.n, d, what)
    values, vectors = np.linalg.eigh(cov)
    order = np.argsort(values)[::-1][:k]
    ev = np.maximum(values[order], 0)
    total = float(np.trace(cov))
    ratio = ev / total if total > 0 else np.zeros_like(ev)
    return PCAModel(canonical_signs(vectors[:, order].T), mom.mean.astype(np.float32),
                    ev.astype(np.float64), ratio.astype(np.float64))


def pca_transform(x: np.ndarray, m: PCAModel) -> np.ndarray:
    """Project rows onto the fitted components: ``(x - mean) @ components.T`` (float32)."""
    x = np.asarray(x, dtype=np.float32)
    if x.shape[1] != m.mean.shape[0]:
        raise AnalysisError(f"PCA: rows have {x.shape[1]} features, the model "
                            f"{m.mean.shape[0]}")
    return (x - m.mean) @ m.components.T


def pca_to_arrays(prefix: str, m: PCAModel) -> dict[str, np.ndarray]:
    """Arrays for a run's ``arrays.npz`` (plain numbers, no pickle)."""
    return {f"{prefix}.components": m.components, f"{prefix}.mean": m.mean,
            f"{prefix}.explained_variance": m.explained_variance,
            f"{prefix}.explained_variance_ratio": m.explained_variance_ratio}


def pca_from_arrays(prefix: str, arrays: dict[str, np.ndarray]) -> PCAModel:
    try:
        return PCAModel(arrays[f"{prefix}.components"], arrays[f"{prefix}.mean"],
                        arrays[f"{prefix}.explained_variance"],
                        arrays[f"{prefix}.explained_variance_ratio"])
    except KeyError as exc:
        raise AnalysisError(f"run arrays lack the PCA model {prefix!r} ({exc})") from None
