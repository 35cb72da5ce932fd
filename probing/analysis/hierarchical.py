"""Two-level hierarchical clustering (the blog's "3-cluster k-means, then split each").

Level 1 splits all points into ``k1`` clusters; each level-1 cluster ``c`` is then split into
``k_c`` sub-clusters, given explicitly (``split=[3, 2, 4]``) or chosen per cluster by
:func:`probing.analysis.cluster.choose_k` from its size and shape. Nodes are named
``"c.j"`` (both 0-based) and also numbered 0..K-1 in (c, j) order as a flat integer label.
The same driver runs k-means or landmark spectral clustering at each node; every node is a
:class:`Prototypes` model, so predicting a new point is "nearest prototype at level 1, then
nearest prototype among that cluster's children".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from probing.analysis.cluster import FlatFit, Prototypes, choose_k
from probing.analysis.errors import AnalysisError

log = logging.getLogger("dvprobe.analysis")


@dataclass(frozen=True)
class Hierarchy:
    """Fitted two-level tree: a level-1 model and one child model per level-1 cluster."""

    level1: Prototypes
    children: list[Prototypes]
    split_scores: dict[int, dict[int, float]]  # level-1 cluster -> {k: silhouette} (auto)

    @property
    def nodes(self) -> np.ndarray:
        """``[K, 2]`` (level1, level2) per flat label, in flat-label order."""
        return np.array([(c, j) for c, ch in enumerate(self.children) for j in range(ch.k)],
                        dtype=np.int32).reshape(-1, 2)

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(level1, level2, flat) labels for rows ``x``."""
        l1 = self.level1.predict(x)
        l2 = np.zeros_like(l1)
        for c, child in enumerate(self.children):
            rows = np.flatnonzero(l1 == c)
            if rows.size:
                l2[rows] = child.predict(x[rows])
        offsets = np.concatenate([[0], np.cumsum([ch.k for ch in self.children])])
        return l1, l2, (offsets[l1] + l2).astype(np.int32)

    def to_arrays(self, prefix: str = "h") -> dict[str, np.ndarray]:
        parent = np.concatenate([np.full(len(ch.protos), c, np.int32)
                                 for c, ch in enumerate(self.children)])
        return {
            f"{prefix}.l1.protos": self.level1.protos,
            f"{prefix}.l1.labels": self.level1.labels,
            f"{prefix}.l2.protos": np.concatenate([ch.protos for ch in self.children]),
            f"{prefix}.l2.labels": np.concatenate([ch.labels for ch in self.children]),
            f"{prefix}.l2.parent": parent,
            f"{prefix}.l2.k": np.array([ch.k for ch in self.children], dtype=np.int32),
            f"{prefix}.nodes": self.nodes,
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str = "h") -> Hierarchy:
        try:
            ks = arrays[f"{prefix}.l2.k"]
            l1 = Prototypes(arrays[f"{prefix}.l1.protos"], arrays[f"{prefix}.l1.labels"],
                            len(ks))
            parent = arrays[f"{prefix}.l2.parent"]
            protos, labels = arrays[f"{prefix}.l2.protos"], arrays[f"{prefix}.l2.labels"]
        except KeyError as exc:
            raise AnalysisError(f"run arrays lack the hierarchy {prefix!r} ({exc})") from None
        children = [Prototypes(protos[parent == c], labels[parent == c], int(k))
                    for c, k in enumerate(ks)]
        return cls(l1, children, {})


def parse_split(split: str | list[int] | None) -> list[int] | None:
    """``"auto"``/None -> None (rule-based); ``"3,2,4"`` or ``[3, 2, 4]`` -> explicit."""
    if split is None or (isinstance(split, str) and split.strip().lower() == "auto"):
        return None
    if isinstance(split, str):
        try:
            ks = [int(s) for s in split.split(",") if s.strip()]
        except ValueError:
            raise AnalysisError(f"--split must be 'auto' or comma-separated integers like "
                                f"3,2,4; got {split!r}") from None
    else:
        ks = [int(s) for s in split]
    if not ks or any(k < 1 for k in ks):
        raise AnalysisError(f"--split needs positive integers, got {split!r}")
    return ks


def check_split(split: list[int] | None, k1: int) -> None:
    """An explicit split needs one count per level-1 cluster; checked before any fitting."""
    if split is not None and len(split) != k1:
        raise AnalysisError(f"--split gives {len(split)} sub-cluster counts but the first "
                            f"level has k={k1}; give exactly {k1} (e.g. "
                            f"{','.join(['2'] * k1)}) or 'auto'")


def format_scores(scores: dict[int, float]) -> str:
    """``{2: 0.279, 3: 0.161}``: three significant digits are all a silhouette says."""
    return "{" + ", ".join(f"{k}: {v:.3g}" for k, v in scores.items()) + "}"


def fit_hierarchy(x: np.ndarray, fit: FlatFit, k1: int, split: list[int] | None, seed: int,
                  *, max_k: int = 5, min_cluster_size: int = 50) -> Hierarchy:
    """Fit level 1 with ``k1`` clusters, then each cluster with its own k (see module doc)."""
    check_split(split, k1)
    level1 = fit(x, k1, seed)
    l1 = level1.predict(x)
    children: list[Prototypes] = []
    scores: dict[int, dict[int, float]] = {}
    for c in range(k1):
        xc = x[l1 == c]
        if split is not None:
            kc = split[c]
        else:
            kc, scores[c] = choose_k(xc, fit, seed, max_k=max_k,
                                     min_cluster_size=min_cluster_size)
        if xc.shape[0] == 0:
            raise AnalysisError(f"hierarchical: level-1 cluster {c} is empty; use a smaller k")
        if kc > 1 and xc.shape[0] < 2 * kc:
            log.warning("hierarchical: cluster %d has %d rows, too few for %d sub-clusters; "
                        "kept whole", c, xc.shape[0], kc)
            kc = 1
        if kc == 1:
            child = Prototypes(xc.mean(axis=0, keepdims=True).astype(np.float32),
                               np.zeros(1, np.int32), 1)
        else:
            child = fit(xc, kc, seed)
        why = "" if split is not None else f" (silhouette {format_scores(scores.get(c, {}))})"
        log.info("hierarchical: cluster %d (%d rows) -> %d sub-clusters%s", c, xc.shape[0],
                 kc, why)
        children.append(child)
    return Hierarchy(level1, children, scores)
