"""Every row through fitted models in fixed chunks, with memory bounded independent of N.

Two things here, both over row chunks of a STORE layer (``store.layer(name)[sel]``, with
``sel`` a slice or sorted row indices: the only access a memory map, a parted STORE or a
Dask array all give):

* :class:`Moments`: streamed column means and covariance (float64 accumulators, ``d x d``).
  Normalisation and PCA are fitted from them (:mod:`normalize`, :mod:`reduce`): an exact PCA
  (the covariance's eigenvectors) that never holds the rows, where a PCA on a matrix held a
  normalised copy and a centred copy of it.
* :func:`label_rows` and :func:`umap_rows`: the pass that labels every row once the models
  are fitted. Its results (:class:`RowOutputs`) are the contract a backend fills: obs
  columns and arrays, one row per STORE row, whichever backend computed them.

Chunk boundaries are fixed (:data:`ROW_CHUNK`, :data:`UMAP_CHUNK`), so labelling the same
rows again (``apply`` to the training STORE) gives bit-identical results.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

ROW_CHUNK = 16384
#: rows per UMAP ``transform`` call. umap-learn runs 100 optimisation epochs for a call of
#: at most 10,000 rows and 30 above, so every call here has more than 10,000 rows (the tail
#: joins the previous call) and all rows are embedded alike.
UMAP_CHUNK = 50_000
UMAP_SMALL_CALL = 10_000


def chunks(n: int, rows: np.ndarray | None = None, size: int = ROW_CHUNK
           ) -> Iterator[tuple[slice, slice | np.ndarray]]:
    """``(out, sel)`` per chunk: ``out`` the positions in the output, ``sel`` the STORE rows
    (a slice of ``0..n-1``, or a piece of the sorted indices ``rows``)."""
    total = n if rows is None else len(rows)
    for s in range(0, total, size):
        e = min(s + size, total)
        yield slice(s, e), (slice(s, e) if rows is None else rows[s:e])


def read_rows(layer, sel: slice | np.ndarray) -> np.ndarray:
    """One chunk of a layer as float32 (the only copy a chunk makes of the layer)."""
    return np.asarray(layer[sel], dtype=np.float32)


class Moments:
    """Column sums and cross-products of rows fed in chunks; :attr:`mean`, :meth:`cov`.

    Rows are shifted by the first chunk's mean before the products (a cheap guard against
    cancellation when means are large next to spreads), and the products run in float64:
    about twice the time of float32, but the result no longer depends on how the rows were
    cut into chunks (or partitions, for a distributed backend) beyond rounding at 1e-12.
    """

    def __init__(self) -> None:
        self.n = 0
        self._shift: np.ndarray | None = None
        self._sum: np.ndarray | None = None
        self._sq: np.ndarray | None = None
        self._cross: np.ndarray | None = None

    def add(self, x: np.ndarray, products: bool = True) -> None:
        """Add rows ``x`` ``[b, d]``; ``products=False`` keeps sums and squares only (what a
        standardiser needs), not the ``d x d`` cross-products."""
        x = np.asarray(x, dtype=np.float32)
        if not len(x):
            return
        if self._shift is None:
            d = x.shape[1]
            self._shift = x.mean(axis=0, dtype=np.float64)
            self._sum, self._sq = np.zeros(d), np.zeros(d)
            if products:
                self._cross = np.zeros((d, d))
        xc = x - self._shift
        self.n += len(x)
        self._sum += xc.sum(axis=0)
        self._sq += np.einsum("ij,ij->j", xc, xc)
        if self._cross is not None:
            self._cross += xc.T @ xc

    def merge(self, other: Moments) -> Moments:
        """Add the rows ``other`` saw (moments of another partition, e.g. from a Dask
        worker): its sums are moved to this shift exactly (``x - a = (x - b) + (b - a)``),
        so the merged moments equal those of one pass over both up to float64 rounding."""
        if other.n == 0:
            return self
        if self.n == 0:
            self.n, self._shift = other.n, other._shift.copy()
            self._sum, self._sq = other._sum.copy(), other._sq.copy()
            self._cross = None if other._cross is None else other._cross.copy()
            return self
        delta = other._shift - self._shift
        self._cross = _merged_cross(self._cross, other, delta)
        self._sq += other._sq + 2 * delta * other._sum + other.n * delta * delta
        self._sum += other._sum + other.n * delta
        self.n += other.n
        return self

    @property
    def mean(self) -> np.ndarray:
        return self._shift + self._sum / self.n

    def var(self, ddof: int = 0) -> np.ndarray:
        m = self._sum / self.n
        return np.maximum(self._sq - self.n * m * m, 0) / max(self.n - ddof, 1)

    def cov(self, ddof: int = 1) -> np.ndarray:
        m = self._sum / self.n
        c = (self._cross - self.n * np.outer(m, m)) / max(self.n - ddof, 1)
        return (c + c.T) / 2


def _merged_cross(mine: np.ndarray | None, other: Moments, delta: np.ndarray
                  ) -> np.ndarray | None:
    """``other``'s cross-products moved by ``delta`` and added to ``mine`` (None when
    either side kept no cross-products)."""
    if mine is None or other._cross is None:
        return None
    shift = np.outer(delta, other._sum)
    return mine + other._cross + shift + shift.T + other.n * np.outer(delta, delta)


@dataclass
class RowOutputs:
    """What labelling every row yields, one row per STORE row: the contract every backend
    fills. ``columns``: obs columns (``cluster``, ``level1``, ``level2``, ``node``);
    ``arrays``: run arrays (``pca`` for a PCA run, ``umap``)."""

    columns: dict[str, np.ndarray] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


#: feature rows -> obs columns for them (a fitted clusterer's ``predict``)
Predict = Callable[[np.ndarray], dict[str, np.ndarray]]


def label_rows(n: int, features: Callable[[slice | np.ndarray], np.ndarray],
               predict: Predict | None, keep_features: int | None, *,
               chunk: int = ROW_CHUNK, progress: str | None = None) -> RowOutputs:
    """Features of every row, one chunk at a time, through ``predict``; the features are
    kept (``arrays["pca"]``) only when ``keep_features`` gives their width."""
    from tqdm.auto import tqdm

    out = RowOutputs()
    if keep_features:
        out.arrays["pca"] = np.empty((n, keep_features), dtype=np.float32)
    with tqdm(total=n, unit="row", desc=progress, disable=True if progress is None else None,
              leave=False) as bar:
        for where, sel in chunks(n, None, chunk):
            f = features(sel)
            if keep_features:
                out.arrays["pca"][where] = f
            if predict is not None:
                for name, values in predict(f).items():
                    if name not in out.columns:
                        out.columns[name] = np.empty(n, dtype=values.dtype)
                    out.columns[name][where] = values
            bar.update(len(f))
    return out


def umap_chunks(rows: np.ndarray, size: int = UMAP_CHUNK) -> list[np.ndarray]:
    """``rows`` cut into UMAP calls of ``size`` rows; a tail of at most
    :data:`UMAP_SMALL_CALL` rows joins the call before it (see :data:`UMAP_CHUNK`)."""
    parts = [rows[s:s + size] for s in range(0, len(rows), size)]
    if len(parts) > 1 and len(parts[-1]) <= UMAP_SMALL_CALL:
        parts[-2:] = [np.concatenate(parts[-2:])]
    return parts


def umap_rows(n: int, features: Callable[[slice | np.ndarray], np.ndarray],
              transform: Callable[[np.ndarray], np.ndarray], n_components: int,
              fitted: tuple[np.ndarray, np.ndarray] | None = None, *,
              size: int = UMAP_CHUNK, on_first: Callable[[int, float, int], None] | None = None,
              progress: str | None = None) -> np.ndarray:
    """UMAP coordinates ``[n, n_components]`` of every row: ``fitted`` = (rows, embedding)
    of the rows the UMAP was fitted on, the others transformed in calls of ``size`` rows.
    ``on_first(rows, seconds, rows_left)`` hears how long the first call took."""
    import time

    from tqdm.auto import tqdm

    emb = np.empty((n, n_components), dtype=np.float32)
    todo = np.arange(n)
    if fitted is not None:
        emb[fitted[0]] = fitted[1]
        todo = np.setdiff1d(todo, fitted[0], assume_unique=True)
    with tqdm(total=len(todo), unit="row", desc=progress, disable=True if progress is None else None,
              leave=False) as bar:
        for i, part in enumerate(umap_chunks(todo, size)):
            t = time.perf_counter()
            emb[part] = transform(features(part))
            if i == 0 and on_first is not None:
                on_first(len(part), time.perf_counter() - t, len(todo) - len(part))
            bar.update(len(part))
    return emb
