"""Concept recovery on the simulation: how well does one cluster capture each planted concept?

For each planted concept (LINE copies, segdup, low mappability, low complexity, CN gain,
mosaic and germline variants) and each clustering (k-means k=10 on mixed5, the multi-layer
pipeline k=12), the best single cluster (max F1 of purity and capture, see
``probing.enrich.best_clusters``) is reported as the blog reports LINEs: "cluster 2 is 83.9 %
LINE and holds 61.3 % of all LINE examples". A permutation baseline (cluster labels shuffled,
same sizes) says what chance alone gives.

    OMP_NUM_THREADS=2 python bench/bench_concepts.py --out /tmp/bench-concepts [--model BUNDLE]

Runs ``dvprobe demo`` per seed (finished steps are reused) and prints a markdown table. With
no ``--model`` the network is the UNTRAINED seeded reference: any recovery then comes from how
an arbitrary Inception-v3 responds to pileup statistics, which is the baseline a trained
DeepVariant model has to beat.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from probing.demo import KMEANS_RUN, MULTILAYER_RUN, DemoConfig, run_demo  # noqa: E402
from probing.enrich import best_clusters, enrichment_table  # noqa: E402
from probing.store import open_store  # noqa: E402


def permutation_baseline(labels: np.ndarray, attrs: dict[str, np.ndarray], seed: int,
                         reps: int = 20) -> pd.DataFrame:
    """Mean best-cluster purity/capture over ``reps`` shuffles of the cluster labels."""
    rng = np.random.default_rng(seed)
    tables = [best_clusters(enrichment_table(rng.permutation(labels), attrs))
              for _ in range(reps)]
    cat = pd.concat(tables)
    return cat.groupby("attribute", sort=False)[["share_of_cluster",
                                                  "share_of_attribute"]].mean()


RUN_LABELS = {KMEANS_RUN: "k-means 10, mixed5", MULTILAYER_RUN: "multi-layer, k=12"}


def _pct(v: float) -> str:
    return f"{100 * v:.1f} %"


def per_seed_markdown(df: pd.DataFrame) -> str:
    lines = ["| run | concept | examples | best cluster (size) | purity | capture | "
             "chance purity | chance capture | q |", "|---|---|---|---|---|---|---|---|---|"]
    for r in df.itertuples(index=False):
        lines.append(f"| {RUN_LABELS[r.run]} (seed {r.seed}) | {r.concept} | {r.examples} | "
                     f"{r.cluster} ({r.size}) | {_pct(r.purity)} | {_pct(r.capture)} | "
                     f"{_pct(r.chance_purity)} | {_pct(r.chance_capture)} | {r.q:.1e} |")
    return "\n".join(lines)


def summary_markdown(df: pd.DataFrame) -> str:
    """Mean over seeds (min-max in brackets) of purity and capture per concept and run."""
    def span(v: pd.Series) -> str:
        return (f"{100 * v.mean():.0f} % ({100 * v.min():.0f}-{100 * v.max():.0f})"
                if len(v) > 1 else _pct(v.iloc[0]))

    runs = list(dict.fromkeys(df["run"]))
    head = "| concept | examples (mean) | " + " | ".join(
        f"{RUN_LABELS[r]}: purity | capture" for r in runs) + " | chance purity | capture |"
    lines = [head, "|" + "---|" * (2 + 2 * len(runs) + 2)]
    for concept, g in df.groupby("concept", sort=False):
        cells = [concept, f"{g.groupby('seed')['examples'].first().mean():.0f}"]
        for r in runs:
            gr = g[g["run"] == r]
            cells += [span(gr["purity"]), span(gr["capture"])]
        gk = g[g["run"] == runs[0]]
        cells += [_pct(gk["chance_purity"].mean()), _pct(gk["chance_capture"].mean())]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench-concepts"))
    ap.add_argument("--model", type=Path, default=None, help="converted DeepVariant BUNDLE")
    ap.add_argument("--seeds", default="0", help="comma list of simulation/analysis seeds")
    ap.add_argument("--length", type=int, default=400_000)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--from-csv", type=Path, default=None,
                    help="only re-print the tables of an earlier run's concept_recovery.csv")
    args = ap.parse_args()
    if args.from_csv:
        df = pd.read_csv(args.from_csv)
        print(per_seed_markdown(df))
        print()
        print(summary_markdown(df))
        return

    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        res = run_demo(DemoConfig(args.out / f"seed{seed}", model=args.model, seed=seed,
                                  length=args.length, dtype=args.dtype), progress=False)
        store = open_store(res.store)
        for run, table in res.recovery.items():
            labels = store.load_run(run).obs["cluster"].astype(str).to_numpy()
            attrs = {a: store.obs[a].to_numpy(bool) for a in table["attribute"]}
            base = permutation_baseline(labels, attrs, seed)
            for r in table.itertuples(index=False):
                rows.append({"seed": seed, "run": run, "concept": r.attribute,
                             "examples": r.total, "cluster": r.cluster, "size": r.n,
                             "purity": r.share_of_cluster, "capture": r.share_of_attribute,
                             "chance_purity": base.loc[r.attribute, "share_of_cluster"],
                             "chance_capture": base.loc[r.attribute, "share_of_attribute"],
                             "q": r.q})
        print(f"seed {seed}: {res.n_examples} examples, mosaic truth set: "
              f"{res.mosaic_landing}; model {'UNTRAINED' if res.untrained else args.model}",
              flush=True)
    df = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    csv = args.out / "concept_recovery.csv"
    df.to_csv(csv, index=False)
    print()
    print(per_seed_markdown(df))
    print()
    print(summary_markdown(df))
    print(f"\nwritten {csv}")


if __name__ == "__main__":
    main()
