"""Flat clusterers as *prototype models*: k-means and landmark spectral clustering.

Every flat model here is a set of prototypes ``[m, d]`` with a label each; a point's cluster is
the label of its nearest prototype. For k-means the prototypes are the k centres (labels
0..k-1); for spectral clustering they are m landmarks (m ~ 1000 >> k) labelled by spectral
clustering of the landmark kNN graph. One representation gives one ``predict`` for fitting,
for hierarchical levels and for ``apply`` to another STORE, and it persists as plain arrays.

Why landmarks for spectral: exact spectral clustering needs an n x n affinity (80 GB at
n = 100k in float64) or an eigensolve over a 100k-node graph. Following landmark-based
spectral clustering (Chen & Cai, AAAI 2011), k-means picks m representative points, the
spectral step runs on their kNN graph (m x n_neighbors non-zeros, sparse), and each point
inherits the label of its nearest landmark. Landmarks from k-means (not random rows) keep
small, distinct groups (e.g. a few dozen mosaic-like examples) represented.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from probing.analysis.backends import Backend
from probing.analysis.errors import AnalysisError

log = logging.getLogger("dvprobe.analysis")

CHUNK = 16384


@dataclass(frozen=True)
class Prototypes:
    """A flat clustering: ``labels[i]`` is the cluster of prototype ``protos[i]``."""

    protos: np.ndarray  # [m, d] float32
    labels: np.ndarray  # [m] int32 in 0..k-1
    k: int

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.labels[nearest(x, self.protos)].astype(np.int32)


def nearest(x: np.ndarray, centers: np.ndarray, chunk: int = CHUNK) -> np.ndarray:
    """Index of the nearest centre (squared Euclidean) for every row, in fixed row chunks.

    Fixed chunk boundaries make the result bit-identical between a fit and a later ``apply``
    over the same rows (BLAS results can depend on the matrix shape).
    """
    c = np.ascontiguousarray(centers, dtype=np.float32)
    if c.ndim != 2 or c.shape[0] == 0:
        raise AnalysisError("nearest: no centres")
    if x.shape[1] != c.shape[1]:
        raise AnalysisError(f"nearest: rows have {x.shape[1]} features, centres {c.shape[1]}")
    cn = np.einsum("ij,ij->i", c, c, dtype=np.float64)
    out = np.empty(x.shape[0], dtype=np.int64)
    for s in range(0, x.shape[0], chunk):
        xb = np.asarray(x[s:s + chunk], dtype=np.float32)
        d = cn[None, :] - 2.0 * (xb @ c.T).astype(np.float64)
        out[s:s + chunk] = np.argmin(d, axis=1)
    return out


def fit_kmeans(backend: Backend, x: np.ndarray, k: int, seed: int, n_init: int = 10,
               max_iter: int = 300) -> Prototypes:
    """k-means with ``k`` centres (clipped to the number of distinct rows)."""
    if k < 1:
        raise AnalysisError(f"k-means needs k >= 1, got {k}")
    if x.shape[0] < k:
        raise AnalysisError(f"k-means: {x.shape[0]} rows cannot form {k} clusters")
    centers = backend.kmeans(np.ascontiguousarray(x, dtype=np.float32), k, seed, n_init,
                             max_iter)
    return Prototypes(centers, np.arange(k, dtype=np.int32), k)


def landmark_affinity(landmarks: np.ndarray, n_neighbors: int):
    """Sparse symmetric kNN affinity with self-tuning Gaussian weights (Zelnik-Manor & Perona).

    ``w_ij = exp(-d_ij^2 / (sigma_i sigma_j))``, sigma_i = distance to the i-th landmark's
    ``min(7, n_neighbors)``-th neighbour: adapts the kernel width to local density, so dense
    and sparse regions are both connected internally without one global bandwidth.
    """
    from scipy import sparse
    from sklearn.neighbors import NearestNeighbors

    m = landmarks.shape[0]
    nn = min(n_neighbors, m - 1)
    dist, idx = NearestNeighbors(n_neighbors=nn + 1).fit(landmarks).kneighbors(landmarks)
    dist, idx = dist[:, 1:], idx[:, 1:]  # drop self
    sigma = dist[:, min(7, nn) - 1].astype(np.float64)
    sigma[sigma <= 0] = max(float(sigma.max()), 1e-12)
    w = np.exp(-(dist.astype(np.float64) ** 2) / (sigma[:, None] * sigma[idx]))
    a = sparse.csr_matrix((w.ravel(), (np.repeat(np.arange(m), nn), idx.ravel())),
                          shape=(m, m))
    return bridge_components(landmarks, a.maximum(a.T).tocsr())


def bridge_components(points: np.ndarray, aff, strength: float = 1e-3):
    """Join the connected components of a kNN affinity by weak, distance-ranked bridges.

    With well-separated data the kNN graph falls apart into c components. If c > k, every
    grouping of components into k clusters has a zero cut, so the spectral embedding is an
    arbitrary basis of the null space and k-means on it mixes far-apart groups. Following the
    usual fix (as in Isomap's connectivity repair), the components are linked along a minimum
    spanning tree of their closest-pair distances, one edge per tree link, weighted
    ``strength * (d_min / d)^2`` (d_min: shortest bridge). Far groups get the weakest bridges,
    so the normalised cut separates them first; within-component structure is untouched.
    Only used on landmarks (m <= a few thousand): the m x m distance pass is cheap there.
    """
    from scipy import sparse
    from scipy.sparse.csgraph import connected_components, minimum_spanning_tree

    aff = aff.tocsr(copy=True)
    # exp(-d^2/sigma^2) underflows to ~1e-250 between separated groups: numerically no edge
    aff.data[aff.data < 1e-12 * aff.data.max()] = 0
    aff.eliminate_zeros()
    c, comp = connected_components(aff, directed=False)
    if c == 1:
        return aff
    pts = points.astype(np.float64)
    sq = np.einsum("ij,ij->i", pts, pts)
    order = np.argsort(comp, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(comp[order]) != 0])
    best = np.full((c, c), np.inf)  # squared closest-pair distance between components
    for s in range(0, len(pts), 1024):
        blk = slice(s, s + 1024)
        d2 = np.maximum(sq[blk, None] - 2 * pts[blk] @ pts[order].T + sq[order][None], 0)
        mins = np.minimum.reduceat(d2, starts, axis=1)  # [rows, c]
        np.minimum.at(best, comp[blk], mins)
    best = np.minimum(best, best.T)
    np.fill_diagonal(best, 0)
    tree = minimum_spanning_tree(np.sqrt(best) + 1e-300 * (1 - np.eye(c))).tocoo()
    d0 = max(float(tree.data.min()), 1e-12)
    rows, cols, vals = [], [], []
    for ca, cb, d in zip(tree.row, tree.col, tree.data, strict=True):
        ia, ib = np.flatnonzero(comp == ca), np.flatnonzero(comp == cb)
        sub = (sq[ia, None] - 2 * pts[ia] @ pts[ib].T + sq[ib][None])
        i, j = np.unravel_index(np.argmin(sub), sub.shape)
        w = strength * (d0 / max(float(d), 1e-12)) ** 2
        rows += [ia[i], ib[j]]
        cols += [ib[j], ia[i]]
        vals += [w, w]
    bridges = sparse.csr_matrix((vals, (rows, cols)), shape=aff.shape)
    return (aff + bridges).tocsr()


def fit_spectral(backend: Backend, x: np.ndarray, k: int, seed: int, *,
                 n_landmarks: int = 1000, n_neighbors: int = 15,
                 landmark_iter: int = 20) -> Prototypes:
    """Landmark spectral clustering into ``k`` clusters (never builds an n x n matrix).

    With ``n <= n_landmarks`` every row is a landmark, i.e. plain spectral clustering on the
    sparse kNN graph of the data.
    """
    from sklearn.cluster import SpectralClustering

    n = x.shape[0]
    if k < 1:
        raise AnalysisError(f"spectral clustering needs k >= 1, got {k}")
    if n_landmarks < 2 * k:
        raise AnalysisError(f"spectral: {n_landmarks} landmarks are too few for k={k} "
                            "(need at least 2k)")
    if n < 2 * k:
        raise AnalysisError(f"spectral: {n} rows cannot form {k} clusters")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if n <= n_landmarks:
        landmarks = x.copy()
    else:
        log.info("spectral: %d k-means landmarks over %d rows [%s]", n_landmarks, n,
                 backend.name)
        landmarks = backend.kmeans(x, n_landmarks, seed, 1, landmark_iter)
    if k == 1:
        return Prototypes(landmarks, np.zeros(len(landmarks), np.int32), 1)
    aff = landmark_affinity(landmarks, n_neighbors)
    with warnings.catch_warnings():
        # A disconnected landmark graph is the well-separated case; it is fine for k-way cuts.
        warnings.filterwarnings("ignore", message="Graph is not fully connected")
        sc = SpectralClustering(n_clusters=k, affinity="precomputed", random_state=seed,
                                assign_labels="kmeans", n_init=10)
        labels = sc.fit_predict(aff).astype(np.int32)
    if backend.name == "cuml":
        log.info("spectral: landmarks on GPU (cuML), landmark eigensolve on host (sklearn)")
    return Prototypes(landmarks, labels, k)


FlatFit = Callable[[np.ndarray, int, int], Prototypes]  # (x, k, seed) -> model


def choose_k(x: np.ndarray, fit: FlatFit, seed: int, *, max_k: int = 5,
             min_cluster_size: int = 50, sample: int = 2000) -> tuple[int, dict[int, float]]:
    """Pick how many sub-clusters a cluster gets, from its size and its shape.

    Rule (documented in ``hierarchical_kmeans``): candidates k = 2..kmax with
    ``kmax = min(max_k, n // min_cluster_size)`` (size: no sub-cluster smaller than
    ``min_cluster_size`` on average; clusters under ``2 * min_cluster_size`` rows stay whole,
    k = 1). Among the candidates, the k with the highest silhouette on a seeded subsample of at
    most ``sample`` rows wins (shape: well-separated sub-structure scores high).
    Returns k and the silhouette per candidate.
    """
    from sklearn.metrics import silhouette_score

    n = x.shape[0]
    kmax = min(max_k, n // max(1, min_cluster_size))
    if kmax < 2:
        return 1, {}
    rng = np.random.default_rng(seed)
    sub = np.sort(rng.choice(n, size=min(n, sample), replace=False))
    xs = np.ascontiguousarray(x[sub], dtype=np.float32)
    scores: dict[int, float] = {}
    for k in range(2, kmax + 1):
        if xs.shape[0] < 2 * k:
            break
        labels = fit(xs, k, seed).predict(xs)
        scores[k] = (float(silhouette_score(xs, labels)) if len(np.unique(labels)) > 1
                     else -1.0)
    if not scores:
        return 1, {}
    best = max(scores, key=lambda kk: (scores[kk], -kk))
    return best, scores
