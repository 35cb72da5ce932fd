"""PCA fitting (through a backend) and the pure-numpy transform shared by fit and ``apply``."""

from __future__ import annotations

import logging

import numpy as np

from probing.analysis.backends import Backend, PCAModel
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
    """Fit PCA with at most ``n_components`` (clipped to the data) on rows ``x``."""
    k = clip_components(n_components, x.shape[0], x.shape[1], what)
    return backend.pca(np.ascontiguousarray(x, dtype=np.float32), k, seed)


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
