"""Benchmark: one extraction as 1 process vs the local launcher (``--procs N`` on the CPU,
``--gpus`` on GPUs), end to end through the CLI.

Each contender is the real command (``python cli.py extract ...``) on the same gzipped
shards, so the figures include what a user pays: Python and torch start-up, model load and
engine set-up in every process, loading, the forward passes and the commits. Rounds are
interleaved (1 process, then the launcher, then again) so a noisy moment on a shared machine
hits both alike; medians are reported. Two rates per run:

* ``wall``: examples / wall time of the whole command;
* ``loop``: examples / the longest part's batch-loop time from store.json (start-up
  excluded), what a whole-genome run (hours) converges to.

The launcher's STORE is checked against the single process's one (same rows, same order;
bit-equal float32 on the CPU). The CPU model (and GPUs) are printed first.

Run (CPU, 2 processes)::

    .venv/bin/python bench/bench_launch.py --n 1024 --procs 2 --rounds 3

GPUs (1 GPU vs ``--gpus all``)::

    python bench/bench_launch.py --n 16384 --gpus all --batch-size 256 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import cpu_model  # bench/machine.py

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))




def gpu_names() -> list[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def run(argv: list[str], out: Path) -> dict:
    """One command, timed; its STORE's extraction summary (per part for a parted one)."""
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    meta = json.loads((out / "store.json").read_text())
    if "parts" in meta:
        parts = sorted((out / "parts").glob("part-*-of-*/store.json"))
        runs = [json.loads(p.read_text())["extraction"] for p in parts]
    else:
        runs = [meta["extraction"]]
    n = sum(r["n"] for r in runs)
    return {"n": n, "wall": wall, "wall_ex_s": n / wall,
            "loop_ex_s": n / max(r["seconds"] for r in runs), "procs": len(runs)}


def same_store(a: Path, b: Path, exact: bool) -> str:
    from probing.store import open_store

    sa, sb = open_store(a), open_store(b)
    if not sa.obs["key"].equals(sb.obs["key"]):
        return "DIFFERENT rows or order"
    worst = 0.0
    for name in sa.layers:
        x, y = np.asarray(sa.layer(name)), np.asarray(sb.layer(name))
        if exact and x.tobytes() != y.tobytes():
            return f"layer {name} NOT bit-equal"
        worst = max(worst, float(np.abs(x - y).max() / max(np.abs(x).max(), 1e-30)))
    return "same rows, same order, " + ("bit-equal" if exact else f"max rel diff {worst:.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1024, help="synthetic examples")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--procs", type=int, help="CPU: N processes vs 1")
    ap.add_argument("--gpus", help="GPUs: all or 0,1,..; 1 GPU vs these")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--layers", default="mixed5,mixed10")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--examples", help="examples spec (default: synthetic)")
    ap.add_argument("--bundle", type=Path, help="BUNDLE (default: untrained reference)")
    args = ap.parse_args()
    if (args.procs is None) == (args.gpus is None):
        raise SystemExit("give --procs N or --gpus all|0,1,..")

    import dvtorch
    from bench.bench_extract_cpu import synth_examples

    print(f"CPU: {cpu_model()} ({len(os.sched_getaffinity(0))} usable cores)")
    gpus = gpu_names()
    if args.gpus:
        print(f"GPUs: {', '.join(gpus) or 'none found'}")
    work = Path(tempfile.mkdtemp(prefix="bench_launch_"))
    try:
        bundle = args.bundle or dvtorch.reference_bundle(work / "bundle", seed=0)
        spec = args.examples or synth_examples(work / "examples", args.n, shards=args.shards)
        common = [sys.executable, str(ROOT / "cli.py"), "extract", str(bundle), spec,
                  "--layers", args.layers, "--batch-size", str(args.batch_size),
                  "--dtype", args.dtype, "--no-progress"]
        one_dev = ["--device", "cpu"] if args.procs else ["--device", "cuda:0"]
        many = ["--procs", str(args.procs)] if args.procs else ["--gpus", args.gpus]
        label = f"--procs {args.procs}" if args.procs else f"--gpus {args.gpus}"
        print(f"{args.n if not args.examples else '?'} examples in {args.shards} shards, "
              f"batch {args.batch_size}, {args.dtype}, layers {args.layers}, "
              f"{args.rounds} round(s)")
        results: dict[str, list[dict]] = {"1 process": [], label: []}
        for r in range(args.rounds):
            results["1 process"].append(run(common + one_dev + ["--out", str(work / "one")],
                                            work / "one"))
            results[label].append(run(common + many + ["--out", str(work / "many")],
                                      work / "many"))
            print(f"round {r + 1}: " + "; ".join(
                f"{k}: {v[-1]['wall_ex_s']:.1f} ex/s wall, {v[-1]['loop_ex_s']:.1f} ex/s loop"
                for k, v in results.items()), flush=True)
        med = {k: {m: statistics.median(x[m] for x in v) for m in ("wall_ex_s", "loop_ex_s")}
               for k, v in results.items()}
        for k, v in med.items():
            print(f"{k:>12}: {v['wall_ex_s']:8.1f} ex/s wall   {v['loop_ex_s']:8.1f} ex/s loop")
        for m in ("wall_ex_s", "loop_ex_s"):
            print(f"speed-up {label} / 1 process ({m.split('_')[0]}): "
                  f"{med[label][m] / med['1 process'][m]:.2f}x")
        print("STOREs: " + same_store(work / "one", work / "many", exact=bool(args.procs)))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
