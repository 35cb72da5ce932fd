"""The cuML backend's glue, run on a CPU against a strict stand-in for ``cuml``.

No GPU or cuML is available where these tests run, so the stand-in copies what cuML documents
and what the glue depends on: keyword-only estimators with cuML's parameter names, solver and
init names it accepts, results that are *not* numpy unless numpy output is in force (cupy
refuses ``np.asarray``), a process-wide output type that beats the estimator's, and a version
string. It cannot tell whether cuML's numbers, speed or GPU memory behave: that needs a GPU.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import types

import numpy as np
import pytest
from test_analysis_support import blobs, make_store

from probing import analysis as pa
from probing.analysis import backends
from probing.analysis.errors import BackendError

VERSION = "25.10.00"
_GLOBAL = {"output_type": None}  # cuml.set_global_output_type / using_output_type


class _Device:
    """Like a cupy array: np.asarray() on it raises."""

    def __init__(self, a):
        self._a = a

    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed")


class _Estimator:
    def __init__(self, output_type=None):
        self.output_type = output_type

    def _out(self, a):
        wanted = _GLOBAL["output_type"] or self.output_type  # the global setting wins
        return np.asarray(a) if wanted == "numpy" else _Device(a)


class PCA(_Estimator):
    def __init__(self, *, n_components=None, svd_solver="auto", output_type=None, **kw):
        if svd_solver not in ("auto", "full", "jacobi"):
            raise ValueError(f"svd_solver {svd_solver!r}")
        super().__init__(output_type)
        self.n_components = n_components

    def fit(self, x, y=None):
        from sklearn.decomposition import PCA as SkPCA

        p = SkPCA(self.n_components, svd_solver="covariance_eigh").fit(x)
        signs = np.where(np.arange(p.components_.shape[0]) % 2, -1.0, 1.0)  # arbitrary
        self._c = (p.components_ * signs[:, None]).astype(np.float32)
        self._m, self._ev, self._evr = p.mean_, p.explained_variance_, p.explained_variance_ratio_
        return self

    components_ = property(lambda s: s._out(s._c))
    mean_ = property(lambda s: s._out(s._m))
    explained_variance_ = property(lambda s: s._out(s._ev.astype(np.float32)))
    explained_variance_ratio_ = property(lambda s: s._out(s._evr.astype(np.float32)))


class KMeans(_Estimator):
    def __init__(self, *, n_clusters=8, max_iter=300, random_state=None,
                 init="scalable-k-means++", n_init="auto", output_type=None, **kw):
        if init not in ("scalable-k-means++", "k-means||", "random"):
            raise ValueError(f"init {init!r}")
        super().__init__(output_type)
        self.k, self.n_init, self.seed, self.max_iter = n_clusters, n_init, random_state, max_iter

    def fit(self, x, y=None):
        from sklearn.cluster import KMeans as SkKMeans

        self._c = SkKMeans(self.k, n_init=self.n_init, random_state=self.seed,
                           max_iter=self.max_iter).fit(x).cluster_centers_
        return self

    cluster_centers_ = property(lambda s: s._out(s._c))


class UMAP(_Estimator):
    """A linear stand-in (fast, deterministic): what matters here is the glue around it."""

    calls: list[int] = []

    def __init__(self, *, n_neighbors=15, n_components=2, min_dist=0.1, random_state=None,
                 output_type=None, **kw):
        super().__init__(output_type)
        self.n_components = n_components

    def fit_transform(self, x, y=None):
        self._mean = x.mean(0)
        self._basis = np.linalg.svd(x - self._mean, full_matrices=False)[2][: self.n_components]
        return self._out((x - self._mean) @ self._basis.T)

    def transform(self, x):
        UMAP.calls.append(len(x))
        return self._out((x - self._mean) @ self._basis.T)


@pytest.fixture
def cuml(monkeypatch):
    module = types.ModuleType("cuml")
    module.PCA, module.KMeans, module.UMAP, module.__version__ = PCA, KMeans, UMAP, VERSION

    @contextlib.contextmanager
    def using_output_type(kind):
        before, _GLOBAL["output_type"] = _GLOBAL["output_type"], kind
        try:
            yield
        finally:
            _GLOBAL["output_type"] = before

    module.using_output_type = using_output_type
    monkeypatch.setitem(sys.modules, "cuml", module)
    monkeypatch.setattr(backends, "gpu_available", lambda: True)
    monkeypatch.setattr(backends, "gpu_free_bytes", lambda: None)
    monkeypatch.setitem(_GLOBAL, "output_type", "cupy")  # a user's set_global_output_type
    UMAP.calls.clear()
    return module


def test_every_result_is_numpy_whatever_the_global_output_type(cuml):
    be = backends.get_backend("cuml")
    x = np.random.default_rng(1).normal(size=(300, 12)).astype(np.float32)
    p, ref = be.pca(x, 5, 0), backends.SklearnBackend().pca(x, 5, 0)
    assert p.components.dtype == np.float32 and p.explained_variance.dtype == np.float64
    np.testing.assert_allclose(p.components, ref.components, atol=1e-4)  # same sign rule
    centers = be.kmeans(x, 4, 0, 3)
    assert isinstance(centers, np.ndarray) and centers.shape == (4, 12)
    emb, blob, impl = be.umap_fit(x, 2, 10, 0.1, 0)
    assert isinstance(emb, np.ndarray) and emb.shape == (300, 2)
    assert impl == f"cuml {VERSION}" == be.version


def test_umap_transform_runs_in_chunks(cuml, monkeypatch):
    monkeypatch.setattr(backends, "CUML_TRANSFORM_CHUNK", 50)
    be = backends.get_backend("cuml")
    x = np.random.default_rng(2).normal(size=(120, 6)).astype(np.float32)
    emb, blob, _ = be.umap_fit(x, 2, 10, 0.1, 0)
    np.testing.assert_allclose(be.umap_transform(blob, x), emb, rtol=1e-5, atol=1e-5)
    assert UMAP.calls == [50, 50, 20]


def test_a_umap_of_another_cuml_version_is_refused_with_what_to_do(cuml):
    be = backends.get_backend("cuml")
    assert backends.backend_for_umap(f"cuml {VERSION}", be) is be
    with pytest.raises(BackendError, match=r"fitted with cuml 24\.12\.00, but cuml 25\.10\.00 "
                                           r"is installed.*install cuml==24\.12\.00"):
        backends.backend_for_umap("cuml 24.12.00", be)
    with pytest.raises(BackendError, match="cannot load this run's cuML UMAP"):
        be.umap_transform(b"not a pickle", np.zeros((2, 3), np.float32))


def test_fit_and_apply_through_the_api_on_the_cuml_backend(cuml, tmp_path, caplog):
    x, y = blobs(200, 16, 3, seed=0)
    store = make_store(tmp_path / "s", {"mixed5": x}, {"truth": y})
    with caplog.at_level(logging.INFO, logger="dvprobe.analysis"):
        r = pa.kmeans(store, "mixed5", k=3, pca=8, umap=True, backend="cuml", run="km")
    assert "cuML UMAP seeded" in caplog.text
    assert r.meta["backend"] == "cuml" and r.meta["backend_version"] == f"cuml {VERSION}"
    applied = pa.apply(store, "km", store, backend="cuml", name="again")
    np.testing.assert_array_equal(applied.run.obs["cluster"], r.obs["cluster"])
    np.testing.assert_allclose(applied.run.arrays["umap"], r.arrays["umap"], atol=1e-4)
