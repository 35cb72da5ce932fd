"""Whole-genome-scale analysis benchmark: every command of the workflow on one synthetic STORE.

    nice .venv/bin/python bench/bench_scale.py --rows 200000 --work /scratch/bench
    nice .venv/bin/python bench/bench_scale.py --rows 2000000 --work /scratch/bench
    .venv/bin/python bench/bench_scale.py --rows 20000 --work /tmp/b --only kmeans,enrich

The STORE (``--rows`` x mixed5 768 + mixed10 2048, float32) is written by the project's own
``StoreWriter`` in extraction-sized batches, with obs laid out like an extraction's (every
column of ``probing/schema.py`` and the pileup attributes). Rows follow the genome (chr1..22,
sizes in proportion to GRCh38, ~1 example per kb). Planted structure, so that results can
be checked:

* clusters: 3 groups x (3, 3, 2) sub-clusters = 8 leaves, assigned per 50 kb segment of the
  genome; each layer holds its own random centres for them plus unit Gaussian noise. Groups
  lie 4x as far apart as their sub-clusters (``GROUP_SCALE``), so the planted hierarchy is
  the one a 3-way first split finds. The hierarchical methods run with ``--split auto``
  (their default): level-1 cluster numbers are arbitrary, so a fixed ``3,3,2`` could give
  a 2-leaf group three sub-clusters (ARI 0.84 in the first runs, whatever the method);
* a BED of the segments of leaf 5 (``planted.bed``), for ``annotate --bed`` / ``enrich``;
* ``depth`` grows with the leaf (a number a probe can decode).

Each command runs as a subprocess of the real CLI (``cli.py``). Its time, its peak RSS
(``ru_maxrss`` from ``wait4``) and its peak anonymous memory (``RssAnon`` of
``/proc/<pid>/status``, sampled every 0.1 s: memory-mapped layer pages the kernel can drop
are not anonymous) are printed as a markdown table with the CPU model, then the checks:
ARI of each clustering against the planted leaves, and whether ``enrich`` finds the
planted BED in one cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import cpu_model  # noqa: E402  (bench/machine.py)

from probing.store import LayerSpec, StoreWriter, open_store  # noqa: E402

LAYERS = {"mixed5": 768, "mixed10": 2048}
SPLIT = (3, 3, 2)
PLANTED_LEAF = 5
SEGMENT_BP = 50_000
#: spread of the group centres and of the sub-cluster centres around them (per dimension)
GROUP_SCALE, SUB_SCALE = 2.0, 0.5
SPACING_BP = 1_000
BATCH = 4096
#: GRCh38 chr1..chr22 lengths in Mb (rounded): rows per chromosome follow them
CHROM_MB = (248, 242, 198, 190, 181, 171, 159, 145, 138, 134, 135, 133, 114, 107, 102, 90,
            83, 80, 59, 64, 47, 51)




def genome(n: int) -> tuple[np.ndarray, np.ndarray]:
    """chrom and pos of ``n`` rows spread over chr1..22 in proportion to their lengths."""
    share = np.array(CHROM_MB, float) / sum(CHROM_MB)
    per = np.floor(share * n).astype(int)
    per[: n - per.sum()] += 1
    chrom = np.repeat([f"chr{i + 1}" for i in range(len(per))], per)
    pos = np.concatenate([np.arange(k, dtype=np.int64) * SPACING_BP + 10_000 for k in per])
    return chrom, pos


def leaves_of(chrom: np.ndarray, pos: np.ndarray, seed: int) -> np.ndarray:
    """The planted leaf (0..7) of each row: one leaf per 50 kb segment, seeded."""
    seg = pd.DataFrame({"c": chrom, "s": pos // SEGMENT_BP}).groupby(
        ["c", "s"], sort=False).ngroup().to_numpy()
    rng = np.random.default_rng(seed)
    return rng.integers(0, sum(SPLIT), size=seg.max() + 1)[seg]


def centres(d: int, rng: np.random.Generator) -> np.ndarray:
    """Leaf centres: 3 far-apart groups, each with its sub-clusters around it."""
    out = []
    for subs in SPLIT:
        top = rng.normal(0, GROUP_SCALE, d)
        out += [top + rng.normal(0, SUB_SCALE, d) for _ in range(subs)]
    return np.array(out, dtype=np.float32)


def obs_batch(keys: slice, chrom, pos, leaf, rng) -> pd.DataFrame:
    i = np.arange(keys.start, keys.stop)
    c, p, lf = chrom[keys], pos[keys], leaf[keys]
    b = len(i)
    probs = rng.dirichlet([1, 1, 1], size=b).astype(np.float32)
    return pd.DataFrame({
        "key": [f"{a}:{q}:A>C:1" for a, q in zip(c, p, strict=True)],
        "shard": np.zeros(b, np.int32), "record": i, "chrom": c, "pos": p, "end": p + 1,
        "ref": "A", "alt": "C", "alt_allele_indices": "1",
        "locus": [f"{a}:{q - 110}-{q + 111}" for a, q in zip(c, p, strict=True)],
        "variant_type": np.ones(b, np.int8), "label": pd.array(rng.integers(0, 3, b),
                                                               dtype="Int64"),
        "sequencing_type": "WGS", "p_hom_ref": probs[:, 0], "p_het": probs[:, 1],
        "p_hom_alt": probs[:, 2], "pred_genotype": probs.argmax(1).astype(np.int8),
        "depth": (30 + 3 * lf + rng.normal(0, 1, b)).astype(np.float32),
        "mean_mapq": rng.uniform(40, 60, b).astype(np.float32),
        "frac_low_mapq": rng.uniform(0, 0.1, b).astype(np.float32),
        "mean_baseq": rng.uniform(25, 35, b).astype(np.float32),
        "alt_fraction": rng.uniform(0, 1, b).astype(np.float32),
        "alt_strand_balance": rng.uniform(0, 1, b).astype(np.float32),
    })


def write_store(path: Path, n: int, seed: int) -> np.ndarray:
    """The synthetic STORE (see the module doc); returns the planted leaf of every row."""
    chrom, pos = genome(n)
    leaf = leaves_of(chrom, pos, seed)
    rng = np.random.default_rng(seed)
    cents = {name: centres(d, rng) for name, d in LAYERS.items()}
    specs = [LayerSpec(name, d, pool="max", map_shape=None) for name, d in LAYERS.items()]
    w = StoreWriter.open(path, {"inputs": {"bench": "bench_scale", "rows": n, "seed": seed,
                                           "layers": list(LAYERS)}}, specs)
    for s in range(0, n, BATCH):
        sl = slice(s, min(s + BATCH, n))
        lf = leaf[sl]
        layers = {name: c[lf] + rng.standard_normal((len(lf), c.shape[1]), np.float32)
                  for name, c in cents.items()}
        w.append(obs_batch(sl, chrom, pos, leaf, rng), layers)
    w.finalize()
    return leaf


def write_bed(path: Path, n: int, seed: int) -> int:
    """The 50 kb segments of the planted leaf as a BED; returns how many rows it covers."""
    chrom, pos = genome(n)
    leaf = leaves_of(chrom, pos, seed)
    hit = leaf == PLANTED_LEAF
    seg = pd.DataFrame({"chrom": chrom[hit], "start": pos[hit] // SEGMENT_BP * SEGMENT_BP})
    seg = seg.drop_duplicates()
    seg["end"] = seg["start"] + SEGMENT_BP
    seg.to_csv(path, sep="\t", header=False, index=False)
    return int(hit.sum())


def commands(store: Path, work: Path, backend: list[str]) -> dict[str, list[str]]:
    s, sk = str(store), backend
    return {
        "info": ["info", s],
        "annotate --bed": ["annotate", s, "--bed", str(work / "planted.bed"), "--name",
                           "planted", "--overwrite"],
        "kmeans": ["cluster", s, "--method", "kmeans", "--layer", "mixed5", "--k", "8",
                   "--run", "km", "--overwrite", *sk],
        "hkmeans": ["cluster", s, "--method", "hkmeans", "--layer", "mixed5", "--k", "3",
                    "--split", "auto", "--run", "hkm", "--overwrite", *sk],
        "hspectral": ["cluster", s, "--method", "hspectral", "--layer", "mixed5", "--k", "3",
                      "--split", "auto", "--run", "hsp", "--overwrite", *sk],
        "multilayer": ["cluster", s, "--method", "multilayer", "--layers", "mixed5,mixed10",
                       "--k", "8", "--run", "ml", "--overwrite", *sk],
        "umap": ["reduce", s, "--method", "umap", "--layer", "mixed5", "--run", "um",
                 "--overwrite", *sk],
        "apply": ["apply", s, "--run", "km", "--to", s, "--name", "km-again", "--overwrite",
                  *sk],
        "enrich": ["enrich", s, "--run", "km", "--by", "planted"],
        "probe": ["probe", s, "--concepts", "planted,depth", "--overwrite", "--no-progress"],
        "report": ["report", s, "--out", str(work / "report.html"), "--thumbnails", "0"],
    }


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, val = line.partition(":")
            if key in ("VmRSS", "RssAnon"):
                out[key] = int(val.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


def run_measured(args: list[str], log: Path, timeout: float) -> dict:
    """Run ``cli.py args``; time, peak RSS (wait4) and peak sampled RssAnon."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        p = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *args], cwd=ROOT, env=env,
                             stdout=fh, stderr=subprocess.STDOUT)
        anon = rss = 0
        while True:
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid == p.pid:
                break
            st = _status(p.pid)
            anon, rss = max(anon, st.get("RssAnon", 0)), max(rss, st.get("VmRSS", 0))
            if time.perf_counter() - t0 > timeout:
                p.kill()
            time.sleep(0.1)
    p.returncode = os.waitstatus_to_exitcode(status)
    return {"seconds": round(time.perf_counter() - t0, 1), "rc": p.returncode,
            "peak_rss_gb": round(max(rss, usage.ru_maxrss * 1024) / 1e9, 2),
            "peak_anon_gb": round(anon / 1e9, 2), "log": str(log)}


