"""The feature pipeline every analysis shares: per-layer normalise (+ PCA), concat, PCA.

Single layer:  ``layer -> normalise -> PCA(k)`` (PCA optional).
Multi-layer (the blog's last figure): ``each layer -> normalise -> PCA(200)``, concatenate
(1200 for six layers), ``-> PCA(200)``. Fitted once on the training rows; :meth:`transform`
is the one code path used for the training STORE and for ``apply`` to other STOREs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from probing.analysis.backends import Backend, PCAModel
from probing.analysis.errors import AnalysisError
from probing.analysis.normalize import NormParams, apply_normalizer, fit_normalizer
from probing.analysis.reduce import fit_pca, pca_from_arrays, pca_to_arrays, pca_transform
from probing.store import Store

log = logging.getLogger("dvprobe.analysis")

ROW_CHUNK = 16384


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

    def transform(self, store: Store, rows: np.ndarray | None = None,
                  chunk: int = ROW_CHUNK) -> np.ndarray:
        """Features of ``store`` rows (all rows, or sorted indices ``rows``) in fixed chunks."""
        self.check_store(store)
        mats = {name: store.layer(name) for name in self.layers}
        n = store.n if rows is None else len(rows)
        out = np.empty((n, self.out_dim), dtype=np.float32)
        for s in range(0, n, chunk):
            sel = slice(s, s + chunk) if rows is None else rows[s:s + chunk]
            out[s:s + chunk] = self.transform_blocks(
                {k: np.asarray(m[sel], dtype=np.float32) for k, m in mats.items()})
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
                 pca2: int | None, backend: Backend, seed: int,
                 rows: np.ndarray | None = None) -> FeatureModel:
    """Fit the feature pipeline on ``rows`` (sorted indices; None = all rows) of ``store``."""
    check_layers(store, layers)
    specs = store.layer_specs
    norm: dict[str, NormParams] = {}
    pcas: dict[str, PCAModel | None] = {}
    parts = []
    for name in layers:
        t = time.perf_counter()
        m = store.layer(name)
        x = np.asarray(m if rows is None else m[rows], dtype=np.float32)
        norm[name] = fit_normalizer(x, normalize)
        z = apply_normalizer(x, norm[name])
        del x
        if pca is not None:
            pcas[name] = fit_pca(backend, z, pca, seed, what=f"{name}")
            z = pca_transform(z, pcas[name])
        else:
            pcas[name] = None
        parts.append(z)
        log.info("features: %s [%d x %d] normalize=%s pca=%s (%.1fs)", name, z.shape[0],
                 specs[name].dim, normalize,
                 None if pcas[name] is None else pcas[name].components.shape[0],
                 time.perf_counter() - t)
    p2 = None
    if pca2 is not None:
        t = time.perf_counter()
        cat = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
        p2 = fit_pca(backend, cat, pca2, seed, what="concatenated layers")
        log.info("features: concat %d -> PCA(%d) (%.1fs)", cat.shape[1],
                 p2.components.shape[0], time.perf_counter() - t)
    return FeatureModel(list(layers), {ly: specs[ly].dim for ly in layers}, normalize, norm,
                        pcas, p2)
