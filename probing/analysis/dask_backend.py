"""``--backend dask``: the row passes on a Dask cluster, the fits on the fit sample.

What runs where (``--backend dask``, CPU):

================  ==========================================================================
stage             where
================  ==========================================================================
normaliser, PCA   :class:`~probing.analysis.stream.Moments` per block of rows on the workers,
                  merged pairwise in a fixed tree (``d x d`` each): the exact streamed PCA
k-means           the fit sample in this process with FAISS (:data:`KMEANS_ENGINE`; dask-ml's
                  ``KMeans`` on the cluster is the other engine, measured slower:
                  ``bench/bench_scale.py --kmeans-engines``, docs/performance.md)
labels, coords    one task per block of rows over ``store.layer(name, dask=True)`` (workers
                  open the layer files by path), results put back by their row range
UMAP              fitted on its sample here (umap-learn); the model goes to the workers once
                  (scattered) and every other row is transformed there, block by block
================  ==========================================================================

The cluster: ``--scheduler ADDRESS`` uses a running one (it must see the STORE at the same
path); without it a ``LocalCluster`` of one single-threaded worker process per core is
started for the run and closed after it. ``--backend dask-cuda``
(:mod:`probing.analysis.dask_cuda`) is the same on a ``dask_cuda.LocalCUDACluster`` with
``cuml.dask`` k-means and cuML's UMAP.

Faults: a worker that dies mid-task has its task rerun elsewhere (distributed's
``distributed.scheduler.allowed-failures``, 3 by default); past that the run stops with
one line saying so (:class:`~probing.analysis.errors.BackendError`), before anything is
saved, so no half run is written. Ctrl-C cancels the run's tasks and closes the cluster.
"""

from __future__ import annotations

import itertools
import logging
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np

from probing.analysis.backends import PCAModel, SklearnBackend
from probing.analysis.errors import BackendError
from probing.analysis.passes import (
    Make,
    OnFirst,
    block_labels,
    block_moments,
    merge_moments,
    task_blocks,
    umap_backend_name,
)
from probing.analysis.stream import ROW_CHUNK, Moments, Predict, RowOutputs, umap_chunks
from probing.store import Store

log = logging.getLogger("dvprobe.analysis")

#: rows per task of a pass (two label chunks: ~370 MB of float32 for mixed5 + mixed10)
TASK_ROWS = 2 * ROW_CHUNK
#: k-means engine of ``--backend dask``: "faiss" (measured faster, docs/performance.md) or
#: "dask-ml"
KMEANS_ENGINE = "faiss"
KMEANS_ENGINES = ("faiss", "dask-ml")
#: the LocalCluster's workers are processes (numpy, FAISS and umap-learn hold the GIL in
#: places; a crashing worker takes only itself down)
LOCAL_PROCESSES = True
#: how long to wait for ``--scheduler``
CONNECT_TIMEOUT = "10s"
#: FAISS k-means runs a fixed number of iterations (it has no tolerance): FAISS's default
#: of 25 Lloyd steps per restart (scikit-learn stops at convergence, often sooner)
FAISS_NITER = 25
#: FAISS's OpenMP threads: 1. On a loaded machine OpenMP threads spin (measured: 2 threads
#: 391 s, 1 thread 21 s for the same fit on 2 busy cores); a fit sample is bounded (200,000
#: rows by default), so one thread fits it in seconds anyway
FAISS_THREADS = 1


def _import_distributed():
    try:
        import dask
        import distributed
    except ImportError as exc:
        raise BackendError(f"--backend dask needs dask and distributed ({exc}); pip install "
                           "'dask[array]' distributed") from exc
    return dask, distributed


