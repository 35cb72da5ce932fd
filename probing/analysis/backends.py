"""Compute backends: RAPIDS cuML on a CUDA GPU, scikit-learn / umap-learn on the CPU.

Both backends implement the same small contract and always return **numpy** arrays, so every
fitted model is stored and re-applied the same way whichever backend fitted it:

=================  ==========================================  ================================
operation          sklearn backend                             cuml backend
=================  ==========================================  ================================
``pca``            ``sklearn.decomposition.PCA``               ``cuml.PCA`` (``svd_solver="full"``)
``kmeans``         ``sklearn.cluster.KMeans``                  ``cuml.KMeans`` (scalable k-means++)
``umap_fit``       ``umap.UMAP`` (pickled, hash-checked)       ``cuml.UMAP`` (pickled, hash-checked)
``umap_transform`` ``UMAP.transform``                          ``cuml.UMAP.transform``
spectral           k-means landmarks (this backend) + host eigensolver on the landmark graph
nearest centroid   numpy on the host for both (so fit and ``apply`` give bit-identical labels)
=================  ==========================================  ================================

What a backend lacks, and what happens then:

* cuML has no landmark spectral clustering; the landmarks (the expensive part, a k-means with
  ~1k centres over all points) run on the GPU, the spectral step over <= a few thousand
  landmarks runs on the host with scikit-learn. This is logged.
* A UMAP model pickled by one implementation can only be re-applied by the same
  implementation (a cuML UMAP needs cuML to unpickle), and cuML documents that its pickles need
  the cuML *version* that wrote them. ``apply`` refuses with a clear message otherwise; PCA /
  k-means / hierarchical / spectral models are plain arrays and apply anywhere.
* PCA component signs differ between libraries; both backends are post-processed with the same
  rule (the largest-magnitude loading of every component is positive, scikit-learn's
  ``svd_flip(u_based_decision=False)`` convention). The components then agree numerically
  (cuML: covariance eigendecomposition; scikit-learn picks its solver by shape), not bit for bit.
* cuML honours a process-wide output type over the estimator's ``output_type``; every cuML call
  here runs under ``cuml.using_output_type("numpy")`` so that results are numpy either way.
* cuML's UMAP is always seeded here (reproducible runs), which makes cuML use exact
  (brute-force) neighbours and a deterministic optimiser: slower than its unseeded mode.
"""

from __future__ import annotations

import importlib.util
import logging
import pickle
import sys
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Protocol

import numpy as np

from probing.analysis.errors import AnalysisError, BackendError

log = logging.getLogger("dvprobe.analysis")

BACKENDS = ("auto", "cuml", "sklearn", "dask", "dask-cuda")
#: backends whose row passes run on a Dask cluster
DASK_BACKENDS = ("dask", "dask-cuda")


@dataclass(frozen=True)
class PCAModel:
    """A fitted PCA as plain arrays: ``transform(x) = (x - mean) @ components.T``."""

    components: np.ndarray  # [k, d] float32, rows orthonormal, signs canonical
    mean: np.ndarray  # [d] float32
    explained_variance: np.ndarray  # [k] float64
    explained_variance_ratio: np.ndarray  # [k] float64


def canonical_signs(components: np.ndarray) -> np.ndarray:
    """Flip each component so its largest-|loading| entry is positive.

    PCA components are defined up to sign; fixing the sign makes runs comparable across
    backends and library versions (same rule as scikit-learn's ``svd_flip`` on ``Vt``).
    """
    comp = np.array(components, dtype=np.float32, copy=True)
    if comp.size == 0:
        return comp
    idx = np.argmax(np.abs(comp), axis=1)
    signs = np.sign(comp[np.arange(comp.shape[0]), idx])
    signs[signs == 0] = 1.0
    return comp * signs[:, None]


def import_umap() -> ModuleType:
    """Import umap-learn without letting it import TensorFlow.

    ``umap/__init__`` imports ``parametric_umap`` and therefore TensorFlow whenever TF is
    installed (it is, with the ``convert`` extra). That costs seconds and, with the pinned
    TF build, segfaults the interpreter on import. We never use ParametricUMAP, so TF is made
    unimportable for the duration of this import (unless the process already loaded it).
    """
    if "umap" in sys.modules and hasattr(sys.modules["umap"], "UMAP"):
        return sys.modules["umap"]
    if importlib.util.find_spec("umap") is None:
        raise BackendError("umap-learn is not installed (pip install umap-learn)")
    block = "tensorflow" not in sys.modules
    if block:
        sys.modules["tensorflow"] = None  # type: ignore[assignment]  # import -> ImportError
    try:
        import umap
    finally:
        if block and sys.modules.get("tensorflow", 0) is None:
            del sys.modules["tensorflow"]
    return umap