def checks(store: Path, leaf: np.ndarray) -> dict:
    from sklearn.metrics import adjusted_rand_score

    from probing.enrich import best_clusters, enrich

    st = open_store(store)
    out = {}
    for run in ("km", "hkm", "hsp", "ml"):
        if run in st.runs:
            labels = st.run_obs(st.load_run(run))["cluster"].to_numpy()
            out[f"ARI {run}"] = round(float(adjusted_rand_score(leaf, labels)), 4)
    if "km" in st.runs and "planted" in st.obs_dtypes.index:
        best = best_clusters(enrich(st, "km", ["planted"]).table).iloc[0]
        out["enrich planted"] = {"cluster": str(best["cluster"]), "f1": round(best["f1"], 4),
                                 "q": float(best["q"])}
    return out


def compare_kmeans(rows: int, seed: int, k: int = 8, d: int = 50, n_init: int = 10) -> None:
    """k-means engines of ``--backend dask`` on one in-memory fit sample (planted blobs):
    FAISS in-process (what ``--backend dask`` runs) vs dask-ml on a LocalCluster of one
    worker per core, with scikit-learn (the in-process backend) for reference."""
    from distributed import Client, LocalCluster
    from sklearn.metrics import adjusted_rand_score

    from probing.analysis.backends import SklearnBackend
    from probing.analysis.cluster import nearest
    from probing.analysis.dask_backend import dask_ml_kmeans, faiss_kmeans, local_workers

    rng = np.random.default_rng(seed)
    truth = rng.integers(0, k, rows)
    x = (rng.normal(0, 4, (k, d))[truth] + rng.normal(size=(rows, d))).astype(np.float32)
    print(f"\nk-means k={k} on {rows:,} x {d} (n_init {n_init} where the engine has it)\n")
    print("| engine | time (s) | ARI vs planted |\n|---|---|---|")

    def timed(name, fit):
        t = time.perf_counter()
        centres = fit()
        ari = adjusted_rand_score(truth, nearest(x, centres))
        print(f"| {name} | {time.perf_counter() - t:.1f} | {ari:.3f} |", flush=True)

    timed("faiss (in-process, 1 thread: the default)",
          lambda: faiss_kmeans(x, k, seed, n_init, 300))
    timed("scikit-learn (in-process)", lambda: SklearnBackend().kmeans(x, k, seed, n_init))
    with LocalCluster(n_workers=local_workers(), threads_per_worker=1,
                      dashboard_address=None) as lc, Client(lc):
        timed(f"dask-ml ({local_workers()} workers, k-means||, 1 init)",
              lambda: dask_ml_kmeans(x, k, seed, 300))
    cores = local_workers()
    timed(f"faiss (in-process, {cores} threads)",
          lambda: faiss_kmeans(x, k, seed, n_init, 300, threads=cores))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--work", type=Path, required=True, help="where the STORE is written")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", help="comma list of commands (default: all)")
    ap.add_argument("--reuse", action="store_true", help="reuse a STORE already in --work")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per command")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--backend", default="sklearn",
                    help="analysis backend of cluster/reduce/apply: sklearn (in-process) or "
                         "dask (a LocalCluster of one worker per core, or --scheduler)")
    ap.add_argument("--scheduler", help="--backend dask: a running scheduler's address")
    ap.add_argument("--kmeans-engines", action="store_true",
                    help="only compare k-means engines (FAISS, dask-ml, scikit-learn) on a "
                         "--rows x 50 fit sample, then exit")
    a = ap.parse_args()
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs); python {platform.python_version()}")
    if a.kmeans_engines:
        compare_kmeans(a.rows, a.seed)
        return
    backend = ["--backend", a.backend] + (["--scheduler", a.scheduler] if a.scheduler else [])
    work = a.work / f"rows{a.rows}"
    store = work / "STORE"
    if not (a.reuse and (store / "store.json").is_file()):
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        t = time.perf_counter()
        write_store(store, a.rows, a.seed)
        print(f"wrote {a.rows:,}-row STORE in {time.perf_counter() - t:.0f}s: {store}")
    planted = write_bed(work / "planted.bed", a.rows, a.seed)
    chrom, pos = genome(a.rows)
    leaf = leaves_of(chrom, pos, a.seed)
    cmds = commands(store, work, backend)
    names = a.only.split(",") if a.only else list(cmds)
    results = {}
    print(f"\n{a.rows:,} rows, planted BED covers {planted:,}\n")
    print("| command | time (s) | peak RSS (GB) | peak RssAnon (GB) | rc |\n|---|---|---|---|---|")
    for name in names:
        r = run_measured(cmds[name], work / f"{name.split()[0]}.log", a.timeout)
        results[name] = r
        print(f"| {name} | {r['seconds']} | {r['peak_rss_gb']} | {r['peak_anon_gb']} | "
              f"{r['rc']} |", flush=True)
    total = sum(r["seconds"] for r in results.values())
    print(f"\ntotal {total:.0f}s ({total / 60:.1f} min)")
    found = checks(store, leaf)
    for k, v in found.items():
        print(f"{k}: {v}")
    if a.json:
        a.json.write_text(json.dumps({"rows": a.rows, "cpu": cpu_model(), "commands": results,
                                      "checks": found, "total_s": total}, indent=1))


if __name__ == "__main__":
    main()
