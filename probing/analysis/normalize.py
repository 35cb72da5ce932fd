"""Row / feature normalisation with parameters fitted once and re-applied to new examples.

* ``none``: raw activations (magnitude carries information, e.g. read depth).
* ``l2``: each row scaled to unit length, so clustering follows the activation *pattern*;
  stateless, and gives every layer the same total weight when several are concatenated.
* ``standardize``: per-feature z-score with mean/scale fitted on the training rows; constant
  features get scale 1 (not 0) so they stay 0 instead of becoming NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from probing.analysis.errors import AnalysisError

NORMALIZE = ("none", "l2", "standardize")


@dataclass(frozen=True)
class NormParams:
    """Fitted normaliser; ``mean``/``scale`` are empty arrays for stateless kinds."""

    kind: str
    mean: np.ndarray
    scale: np.ndarray


def fit_normalizer(x: np.ndarray, kind: str) -> NormParams:
    """Fit ``kind`` on training rows ``x`` ``[n, d]``."""
    if kind not in NORMALIZE:
        raise AnalysisError(f"--normalize must be one of {', '.join(NORMALIZE)}, not {kind!r}")
    empty = np.zeros(0, dtype=np.float32)
    if kind != "standardize":
        return NormParams(kind, empty, empty)
    x64 = np.asarray(x, dtype=np.float64)
    mean = x64.mean(axis=0)
    scale = x64.std(axis=0)
    scale[scale < 1e-12] = 1.0
    return NormParams(kind, mean.astype(np.float32), scale.astype(np.float32))


def normalizer_from_moments(kind: str, mean: np.ndarray, var: np.ndarray) -> NormParams:
    """``kind`` fitted from streamed column moments (:class:`probing.analysis.stream.Moments`,
    ``ddof=0`` like :func:`fit_normalizer`): the same parameters, without holding the rows."""
    if kind not in NORMALIZE:
        raise AnalysisError(f"--normalize must be one of {', '.join(NORMALIZE)}, not {kind!r}")
    empty = np.zeros(0, dtype=np.float32)
    if kind != "standardize":
        return NormParams(kind, empty, empty)
    scale = np.sqrt(np.asarray(var, dtype=np.float64))
    scale[scale < 1e-12] = 1.0
    return NormParams(kind, np.asarray(mean, np.float32), scale.astype(np.float32))


def apply_normalizer(x: np.ndarray, p: NormParams) -> np.ndarray:
    """Apply fitted params to rows ``x``; returns a new float32 array."""
    x = np.asarray(x, dtype=np.float32)
    if p.kind == "none":
        return np.array(x, copy=True)
    if p.kind == "l2":
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        norms[norms == 0] = 1.0
        return x / norms
    if x.shape[1] != p.mean.shape[0]:
        raise AnalysisError(f"standardize: rows have {x.shape[1]} features, the fitted "
                            f"normaliser {p.mean.shape[0]}")
    return (x - p.mean) / p.scale