def local_workers() -> int:
    """One worker per core this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


class DaskBackend:
    """The fits of the ``sklearn`` backend (FAISS for k-means), the passes on Dask."""

    name = "dask"

    def __init__(self, scheduler: str | None = None, kmeans: str = KMEANS_ENGINE) -> None:
        dask, distributed = _import_distributed()
        if kmeans not in KMEANS_ENGINES:
            raise BackendError(f"dask k-means engine must be one of {KMEANS_ENGINES}, "
                               f"not {kmeans!r}")
        self.scheduler, self.kmeans_engine = scheduler, kmeans
        self._client = None
        self._local = SklearnBackend()
        self.version = f"dask {dask.__version__} (distributed {distributed.__version__}), " \
                       f"k-means {self._kmeans_version()}"

    def _kmeans_version(self) -> str:
        if self.kmeans_engine == "faiss":
            return f"faiss {_faiss().__version__}"
        import dask_ml

        return f"dask-ml {dask_ml.__version__}"

    @contextmanager
    def cluster(self) -> Iterator:
        """A client on ``scheduler``, or on a LocalCluster started (and closed) here."""
        _, distributed = _import_distributed()
        if self.scheduler:
            try:
                client = distributed.Client(self.scheduler, timeout=CONNECT_TIMEOUT)
            except OSError as exc:
                raise BackendError(f"--scheduler {self.scheduler}: cannot connect ({exc})") \
                    from None
            with client:
                log.info("dask: scheduler %s, %d workers", self.scheduler,
                         len(client.scheduler_info().get("workers", {})))
                yield client
            return
        n = local_workers()
        log.info("dask: starting a LocalCluster of %d workers (1 thread each)", n)
        with distributed.LocalCluster(n_workers=n, threads_per_worker=1,
                                      processes=LOCAL_PROCESSES,
                                      dashboard_address=None) as lc, \
                distributed.Client(lc) as client:
            yield client

    @contextmanager
    def session(self) -> Iterator[DaskPasses]:
        """The run's passes on the cluster (see :func:`probing.analysis.passes.open_passes`)."""
        with self.cluster() as client:
            self._client = client
            try:
                yield DaskPasses(client)
            finally:
                self._client = None

    # -- fits on the fit sample (in this process, or dask-ml on the cluster) ---------------
    def pca(self, x: np.ndarray, n_components: int, seed: int) -> PCAModel:
        return self._local.pca(x, n_components, seed)

    def kmeans(self, x: np.ndarray, k: int, seed: int, n_init: int,
               max_iter: int = 300) -> np.ndarray:
        if self.kmeans_engine == "faiss":
            return faiss_kmeans(x, k, seed, n_init, max_iter)
        return dask_ml_kmeans(x, k, seed, max_iter)

    def umap_fit(self, x: np.ndarray, n_components: int, n_neighbors: int, min_dist: float,
                 seed: int) -> tuple[np.ndarray, bytes, str]:
        return self._local.umap_fit(x, n_components, n_neighbors, min_dist, seed)

    def umap_transform(self, blob: bytes, x: np.ndarray) -> np.ndarray:
        return self._local.umap_transform(blob, x)


def _faiss():
    try:
        import faiss
    except ImportError as exc:
        raise BackendError("--backend dask k-means needs faiss-cpu (pip install faiss-cpu, "
                           "the 'scale' extra)") from exc
    return faiss


def faiss_kmeans(x: np.ndarray, k: int, seed: int, n_init: int, max_iter: int,
                 threads: int | None = None) -> np.ndarray:
    """FAISS k-means on every row of ``x`` (FAISS would subsample to 256 rows per centre):
    ``n_init`` restarts from k-means++ seeds (scikit-learn's; FAISS's own init is random
    rows, which on planted clusters ends in worse optima), at most :data:`FAISS_NITER` Lloyd
    steps each, the lowest inertia kept; ``threads``: FAISS's (default
    :data:`FAISS_THREADS`)."""
    faiss = _faiss()
    x = np.ascontiguousarray(x, dtype=np.float32)
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads or FAISS_THREADS)
    try:
        return _best_of(faiss, x, k, seed, n_init, max_iter)
    finally:
        faiss.omp_set_num_threads(before)


