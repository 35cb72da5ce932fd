"""``--backend dask-cuda``: :mod:`probing.analysis.dask_backend` on GPUs.

The cluster is a ``dask_cuda.LocalCUDACluster`` (one worker per visible GPU) or
``--scheduler ADDRESS``; k-means is ``cuml.dask.cluster.KMeans`` (multi-GPU, scalable
k-means++) on the fit sample spread over the workers; the UMAP is fitted with cuML on this
process's GPU (``build_algo="nn_descent"``: the approximate neighbour graph, as rapids-
singlecell does at this size) and every other row is transformed on the GPU workers with
the pickled cuML model, block by block (what ``cuml.dask.manifold.UMAP`` does, over the
STORE's row blocks); the moments and labels run on the workers as for ``--backend dask``.
Every result is numpy (``cuml.using_output_type("numpy")``), so the run is the same
contract as every other backend's.

Needs ``cuml-cu12`` and ``dask-cuda`` (NVIDIA's index; not installed by dvprobe's extras);
without them the backend refuses with their names.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from probing.analysis.backends import CumlBackend
from probing.analysis.dask_backend import DaskBackend, local_workers
from probing.analysis.errors import BackendError

log = logging.getLogger("dvprobe.analysis")

NEEDS = "cuml-cu12 and dask-cuda (pip install --extra-index-url=https://pypi.nvidia.com " \
        "cuml-cu12 dask-cuda), and a CUDA GPU"


def _import_gpu_stack():
    try:
        import cuml
        import cuml.dask.cluster
        import dask_cuda
    except Exception as exc:  # ImportError, or CUDA runtime errors raised at import
        raise BackendError(f"--backend dask-cuda needs {NEEDS}: cannot import "
                           f"{getattr(exc, 'name', None) or exc}; use --backend dask on "
                           "the CPU") from exc
    return cuml, dask_cuda


class DaskCudaBackend(DaskBackend):
    """``cuml.dask`` k-means and cuML's UMAP; the row passes as for ``--backend dask``."""

    name = "dask-cuda"

    def __init__(self, scheduler: str | None = None) -> None:
        self._cuml, self._dask_cuda = _import_gpu_stack()
        super().__init__(scheduler)
        self._gpu = CumlBackend()  # checks that a GPU is visible here, for the UMAP fit
        self.umap_impl = self._gpu.version
        self.version = (f"{self.version.split(', k-means')[0]}, cuml.dask "
                        f"{self._cuml.__version__}, dask-cuda {self._dask_cuda.__version__}")

    def _kmeans_version(self) -> str:
        return "cuml.dask"

    @contextmanager
    def cluster(self) -> Iterator:
        if self.scheduler:
            with super().cluster() as client:
                yield client
            return
        import distributed

        log.info("dask-cuda: starting a LocalCUDACluster (one worker per visible GPU)")
        with self._dask_cuda.LocalCUDACluster(threads_per_worker=1,
                                              dashboard_address=None) as lc, \
                distributed.Client(lc) as client:
            yield client

    def pca(self, x: np.ndarray, n_components: int, seed: int):
        return self._gpu.pca(x, n_components, seed)

    def kmeans(self, x: np.ndarray, k: int, seed: int, n_init: int,
               max_iter: int = 300) -> np.ndarray:
        """``cuml.dask.cluster.KMeans`` on the fit sample, one partition per worker."""
        import dask.array as da

        workers = max(1, len(self._client.scheduler_info().get("workers", {}))) \
            if self._client is not None else local_workers()
        x = np.ascontiguousarray(x, dtype=np.float32)
        xa = da.from_array(x, chunks=(max(1, -(-len(x) // workers)), x.shape[1]))
        with self._cuml.using_output_type("numpy"):
            km = self._cuml.dask.cluster.KMeans(client=self._client, n_clusters=k,
                                                random_state=seed, max_iter=max_iter,
                                                n_init=n_init, init="scalable-k-means++",
                                                output_type="numpy").fit(xa)
            return np.asarray(km.cluster_centers_, dtype=np.float32)

    def umap_fit(self, x: np.ndarray, n_components: int, n_neighbors: int, min_dist: float,
                 seed: int) -> tuple[np.ndarray, bytes, str]:
        return self._gpu.umap_fit(x, n_components, n_neighbors, min_dist, seed,
                                  build_algo="nn_descent")

    def umap_transform(self, blob: bytes, x: np.ndarray) -> np.ndarray:
        return self._gpu.umap_transform(blob, x)