class Backend(Protocol):
    """What every backend provides. Inputs are float32 ``[n, d]`` numpy arrays."""

    name: str
    version: str  # "<library> <version>", recorded with every run

    def pca(self, x: np.ndarray, n_components: int, seed: int) -> PCAModel: ...

    def kmeans(self, x: np.ndarray, k: int, seed: int, n_init: int,
               max_iter: int = 300) -> np.ndarray: ...

    def umap_fit(self, x: np.ndarray, n_components: int, n_neighbors: int, min_dist: float,
                 seed: int) -> tuple[np.ndarray, bytes, str]: ...

    def umap_transform(self, blob: bytes, x: np.ndarray) -> np.ndarray: ...


class SklearnBackend:
    """CPU backend: scikit-learn for PCA / k-means, umap-learn for UMAP."""

    name = "sklearn"

    @property
    def version(self) -> str:
        import sklearn

        return f"scikit-learn {sklearn.__version__}"

    def pca(self, x: np.ndarray, n_components: int, seed: int) -> PCAModel:
        from sklearn.decomposition import PCA

        p = PCA(n_components=n_components, random_state=seed).fit(x)
        return PCAModel(canonical_signs(p.components_), p.mean_.astype(np.float32),
                        p.explained_variance_.astype(np.float64),
                        p.explained_variance_ratio_.astype(np.float64))

    def kmeans(self, x: np.ndarray, k: int, seed: int, n_init: int,
               max_iter: int = 300) -> np.ndarray:
        from sklearn.cluster import KMeans

        km = KMeans(n_clusters=k, n_init=n_init, random_state=seed, max_iter=max_iter).fit(x)
        return km.cluster_centers_.astype(np.float32)

    def umap_fit(self, x: np.ndarray, n_components: int, n_neighbors: int, min_dist: float,
                 seed: int) -> tuple[np.ndarray, bytes, str]:
        umap = import_umap()
        model = umap.UMAP(n_components=n_components, n_neighbors=n_neighbors,
                          min_dist=min_dist, random_state=seed)
        with warnings.catch_warnings():
            # "n_jobs overridden by setting random_state": expected, seeded runs are serial
            warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)
            emb = model.fit_transform(x)
        return (np.asarray(emb, dtype=np.float32), pickle.dumps(model, protocol=5),
                f"umap-learn {umap.__version__}")

    def umap_transform(self, blob: bytes, x: np.ndarray) -> np.ndarray:
        import_umap()  # the pickle references umap.umap_; import it the safe way first
        model = _unpickled(self, blob, pickle.loads)
        return np.asarray(model.transform(x), dtype=np.float32)


#: Rows per cuML UMAP ``transform`` call: cuML has failed on single calls of ~2M rows.
CUML_TRANSFORM_CHUNK = 250_000


class CumlBackend:
    """GPU backend on RAPIDS cuML; every result is converted back to numpy."""

    name = "cuml"

    def __init__(self) -> None:
        try:
            import cuml
        except Exception as exc:  # ImportError, or CUDA runtime errors raised at import
            raise BackendError(f"--backend cuml: cannot import cuml ({exc}); install "
                               "cuml-cu12 from NVIDIA's index or use --backend sklearn") from exc
        if not gpu_available():
            raise BackendError("--backend cuml: no CUDA GPU is visible; use --backend sklearn")
        self._cuml = cuml
        self.version = f"cuml {cuml.__version__}"

    def _numpy(self):
        """cuML's context that makes every result numpy, whatever the global setting."""
        return self._cuml.using_output_type("numpy")

    def pca(self, x: np.ndarray, n_components: int, seed: int) -> PCAModel:
        with self._numpy():
            p = self._cuml.PCA(n_components=n_components, svd_solver="full",
                               output_type="numpy").fit(x)
            ev = np.asarray(p.explained_variance_, dtype=np.float64)
            evr = np.asarray(p.explained_variance_ratio_, dtype=np.float64)
            return PCAModel(canonical_signs(np.asarray(p.components_)),
                            np.asarray(p.mean_, dtype=np.float32), ev, evr)

    def kmeans(self, x: np.ndarray, k: int, seed: int, n_init: int,
               max_iter: int = 300) -> np.ndarray:
        with self._numpy():
            km = self._cuml.KMeans(n_clusters=k, n_init=n_init, random_state=seed,
                                   max_iter=max_iter, init="scalable-k-means++",
                                   output_type="numpy").fit(x)
            return np.asarray(km.cluster_centers_, dtype=np.float32)

    def umap_fit(self, x: np.ndarray, n_components: int, n_neighbors: int, min_dist: float,
                 seed: int, build_algo: str | None = None) -> tuple[np.ndarray, bytes, str]:
        """``build_algo``: cuML's kNN graph builder ("nn_descent" for large fits; None =
        cuML's default)."""
        log.info("cuML UMAP seeded (random_state=%d): reproducible, with exact neighbours "
                 "(slower than cuML's unseeded mode)", seed)
        extra = {} if build_algo is None else {"build_algo": build_algo}
        with self._numpy():
            model = self._cuml.UMAP(n_components=n_components, n_neighbors=n_neighbors,
                                    min_dist=min_dist, random_state=seed, output_type="numpy",
                                    **extra)
            emb = np.asarray(model.fit_transform(x), dtype=np.float32)
        return emb, pickle.dumps(model, protocol=5), self.version

    def umap_transform(self, blob: bytes, x: np.ndarray) -> np.ndarray:
        try:
            model = _unpickled(self, blob, pickle.loads)
        except Exception as exc:  # a pickle of another cuML version, a missing class ...
            raise BackendError(f"cannot load this run's cuML UMAP with {self.version} "
                               f"({type(exc).__name__}: {exc}); refit it") from exc
        out = np.empty((len(x), int(getattr(model, "n_components", 2))), dtype=np.float32)
        with self._numpy():
            for s in range(0, len(x), CUML_TRANSFORM_CHUNK):
                part = x[s:s + CUML_TRANSFORM_CHUNK]
                out[s:s + len(part)] = np.asarray(model.transform(part), dtype=np.float32)
        return out


