"""Benchmark ``dvprobe explain`` (integrated gradients), ``ablate`` (channel ablation) and
``tcav`` (concept sensitivity), and measure IG's convergence against the step count.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_explain.py              # issue 24's sizes
    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_explain.py --ig 5 --ablate 100 --tcav 100
    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_explain.py --ig 0 --ablate 0 --tcav 0 \
        --panels 0 --convergence 2 --steps-list 25,50,100,200 --outputs probability
    .venv/bin/python bench/bench_explain.py --device cuda                  # on a GPU

Model: the untrained reference bundle (seeded, DeepVariant's WGS input 100x221x7 unless
``--shape``); timings do not depend on the weights. Examples: seeded WGS-like pileups (5
reference rows, 15-95 reads, alt reads differing at the centre) written as a gzip TFRecord.
IG: ``--ig`` examples at the default steps, the predicted genotype's probability, the
blank-reads baseline, no PNG panels (rendering is timed apart: ``--panels``). Ablation:
``--ablate`` examples x every channel, zero neutral, 1,000 bootstrap resamples. Prints the
CPU (dvtorch.engine.cpu_features.describe()), each time and examples per second, and, first
and last, the load average and the plain model's forward rate (fp32, batch 32) as a yardstick:
on a shared machine the times scale with it (docs/performance.md has the rate of a free
machine), so a figure taken under load can be read against it. TCAV:
``--tcav`` examples extracted into a STORE (mixed5 and mixed7, max-pooled), two planted
yes/no concepts, 10 random CAVs each, derivatives counted on every example; the time of the
extraction is not counted. Convergence: ``--convergence`` examples at each of
``--steps-list``, the probability of the call and its logit: the median and worst relative
convergence delta, the share within 1 %, and seconds per example.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test fixtures

import torch  # noqa: E402
from test_explain import pileups, write_examples  # noqa: E402  (tests/ on sys.path)

import dvtorch  # noqa: E402
from dvtorch.engine.cpu_features import describe  # noqa: E402
from probing.ablate import ablate  # noqa: E402
from probing.explain import DEFAULT_STEPS, explain  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ig", type=int, default=50, help="examples for integrated gradients")
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--ablate", type=int, default=1000, help="examples for ablation")
    ap.add_argument("--shape", default="100,221,7")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--panels", type=int, default=3, help="PNG panels to time (0: none)")
    ap.add_argument("--tcav", type=int, default=2000, help="examples for TCAV (0: none)")
    ap.add_argument("--convergence", type=int, default=0, help="examples for the "
                    "convergence-vs-steps table (0: none)")
    ap.add_argument("--steps-list", default="25,50,100,200")
    ap.add_argument("--outputs", default="probability,logit", help="outputs to converge")
    args = ap.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))

    print(f"{describe()}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, device {args.device}")
    with tempfile.TemporaryDirectory() as tmp:
        bundle = dvtorch.reference_bundle(Path(tmp) / "b", seed=0, input_shape=shape)
        model = dvtorch.load(bundle, device=args.device)
        print(_yardstick(model, shape, args.device), flush=True)
        n = max(args.ig, args.ablate, args.tcav, args.convergence, args.panels)
        spec = write_examples(Path(tmp) / "ex.tfrecord.gz", pileups(n, seed=0, shape=shape))
        if args.ig:
            t0 = time.perf_counter()
            res = _ig(model, spec, args)
            s = time.perf_counter() - t0
            bad = sum(not e.converged for e in res)
            print(f"IG: {len(res)} examples x {args.steps} steps {shape}: {s:.1f} s, "
                  f"{len(res) / s:.3f} examples/s ({bad} with |delta| > 1 % of the change)", flush=True)
        if args.panels:
            t0 = time.perf_counter()
            _ig(model, spec, args, n=args.panels, out=Path(tmp) / "panels", steps=1)
            s = time.perf_counter() - t0
            print(f"panels: {args.panels} (IG at 1 step + npz + PNG): {s:.1f} s", flush=True)
        if args.ablate:
            t0 = time.perf_counter()
            r = ablate(model, spec, n=args.ablate, device=args.device, progress=False,
                       batch_size=64)
            s = time.perf_counter() - t0
            c = len(r.channels)
            print(f"ablation: {len(r.keys)} examples x {c} channels {shape}: {s:.1f} s, "
                  f"{len(r.keys) / s:.1f} examples/s ({len(r.keys) * (c + 1) / s:.1f} "
                  "forwards/s)", flush=True)
        if args.tcav:
            _tcav(bundle, spec, Path(tmp) / "store", args)
        if args.convergence:
            _convergence(model, spec, args)
        print(_yardstick(model, shape, args.device), flush=True)


def _yardstick(model, shape, device: str) -> str:
    """The load average and the model's forward rate now (fp32, batch 32, two calls after
    one untimed call of the same batch: the first call of a batch size prepares kernels)."""
    x = torch.zeros(32, *shape, device=device)
    with torch.no_grad():
        model(x)
        t0 = time.perf_counter()
        model(x)
        model(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    rate = 64 / (time.perf_counter() - t0)
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return f"load average {load}; plain-model forward {rate:.1f} examples/s (fp32, batch 32)"


def _tcav(bundle, spec, store_path, args) -> None:
    import numpy as np

    from probing.extract import ExtractConfig, extract
    from probing.tcav import tcav

    st = extract(ExtractConfig(bundle, spec, store_path, layers=["mixed5", "mixed7"],
                               device=args.device, limit=args.tcav), progress=False)
    rng = np.random.default_rng(0)
    st.add_obs({"concept_a": rng.random(st.n) < 0.2, "concept_b": rng.random(st.n) < 0.1})
    t0 = time.perf_counter()
    res = tcav(st, concepts=["concept_a", "concept_b"], n_examples=st.n, n_random=10,
               block_bp=0, device=args.device, batch_size=16, progress=False)
    s = time.perf_counter() - t0
    print(f"TCAV: 2 layers x 2 concepts x 10 random CAVs, {st.n} examples: {s:.1f} s, "
          f"{st.n / s:.2f} examples/s ({len(res.scores)} CAV scores)", flush=True)


def _convergence(model, spec, args) -> None:
    import numpy as np

    from probing.explain import Selection

    print("steps  output       median |delta|/change  worst  within 1 %  s/example")
    for steps in (int(v) for v in args.steps_list.split(",")):
        for output in args.outputs.split(","):
            t0 = time.perf_counter()
            res = explain(model, spec, Selection(n=args.convergence), steps=steps,
                          output=output, device=args.device, batch_size=args.batch_size,
                          progress=False)
            s = (time.perf_counter() - t0) / len(res)
            rel = np.array([e.relative_delta for e in res])
            ok = np.mean([e.converged for e in res])
            print(f"{steps:5d}  {output:11s}  {np.median(rel):21.3%}  {rel.max():5.1%}  "
                  f"{ok:10.0%}  {s:9.1f}", flush=True)


def _ig(model, spec, args, n=None, out=None, steps=None):
    from probing.explain import Selection

    return explain(model, spec, Selection(n=n or args.ig), steps=steps or args.steps,
                   device=args.device, batch_size=args.batch_size, out=out, progress=False)


if __name__ == "__main__":
    main()