def _best_of(faiss, x: np.ndarray, k: int, seed: int, n_init: int, max_iter: int
             ) -> np.ndarray:
    from sklearn.cluster import kmeans_plusplus

    best, best_obj = None, np.inf
    for i in range(max(1, n_init)):
        init, _ = kmeans_plusplus(x, k, random_state=seed + i)
        km = faiss.Kmeans(x.shape[1], k, niter=min(max_iter, FAISS_NITER), seed=seed + i,
                          max_points_per_centroid=max(1, -(-len(x) // k)), verbose=False)
        km.train(x, init_centroids=np.ascontiguousarray(init, dtype=np.float32))
        if km.obj[-1] < best_obj:
            best, best_obj = np.array(km.centroids, dtype=np.float32), km.obj[-1]
    return best.reshape(k, x.shape[1])


def dask_ml_kmeans(x: np.ndarray, k: int, seed: int, max_iter: int) -> np.ndarray:
    """dask-ml's k-means (``k-means||`` init, one run) on the fit sample spread over the
    current client's workers."""
    import dask.array as da
    from dask_ml.cluster import KMeans

    xa = da.from_array(np.ascontiguousarray(x, dtype=np.float32),
                       chunks=(max(1, -(-len(x) // (2 * local_workers()))), x.shape[1]))
    xa = xa.persist()  # on the workers once, not re-sent with every iteration's graph
    km = KMeans(n_clusters=k, random_state=seed, max_iter=max_iter).fit(xa)
    return np.asarray(km.cluster_centers_, dtype=np.float32)


class DaskPasses:
    """The row passes of :mod:`probing.analysis.passes` as tasks on a Dask client."""

    name = "dask"

    def __init__(self, client) -> None:
        self.client = client
        self._run = uuid.uuid4().hex[:8]
        self._passes = itertools.count()
        self._layers: dict = {}

    def _keys(self, what: str) -> Callable[[int | str], str]:
        """Task names for one pass over the rows. Every pass gets its own: Dask hands back a
        finished task's result to any task of the same name, so a standardiser's moments
        (no cross-products) came back to the PCA pass after it when names were per run."""
        tag = f"dvprobe-{what}-{self._run}-{next(self._passes)}"
        return lambda i: f"{tag}-{i}"

    def _blocks(self, store: Store, layers: list[str], sel) -> dict:
        """Rows ``sel`` of each layer as dask arrays (read on the worker, by file path)."""
        for ly in layers:
            if (store.path, ly) not in self._layers:
                self._layers[store.path, ly] = store.layer(ly, dask=True)
        return {ly: self._layers[store.path, ly][sel] for ly in layers}

    def moments(self, store: Store, layers: list[str], rows: np.ndarray | None,
                make: dict[str, Make], products: bool = True) -> dict[str, Moments]:
        import dask

        total = store.n if rows is None else len(rows)
        key = self._keys("moments")
        parts = []
        for i, s in enumerate(range(0, total, TASK_ROWS)):
            sel = slice(s, min(s + TASK_ROWS, total)) if rows is None else rows[s:s + TASK_ROWS]
            parts.append(dask.delayed(block_moments)(self._blocks(store, layers, sel), make,
                                                     products, dask_key_name=key(i)))
        level = 0
        while len(parts) > 1:  # a fixed pairwise tree: the same sums whatever finishes first
            level += 1
            parts = [dask.delayed(merge_moments)(*parts[j:j + 2], dask_key_name=key(
                f"merge{level}-{j}")) if j + 1 < len(parts) else parts[j]
                for j in range(0, len(parts), 2)]
        (moms,) = self._results({0: parts[0]}, "moments", total).values()
        return moms

    def label(self, store: Store, fm, predict: Predict | None,
              keep: int | None) -> RowOutputs:
        import dask

        n = store.n
        key = self._keys("label")
        tasks = {}
        for i, block in enumerate(task_blocks(n, TASK_ROWS)):
            tasks[block.start] = dask.delayed(block_labels)(
                self._blocks(store, fm.layers, block), fm, predict, keep,
                dask_key_name=key(i))
        out = RowOutputs()
        for s, part in self._results(tasks, "label rows", n).items():
            where = slice(s, s + _rows_of(part))
            for name, values in part.arrays.items():
                out.arrays.setdefault(name, np.empty((n, *values.shape[1:]), values.dtype))
                out.arrays[name][where] = values
            for name, values in part.columns.items():
                out.columns.setdefault(name, np.empty(n, values.dtype))
                out.columns[name][where] = values
        return out

    def umap(self, store: Store, fm, be, blob: bytes, n_components: int,
             fitted: tuple[np.ndarray, np.ndarray] | None,
             on_first: OnFirst | None = None) -> np.ndarray:
        import dask

        emb = np.empty((store.n, n_components), dtype=np.float32)
        todo = np.arange(store.n)
        if fitted is not None:
            emb[fitted[0]] = fitted[1]
            todo = np.setdiff1d(todo, fitted[0], assume_unique=True)
        model = self.client.scatter(blob, broadcast=True, hash=True)
        parts = umap_chunks(todo)
        name = umap_backend_name(be)
        key = self._keys("umap")
        tasks = {i: dask.delayed(umap_block)(self._blocks(store, fm.layers, part), fm, name,
                                             model, dask_key_name=key(i))
                 for i, part in enumerate(parts)}
        for i, coords in self._results(tasks, "UMAP transform", len(todo)).items():
            emb[parts[i]] = coords  # by the rows of call i, not by arrival order
        return emb

    def _results(self, tasks: dict, what: str, rows: int) -> dict:
        """Compute ``tasks`` (id -> delayed) on the cluster; results by id. A worker lost
        too often, or Ctrl-C, cancels the rest; nothing is returned half done."""
        from distributed import as_completed
        from tqdm.auto import tqdm

        futures = dict(zip(self.client.compute(list(tasks.values())), tasks, strict=True))
        done: dict = {}
        try:
            with tqdm(total=len(futures), unit="task", desc=f"{what} [dask]",
                      leave=False) as bar:
                for fut in as_completed(futures):
                    done[futures[fut]] = fut.result()
                    bar.update(1)
        except BaseException as exc:
            self.client.cancel(list(futures))
            _explain(exc, what)
            raise
        return {k: done[k] for k in tasks}


def _rows_of(part: RowOutputs) -> int:
    for values in (*part.columns.values(), *part.arrays.values()):
        return len(values)
    return 0


def _explain(exc: BaseException, what: str) -> None:
    """Raise a one-line :class:`BackendError` for a worker the scheduler gave up on."""
    from distributed import KilledWorker

    if isinstance(exc, KilledWorker):
        import dask

        tries = dask.config.get("distributed.scheduler.allowed-failures")
        raise BackendError(f"--backend dask: a worker died running {what} and its task "
                           f"failed on {tries + 1} workers (distributed.scheduler."
                           "allowed-failures); no run was written") from None


#: the UMAP model last unpickled on this worker: (blob, backend)
_WORKER_UMAP: dict = {}


def umap_block(blocks: dict[str, np.ndarray], fm, backend_name: str, blob: bytes
               ) -> np.ndarray:
    """UMAP coordinates of a block of rows on a worker; the model is unpickled once per
    worker (by the backend's cache) and reused for every block."""
    from probing.analysis.backends import get_backend

    be = _WORKER_UMAP.get(backend_name)
    if be is None:
        be = _WORKER_UMAP[backend_name] = get_backend(backend_name)
    return be.umap_transform(blob, fm.transform_blocks(
        {ly: np.asarray(b, dtype=np.float32) for ly, b in blocks.items()}))
