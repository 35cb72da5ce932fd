"""Analysis engine: normalise, PCA, UMAP, k-means, hierarchical k-means / spectral,
multi-layer PCA, and ``apply`` of fitted runs to other STOREs (cuML or scikit-learn).

``from probing import analysis as pa; pa.cluster(store, "kmeans", layer="mixed5", k=10)``
(or ``pa.kmeans(store, "mixed5", k=10)``). The methods and their options:
:mod:`probing.analysis.methods`; what a run contains: :mod:`probing.analysis.api`.
"""

from probing.analysis.api import (
    ApplyResult,
    apply,
    cluster,
    features,
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
from probing.analysis.methods import METHODS, method_names

__all__ = [
    "METHODS", "AnalysisError", "ApplyResult", "BackendError", "ScaleError", "apply", "cluster",
    "features", "get_backend", "hierarchical_kmeans", "hierarchical_spectral", "kmeans", "method_names",
    "multilayer", "pca", "reduce", "spectral", "umap",
]
