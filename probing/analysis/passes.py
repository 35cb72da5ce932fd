"""The passes over every row of a STORE, in this process or on Dask workers: one contract.

A run reads its rows in three kinds of pass (:mod:`probing.analysis.stream`): moments (the
streamed normaliser / PCA fit), labelling (features -> labels, a PCA run's coordinates) and
the UMAP ``transform``. :class:`LocalPasses` runs them here, chunk by chunk;
:class:`probing.analysis.dask_backend.DaskPasses` runs the same block functions below as
Dask tasks over ``store.layer(name, dask=True)``. Both return the same things (a
:class:`~probing.analysis.stream.Moments` per source, :class:`~probing.analysis.stream.RowOutputs`,
UMAP coordinates), so :mod:`probing.analysis.fit` and ``apply`` never know which ran.

Blocks are ``{layer: rows}``; block functions see only numpy arrays and picklable models
(a :class:`~probing.analysis.features.FeatureModel`, a prototype or hierarchy predictor),
never a STORE or a memory map, so they run unchanged on a worker. A block of a pass that
labels starts at a multiple of :data:`~probing.analysis.stream.ROW_CHUNK` and is cut into
the same chunks inside, so Dask labels are bit-identical to in-process ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

import numpy as np

from probing.analysis.stream import (
    ROW_CHUNK,
    Moments,
    Predict,
    RowOutputs,
    chunks,
    label_rows,
    read_rows,
    umap_rows,
)
from probing.store import Store

#: rows of a block -> what to accumulate (a layer's rows, normalised rows, features)
Make = Callable[[dict[str, np.ndarray]], np.ndarray]
#: ``(rows, seconds, rows_left)`` after the first UMAP call
OnFirst = Callable[[int, float, int], None]


class Passes(Protocol):
    """Where a run's row passes execute (:class:`LocalPasses`, ``DaskPasses``)."""

    def moments(self, store: Store, layers: list[str], rows: np.ndarray | None,
                make: dict[str, Make], products: bool = True) -> dict[str, Moments]: ...

    def label(self, store: Store, fm, predict: Predict | None,
              keep: int | None) -> RowOutputs: ...

    def umap(self, store: Store, fm, be, blob: bytes, n_components: int,
             fitted: tuple[np.ndarray, np.ndarray] | None,
             on_first: OnFirst | None = None) -> np.ndarray: ...


# -- block functions: what one chunk (here) or one task (on a worker) computes ---------------

def block_moments(blocks: dict[str, np.ndarray], make: dict[str, Make],
                  products: bool = True) -> dict[str, Moments]:
    """:class:`Moments` of what each ``make`` entry makes of the block, fed in
    :data:`ROW_CHUNK` chunks (as the in-process pass does)."""
    moms = {name: Moments() for name in make}
    n = len(next(iter(blocks.values())))
    for _, sel in chunks(n):
        part = {ly: np.asarray(b[sel], dtype=np.float32) for ly, b in blocks.items()}
        for name, f in make.items():
            moms[name].add(f(part), products=products)
    return moms


def merge_moments(a: dict[str, Moments], b: dict[str, Moments]) -> dict[str, Moments]:
    """``a`` + ``b`` as new objects (a retried task may see its inputs again)."""
    import copy

    out = copy.deepcopy(a)
    for name, m in b.items():
        out[name].merge(m)
    return out


def block_labels(blocks: dict[str, np.ndarray], fm, predict: Predict | None,
                 keep: int | None) -> RowOutputs:
    """Features and labels of a block of rows (the in-process labelling, on the block)."""
    n = len(next(iter(blocks.values())))
    return label_rows(n, lambda sel: fm.transform_blocks(
        {ly: read_rows(b, sel) for ly, b in blocks.items()}), predict, keep)


# -- in this process -------------------------------------------------------------------------

class LocalPasses:
    """Every pass in this process, one chunk at a time (memory bounded independent of N)."""

    name = "in-process"

    def __init__(self, chunk: int = ROW_CHUNK) -> None:
        self.chunk = chunk

    def moments(self, store: Store, layers: list[str], rows: np.ndarray | None,
                make: dict[str, Make], products: bool = True) -> dict[str, Moments]:
        mats = {ly: store.layer(ly) for ly in layers}
        moms = {name: Moments() for name in make}
        for _, sel in chunks(store.n, rows, self.chunk):
            blocks = {ly: read_rows(m, sel) for ly, m in mats.items()}
            for name, f in make.items():
                moms[name].add(f(blocks), products=products)
        return moms

    def label(self, store: Store, fm, predict: Predict | None,
              keep: int | None) -> RowOutputs:
        return label_rows(store.n, fm.reader(store), predict, keep, progress="label rows")

    def umap(self, store: Store, fm, be, blob: bytes, n_components: int,
             fitted: tuple[np.ndarray, np.ndarray] | None,
             on_first: OnFirst | None = None) -> np.ndarray:
        """``be``: the backend whose ``umap_transform`` reads ``blob``."""
        return umap_rows(store.n, fm.reader(store), lambda x: be.umap_transform(blob, x),
                         n_components, fitted, on_first=on_first, progress="UMAP transform")


def umap_backend_name(backend) -> str:
    """The in-process backend that transforms with a UMAP this backend fitted (a Dask
    backend fits in-process with umap-learn or cuML)."""
    return "cuml" if backend.name in ("cuml", "dask-cuda") else "sklearn"


@contextmanager
def open_passes(backend) -> Iterator[Passes]:
    """The backend's passes for one run: a Dask backend's client (its cluster started and
    closed around the run), otherwise :class:`LocalPasses`."""
    session = getattr(backend, "session", None)
    if session is None:
        yield LocalPasses()
        return
    with session() as passes:
        yield passes


def task_blocks(n: int, rows: int) -> list[slice]:
    """Row blocks of a labelling pass of about ``rows`` rows, each starting at a multiple
    of :data:`ROW_CHUNK` (so that the chunks inside are the in-process pass's)."""
    step = max(ROW_CHUNK, rows // ROW_CHUNK * ROW_CHUNK)
    return [slice(s, min(s + step, n)) for s in range(0, n, step)]
