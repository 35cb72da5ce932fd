"""Helpers (no tests): small synthetic STOREs for the analysis tests, no model involved."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from probing.store import LayerSpec, Store, StoreWriter


def make_store(path: Path, layers: dict[str, np.ndarray], extra_obs: dict | None = None,
               batch: int = 128, *, inputs: dict | None = None, pool: str = "max",
               complete: bool = True) -> Store:
    """Write ``layers`` (name -> [n, d]) as a STORE, committing in batches.

    ``inputs`` are recorded as the extraction's fingerprint (``bundle_sha256``, ``pool``,
    ``dtype`` ...; default: none of them, like a STORE from before they were recorded),
    ``pool`` as every layer's pooling; ``complete=False`` leaves it as an interrupted
    extraction leaves it (rows committed, never finalised).
    """
    n = len(next(iter(layers.values())))
    specs = [LayerSpec(name, arr.shape[1], pool=pool) for name, arr in layers.items()]
    w = StoreWriter.open(path, {"inputs": inputs or {"test": str(path)}}, specs)
    obs = pd.DataFrame({"key": [f"chr1:{i}:A>C:1" for i in range(n)]})
    for col, vals in (extra_obs or {}).items():
        obs[col] = vals
    for s in range(0, n, batch):
        w.append(obs.iloc[s:s + batch], {k: v[s:s + batch] for k, v in layers.items()})
    return w.finalize() if complete else Store(path)


def blobs(n: int, d: int, centers: np.ndarray | int, seed: int, std: float = 0.5
          ) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs around given (or random, well separated) centres; float32 + labels."""
    rng = np.random.default_rng(seed)
    if isinstance(centers, int):
        centers = rng.normal(0, 10, size=(centers, d))
    y = np.arange(n) % len(centers)
    rng.shuffle(y)
    x = centers[y] + rng.normal(0, std, size=(n, d))
    return x.astype(np.float32), y


def nested_blobs(n: int, d: int, subs: list[int], seed: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Groups far apart, each made of ``subs[g]`` sub-blobs: (x, group, fine label)."""
    rng = np.random.default_rng(seed)
    centers, group = [], []
    for g, s in enumerate(subs):
        top = rng.normal(0, 40, size=d)
        for _ in range(s):
            centers.append(top + rng.normal(0, 6, size=d))
            group.append(g)
    centers_arr = np.array(centers)
    x, fine = blobs(n, d, centers_arr, seed + 1, std=0.5)
    return x, np.array(group)[fine], fine
