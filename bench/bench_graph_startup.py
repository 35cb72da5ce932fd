"""Start-up of the ``--engine graph`` extraction engine: what its first batches cost beyond
the steady rate.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_graph_startup.py --batch-size 32 --reps 2

Why: ``dvtorch.graph.GraphForward`` traces and freezes a program per input size, lets
TorchScript's executor profile and fuse it on its first calls, and runs each program's
first ``CHECK_CALLS`` calls one at a time against the eager forward (in float32) before it
trusts it. The README quotes that start-up; this measures it, per dtype, in fresh engines:
the wall time of the first ``CHECK_CALLS`` batches (trace included) minus what the same
number of batches takes once the engine runs whole batches on its worker threads
(``depth + 1`` in flight, as ``dvprobe extract`` keeps them). Pileup-like synthetic
examples from ``bench_extract_cpu``; the seeded reference model.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _steady_seconds_per_batch(engine, batches: list[torch.Tensor], n: int) -> float:
    in_flight = []
    t0 = time.perf_counter()
    for i in range(n):
        in_flight.append(engine.submit(batches[i % len(batches)]))
        if len(in_flight) > engine.depth:
            in_flight.pop(0).result()
    for pending in in_flight:
        pending.result()
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--reps", type=int, default=2, help="fresh engines per dtype")
    ap.add_argument("--steady", type=int, default=12, help="batches timed once started")
    args = ap.parse_args()

    from bench_extract_cpu import _pileup

    import dvtorch
    from dvtorch import graph as dvgraph
    from dvtorch.cpu import describe

    if not dvgraph.available():
        sys.exit("this torch build has no oneDNN Graph")
    print(describe())
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"batch {args.batch_size}")
    rng = np.random.default_rng(0)
    shape = (100, 221, 7)
    batches = [torch.from_numpy(np.stack([_pileup(rng, shape) for _ in range(args.batch_size)]))
               for _ in range(4)]
    with tempfile.TemporaryDirectory() as tmp:
        bundle = dvtorch.reference_bundle(Path(tmp) / "model", seed=0)
        for dtype in (None, torch.bfloat16):
            label = "bf16" if dtype is not None else "fp32"
            costs = []
            for rep in range(args.reps):
                model = dvtorch.load(bundle, device="cpu", dtype=dtype)
                dvtorch.optimize_for_inference(model, dtype=dtype, batch_size=args.batch_size)
                engine = dvgraph.GraphForward(model, ["mixed5", "mixed10"], "max")
                with torch.inference_mode():
                    t0 = time.perf_counter()
                    for i in range(dvgraph.CHECK_CALLS):
                        engine.submit(batches[i % len(batches)]).result()
                    first = time.perf_counter() - t0
                    per = _steady_seconds_per_batch(engine, batches, args.steady)
                cost = first - dvgraph.CHECK_CALLS * per
                costs.append(cost)
                print(f"{label} engine {rep + 1}: first {dvgraph.CHECK_CALLS} batches "
                      f"{first:.2f} s, then {1000 * per:.0f} ms per batch -> start-up "
                      f"{cost:.2f} s" + (f" (FELL BACK: {engine.fallback_reason})"
                                         if engine.fallback_reason else ""), flush=True)
            print(f"{label} start-up: median {statistics.median(costs):.2f} s "
                  f"(range {min(costs):.2f}-{max(costs):.2f})")


if __name__ == "__main__":
    main()
