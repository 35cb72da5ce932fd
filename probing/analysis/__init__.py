"""Analysis engine: normalise, PCA, UMAP, k-means, hierarchical k-means / spectral,
multi-layer PCA, and ``apply`` of fitted runs to other STOREs (cuML or scikit-learn).

``from probing import analysis as pa; pa.kmeans(store, layer="mixed5", k=10, run="km10")``.
See :mod:`probing.analysis.api` for what a run contains.
"""

from probing.analysis.api import (
    ApplyResult,
    apply,
    hierarchical_kmeans,
    hierarchical_spectral,
    kmeans,
    multilayer,
    pca,
    reduce,
    spectral,
    umap,
)
from probing.analysis.backends import get_backend
from probing.analysis.errors import AnalysisError, BackendError, ScaleError

__all__ = [
    "AnalysisError", "ApplyResult", "BackendError", "ScaleError", "apply", "get_backend",
    "hierarchical_kmeans", "hierarchical_spectral", "kmeans", "multilayer", "pca", "reduce",
    "spectral", "umap",
]
