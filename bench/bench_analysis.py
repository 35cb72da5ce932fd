"""Benchmark the analysis engine's heavy steps on synthetic mixed5-like embeddings.

    .venv/bin/python bench/bench_analysis.py                       # 100k x 768, CPU
    .venv/bin/python bench/bench_analysis.py --backend both        # GPU box: cuML beside sklearn
    .venv/bin/python bench/bench_analysis.py --n 5000 --umap-n 5000   # quick check

Data: ``n`` rows of ``d`` float32 features, seeded: ``clusters`` centres on a random
low-rank subspace, Gaussian noise, then ReLU (max-pooled mixed5 activations are
non-negative). Steps, each on the previous step's output, as the pipeline runs them:

* PCA(50): fit + transform of all rows.
* k-means(10, n_init=10) on PCA-50: fit + nearest-centre labels of all rows.
* UMAP(2) on PCA-50: fit on ``--umap-n`` rows (default all; the number used is printed).
* spectral(10): landmark spectral clustering (``--landmarks`` k-means landmarks) on PCA-50.

Prints one line per step and backend (seconds, and ARI against the planted clusters as a
sanity check), the cuML/sklearn speed-up with ``--backend both``, and writes ``--json``.
Timings on a shared machine are noisy: rerun when it is quiet, with ``OMP_NUM_THREADS``
set to the cores you have.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from probing.analysis.backends import get_backend  # noqa: E402
from probing.analysis.cluster import fit_kmeans, fit_spectral  # noqa: E402
from probing.analysis.reduce import fit_pca, pca_transform  # noqa: E402


def synthetic(n: int, d: int, clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded clustered embeddings: low-rank centres + noise, ReLU'd; float32."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(32, d)).astype(np.float32)
    centers = (rng.normal(size=(clusters, 32)).astype(np.float32) @ basis) * 0.6
    y = rng.integers(0, clusters, size=n)
    x = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 20000):
        e = min(n, s + 20000)
        x[s:e] = centers[y[s:e]] + rng.normal(size=(e - s, d)).astype(np.float32)
    np.maximum(x, 0, out=x)
    return x, y


def _ari(y, labels) -> float:
    from sklearn.metrics import adjusted_rand_score

    return round(float(adjusted_rand_score(y, labels)), 4)


def run_backend(name: str, x: np.ndarray, y: np.ndarray, args) -> list[dict]:
    be = get_backend(name)
    rows = []

    def rec(step, t, n, **kw):
        rows.append({"backend": be.name, "step": step, "seconds": round(t, 2), "n": n, **kw})
        print(f"{be.name:8s} {step:22s} {t:9.2f}s  n={n:,} "
              + " ".join(f"{k}={v}" for k, v in kw.items()), flush=True)

    t = time.perf_counter()
    p = fit_pca(be, x, 50, args.seed)
    z = pca_transform(x, p)
    rec("pca50 fit+transform", time.perf_counter() - t, len(x),
        var=round(float(p.explained_variance_ratio.sum()), 3))

    t = time.perf_counter()
    km = fit_kmeans(be, z, 10, args.seed, n_init=10)
    lab = km.predict(z)
    rec("kmeans10 (on pca50)", time.perf_counter() - t, len(z), ari=_ari(y, lab))

    if args.umap_n:
        nu = min(args.umap_n, len(z))
        sub = np.sort(np.random.default_rng(args.seed).choice(len(z), nu, replace=False))
        t = time.perf_counter()
        emb, blob, impl = be.umap_fit(np.ascontiguousarray(z[sub]), 2, 15, 0.1, args.seed)
        rec("umap2 fit (on pca50)", time.perf_counter() - t, nu, impl=impl.replace(" ", "-"),
            model_mb=round(len(blob) / 2**20, 1))

    t = time.perf_counter()
    sp = fit_spectral(be, z, 10, args.seed, n_landmarks=args.landmarks)
    lab = sp.predict(z)
    rec(f"spectral10 ({args.landmarks} lm)", time.perf_counter() - t, len(z),
        ari=_ari(y, lab))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--clusters", type=int, default=10)
    ap.add_argument("--umap-n", type=int, default=None,
                    help="rows UMAP is fitted on (default: all; 0 skips UMAP)")
    ap.add_argument("--landmarks", type=int, default=1000)
    ap.add_argument("--backend", default="sklearn", choices=["auto", "sklearn", "cuml", "both"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="write results here")
    args = ap.parse_args(argv)
    if args.umap_n is None:
        args.umap_n = args.n

    t = time.perf_counter()
    x, y = synthetic(args.n, args.d, args.clusters, args.seed)
    print(f"data: {args.n:,} x {args.d} float32 ({x.nbytes / 2**20:.0f} MiB), "
          f"{args.clusters} planted clusters, {time.perf_counter() - t:.1f}s; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"cpus={os.cpu_count()}", flush=True)
    names = ["sklearn", "cuml"] if args.backend == "both" else [args.backend]
    rows: list[dict] = []
    for name in names:
        rows += run_backend(name, x, y, args)
    if args.backend == "both":
        print("\nspeed-up cuml vs sklearn:")
        sk = {r["step"]: r["seconds"] for r in rows if r["backend"] == "sklearn"}
        for r in rows:
            if r["backend"] == "cuml" and r["step"] in sk and r["seconds"] > 0:
                print(f"  {r['step']:22s} {sk[r['step']] / r['seconds']:7.1f}x")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "machine": platform.platform(),
                                         "cpus": os.cpu_count(), "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
