"""The feature pipeline every analysis shares: per-layer normalise (+ PCA), concat, PCA.

Single layer:  ``layer -> normalise -> PCA(k)`` (PCA optional).
Multi-layer (the blog's last figure): ``each layer -> normalise -> PCA(200)``, concatenate
(1200 for six layers), ``-> PCA(200)``. Fitted once on the training rows; :meth:`transform`
is the one code path used for the training STORE and for ``apply`` to other STOREs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import numpy as np

from probing.analysis.backends import PCAModel
from probing.analysis.errors import AnalysisError
from probing.analysis.normalize import NormParams, apply_normalizer, normalizer_from_moments
from probing.analysis.passes import LocalPasses, Passes
from probing.analysis.reduce import pca_from_arrays, pca_from_moments, pca_to_arrays, pca_transform
from probing.analysis.stream import ROW_CHUNK, chunks, read_rows
from probing.store import Store

log = logging.getLogger("dvprobe.analysis")


@dataclass(frozen=True)
class FeatureModel:
    """Fitted normalisers and PCAs for an ordered list of layers."""

    layers: list[str]
    dims: dict[str, int]
    normalize: str
    norm: dict[str, NormParams]
    pca: dict[str, PCAModel | None]
    pca2: PCAModel | None

    @property
    def out_dim(self) -> int:
        if self.pca2 is not None:
            return int(self.pca2.components.shape[0])
        return int(sum(self.pca[ly].components.shape[0] if self.pca[ly] is not None
                       else self.dims[ly] for ly in self.layers))

    @property
    def reduced(self) -> bool:
        """True when the output space is a PCA space (stored as the run's ``pca`` array)."""
        return self.pca2 is not None or any(p is not None for p in self.pca.values())

    def transform_blocks(self, blocks: dict[str, np.ndarray]) -> np.ndarray:
        """Rows given per layer -> feature rows ``[b, out_dim]`` (float32)."""
        parts = []
        for name in self.layers:
            z = apply_normalizer(blocks[name], self.norm[name])
            p = self.pca[name]
            parts.append(pca_transform(z, p) if p is not None else z)
        z = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
        return pca_transform(z, self.pca2) if self.pca2 is not None else z

    def check_store(self, store: Store) -> None:
        specs = store.layer_specs
        for name in self.layers:
            if name not in specs:
                raise AnalysisError(f"{store.path}: no layer {name!r} (the run needs "
                                    f"{self.layers}; the STORE holds {sorted(specs)})")
            if specs[name].dim != self.dims[name]:
                raise AnalysisError(f"{store.path}: layer {name!r} has {specs[name].dim} "
                                    f"features, the run was fitted on {self.dims[name]} "
                                    "(different pooling?)")

    def reader(self, store: Store) -> Callable[[slice | np.ndarray], np.ndarray]:
        """``sel -> features`` of the STORE rows ``sel`` (a slice or sorted indices): what
        the chunked passes call once per chunk."""
        self.check_store(store)
        mats = {name: store.layer(name) for name in self.layers}
        return lambda sel: self.transform_blocks({k: read_rows(m, sel)
                                                  for k, m in mats.items()})

    def transform(self, store: Store, rows: np.ndarray | None = None,
                  chunk: int = ROW_CHUNK) -> np.ndarray:
        """Features of ``store`` rows (all rows, or sorted indices ``rows``) in fixed chunks,
        as one ``[rows, out_dim]`` array (for a sample; every row of a large STORE goes
        through :func:`probing.analysis.stream.label_rows` instead)."""
        read = self.reader(store)
        n = store.n if rows is None else len(rows)
        out = np.empty((n, self.out_dim), dtype=np.float32)
        for where, sel in chunks(store.n, rows, chunk):
            out[where] = read(sel)
        return out

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {}
        for name in self.layers:
            arrays[f"feat.{name}.norm_mean"] = self.norm[name].mean
            arrays[f"feat.{name}.norm_scale"] = self.norm[name].scale
            if self.pca[name] is not None:
                arrays.update(pca_to_arrays(f"feat.{name}.pca", self.pca[name]))
        if self.pca2 is not None:
            arrays.update(pca_to_arrays("feat.concat.pca", self.pca2))
        return arrays

    def to_meta(self) -> dict:
        return {
            "layers": self.layers, "dims": self.dims, "normalize": self.normalize,
            "pca": {ly: (None if p is None else int(p.components.shape[0]))
                    for ly, p in self.pca.items()},
            "pca2": None if self.pca2 is None else int(self.pca2.components.shape[0]),
            "out_dim": self.out_dim,
            "pca_solver": "covariance eigendecomposition (exact, streamed over row chunks)",
            "explained_variance_ratio": {
                **{ly: float(p.explained_variance_ratio.sum())
                   for ly, p in self.pca.items() if p is not None},
                **({"concat": float(self.pca2.explained_variance_ratio.sum())}
                   if self.pca2 is not None else {})},
        }

    @classmethod
    def from_run(cls, meta: dict, arrays: dict[str, np.ndarray]) -> FeatureModel:
        try:
            f = meta["features"]
            layers = list(f["layers"])
            norm = {ly: NormParams(f["normalize"], arrays[f"feat.{ly}.norm_mean"],
                                  arrays[f"feat.{ly}.norm_scale"]) for ly in layers}
            pca = {ly: (pca_from_arrays(f"feat.{ly}.pca", arrays) if f["pca"].get(ly) else None)
                   for ly in layers}
            pca2 = pca_from_arrays("feat.concat.pca", arrays) if f.get("pca2") else None
            dims = {ly: int(f["dims"][ly]) for ly in layers}
        except KeyError as exc:
            raise AnalysisError(f"run {meta.get('name')!r} has no feature model ({exc}); "
                                "was it written by the analysis engine?") from None
        return cls(layers, dims, f["normalize"], norm, pca, pca2)


def check_layers(store: Store, layers: list[str]) -> None:
    """Every layer in ``store``, none named twice (checked before anything is read)."""
    specs = store.layer_specs
    for ly in layers:
        if ly not in specs:
            raise AnalysisError(f"{store.path}: no layer {ly!r}; it holds {sorted(specs)}")
    twice = sorted({ly for ly in layers if layers.count(ly) > 1})
    if twice:
        raise AnalysisError(f"--layers names {', '.join(twice)} more than once")


def fit_features(store: Store, layers: list[str], *, normalize: str, pca: int | None,
                 pca2: int | None, rows: np.ndarray | None = None,
                 chunk: int = ROW_CHUNK, passes: Passes | None = None) -> FeatureModel:
    """Fit the feature pipeline on ``rows`` (sorted indices; None = all rows) of ``store``.

    Streamed: one pass over the rows per stage that needs one (standardiser moments,
    per-layer covariances, the concatenation's covariance), each holding one chunk and the
    ``d x d`` accumulators, never the rows themselves. The PCAs are exact (eigenvectors of
    the covariance), as scikit-learn's full-SVD PCA of the same rows. ``passes``: where the
    passes run (default: here, in chunks of ``chunk`` rows; :mod:`probing.analysis.passes`).
    """
    check_layers(store, layers)
    passes = passes or LocalPasses(chunk)
    specs = store.layer_specs
    dims = {ly: specs[ly].dim for ly in layers}
    t = time.perf_counter()
    if normalize == "standardize":
        moms = passes.moments(store, layers, rows, {ly: partial(_layer_rows, ly)
                                                    for ly in layers}, products=False)
        norm = {ly: normalizer_from_moments(normalize, m.mean, m.var()) for ly, m in moms.items()}
    else:
        norm = {ly: normalizer_from_moments(normalize, np.zeros(0), np.zeros(0)) for ly in layers}
    pcas: dict[str, PCAModel | None] = dict.fromkeys(layers)
    if pca is not None:
        moms = passes.moments(store, layers, rows, {
            ly: partial(_normalised_rows, ly, norm[ly]) for ly in layers})
        pcas = {ly: pca_from_moments(m, pca, what=ly) for ly, m in moms.items()}
    for ly in layers:
        log.info("features: %s [%d rows x %d] normalize=%s pca=%s", ly,
                 store.n if rows is None else len(rows), dims[ly], normalize,
                 None if pcas[ly] is None else pcas[ly].components.shape[0])
    fm = FeatureModel(list(layers), dims, normalize, norm, pcas, None)
    if pca2 is None:
        return fm
    fm.check_store(store)
    cat = passes.moments(store, layers, rows, {"concat": fm.transform_blocks})["concat"]
    p2 = pca_from_moments(cat, pca2, what="concatenated layers")
    log.info("features: concat %d -> PCA(%d) (%.1fs)", fm.out_dim, p2.components.shape[0],
             time.perf_counter() - t)
    return replace(fm, pca2=p2)


def _layer_rows(layer: str, blocks: dict[str, np.ndarray]) -> np.ndarray:
    return blocks[layer]


def _normalised_rows(layer: str, norm: NormParams, blocks: dict[str, np.ndarray]) -> np.ndarray:
    return apply_normalizer(blocks[layer], norm)