def _unpickled(backend, blob: bytes, loads):
    """The model pickled in ``blob``, unpickled once per backend for a run of chunked
    ``umap_transform`` calls with the same blob (the same object, sha256-checked by
    ``Run.file_bytes`` or just pickled by ``umap_fit``)."""
    cached = getattr(backend, "_umap_cache", None)
    if cached is not None and cached[0] is blob:
        return cached[1]
    model = loads(blob)  # noqa: S301 - see above
    backend._umap_cache = (blob, model)
    return model


def gpu_available() -> bool:
    """True when a CUDA device is visible (cupy first: cuML depends on it; torch as fallback)."""
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount()) > 0
    except Exception:
        pass
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def gpu_free_bytes() -> int | None:
    """Free memory of the current CUDA device (cupy, which cuML uses), or None."""
    try:
        import cupy

        return int(cupy.cuda.runtime.memGetInfo()[0])
    except Exception:
        return None


def cuml_usable() -> bool:
    """``import cuml`` works and a CUDA GPU is present."""
    if importlib.util.find_spec("cuml") is None:
        return False
    try:
        import cuml  # noqa: F401
    except Exception:
        return False
    return gpu_available()


def get_backend(name: str = "auto", scheduler: str | None = None) -> Backend:
    """Resolve ``auto|cuml|sklearn`` to an in-process backend and log which one runs (the
    Dask backends: :func:`probing.analysis.engines.get_engine`)."""
    if name not in BACKENDS:
        raise AnalysisError(f"--backend must be one of {', '.join(BACKENDS)}, not {name!r}")
    if name in DASK_BACKENDS:
        raise AnalysisError(f"--backend {name} runs on Dask: resolve it with "
                            "probing.analysis.engines.get_engine")
    if scheduler:
        raise AnalysisError(f"--scheduler is for --backend {' or '.join(DASK_BACKENDS)}, "
                            f"not {name}")
    if name == "auto":
        if cuml_usable():
            log.info("backend auto -> cuml (cuML importable, CUDA GPU present)")
            return CumlBackend()
        log.info("backend auto -> sklearn (no usable cuML + CUDA GPU)")
        return SklearnBackend()
    if name == "cuml":
        b = CumlBackend()
        log.info("backend cuml")
        return b
    log.info("backend sklearn")
    return SklearnBackend()


def umap_impl_compatible(impl: str, backend: Backend) -> bool:
    """A pickled UMAP can only be re-applied by the library that pickled it."""
    return impl.split(" ", 1)[0] == ("cuml" if backend.name in ("cuml", "dask-cuda")
                                     else "umap-learn")


def backend_for_umap(impl: str, preferred: Backend) -> Backend:
    """The backend able to transform with a stored UMAP of implementation ``impl``."""
    if impl.startswith("cuml"):
        if preferred.name in ("cuml", "dask-cuda"):
            chosen = preferred
        elif not cuml_usable():
            raise BackendError(f"this run's UMAP was fitted with {impl}; re-applying it needs "
                               "cuML on a CUDA GPU (or refit with --backend sklearn)")
        else:
            chosen = CumlBackend()
        have = getattr(chosen, "umap_impl", chosen.version)  # dask-cuda: its cuML's version
        if have != impl:  # cuML: "requires the same cuML version used for training"
            raise BackendError(f"this run's UMAP was fitted with {impl}, but {have} "
                               f"is installed; cuML loads only its own version's models: "
                               f"install {impl.replace(' ', '==')} or refit the run")
        return chosen
    if umap_impl_compatible(impl, preferred):
        return preferred
    return SklearnBackend()
