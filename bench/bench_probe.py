"""Benchmark ``dvprobe probe`` (probing.probe.probe_layers) at its default sample size.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_probe.py            # 100k examples, 2 layers
    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_probe.py --n 5000   # quick check

Data, seeded: ``n`` examples on 22 chromosomes of 100 Mb; a mixed5-wide (768) and a
mixed10-wide (2048) layer of Gaussian noise; yes/no concepts ``planted`` (10 %, written
into mixed5 along one direction), ``common`` (10 %) and ``rare`` (1 %), and numbers
``depth`` and ``alt_fraction``, the last four unrelated to any layer. The probe runs with its
defaults (5 folds by 1 Mb block, PCA 50 inside each fold, a 50,000-example sample), so the
time is what a whole-genome STORE costs per pair of layers. The printed profile is also a
check: ``planted`` must be found in mixed5 only, everything else at chance (AUROC 0.5, R2 0).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test fixtures

from test_analysis_support import make_store  # noqa: E402  (tests/ on sys.path)

from probing.probe import probe_layers, profile_markdown  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--max-rows", type=int, default=50_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    n = args.n
    planted = rng.random(n) < 0.1
    obs = {"chrom": np.repeat([f"chr{i}" for i in range(1, 23)], n // 22 + 1)[:n],
           "pos": rng.integers(0, 100_000_000, n), "planted": planted,
           "common": rng.random(n) < 0.1, "rare": rng.random(n) < 0.01,
           "depth": rng.normal(30, 8, n), "alt_fraction": rng.random(n)}
    mixed5 = rng.normal(size=(n, 768)).astype(np.float32)
    mixed5 += np.outer(planted, rng.normal(size=768) / np.sqrt(768) * 3).astype(np.float32)
    layers = {"mixed5": mixed5, "mixed10": rng.normal(size=(n, 2048)).astype(np.float32)}
    with tempfile.TemporaryDirectory() as tmp:
        store = make_store(Path(tmp) / "s", layers, obs, batch=10_000,
                           inputs={"layers": ["mixed5", "mixed10"]})
        t0 = time.perf_counter()
        res = probe_layers(store, max_rows=args.max_rows, seed=args.seed)
        seconds = time.perf_counter() - t0
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(res.header())
    print(profile_markdown(res))
    print(f"probe: {seconds:.1f} s for {len(res.table)} layer x concept cells "
          f"({res.n_rows:,} of {n:,} examples, 2 layers, 5 concepts)")


if __name__ == "__main__":
    main()
