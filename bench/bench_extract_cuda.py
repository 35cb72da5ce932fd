"""CUDA benchmark: end-to-end ``probing.extract`` from gzipped TFRecord shards on a GPU.

Measures, on the same synthetic (or given) examples:

1. engine-only throughput on a device-resident batch: the CUDA engine
   (:func:`dvtorch.make_engine`: channels-last weights, fp32 with TF32 off / bf16, cuDNN
   autotuning, the layers captured and pooled), optionally through ``torch.compile``
   -- the ceiling the pipeline should approach;
2. ``extract`` end to end (gz shards -> worker decode + pileup attributes -> pinned H2D ->
   the engine -> STORE commits) for fp32 and bf16, with its data-loading share; with
   ``--compile`` also the same runs with ``ExtractConfig(compile=True)`` (their time
   includes the compilation, which a long run pays once). The gap between (1) and (2) is
   what the pipeline costs.

Needs a CUDA device; without one it exits with status 2 and says so. Run::

    .venv/bin/python bench/bench_extract_cuda.py --n 4096 --batch-size 256 --workers 8 [--compile]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def engine_only(bundle: Path, layers: list[str], batch: int, dtype: str, compile_: bool,
                iters: int = 20) -> float:
    """Examples/s of the CUDA engine on one device-resident uint8 batch (what extract runs,
    without loading, copying or storing)."""
    import torch

    import dvtorch

    model = dvtorch.load(bundle, device="cpu")
    engine = dvtorch.make_engine(model, layers, pool="max", device="cuda", dtype=dtype,
                                 batch_size=batch, compile=compile_)
    x = torch.randint(0, 256, (batch, *model.input_shape), dtype=torch.uint8, device="cuda")
    for _ in range(3):  # cuDNN autotuning, compilation
        engine(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        engine(x)
    torch.cuda.synchronize()
    return batch * iters / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--examples")
    ap.add_argument("--layers", default="mixed5,mixed10")
    ap.add_argument("--compile", action="store_true",
                    help="also time torch.compile (engine only and extract end to end)")
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("bench_extract_cuda: no CUDA device visible to torch "
              f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
              "run bench/bench_extract_cpu.py on CPU-only machines", file=sys.stderr)
        raise SystemExit(2)

    import dvtorch
    from bench.bench_extract_cpu import synth_examples
    from probing.extract import ExtractConfig, extract

    work = Path(tempfile.mkdtemp(prefix="bench_extract_cuda_"))
    try:
        bundle = args.bundle
        if bundle is None:
            bundle = work / "bundle"
            dvtorch.reference_bundle(bundle, seed=0)
        spec = args.examples or synth_examples(work / "examples", args.n, shards=8)
        layers = args.layers.split(",")
        print(f"{torch.cuda.get_device_name()} torch {torch.__version__} batch {args.batch_size} "
              f"workers {args.workers} examples {spec}")
        compiles = (False, True) if args.compile else (False,)
        for dt in ("fp32", "bf16"):
            for c in compiles:
                rate = engine_only(bundle, layers, args.batch_size, dt, c)
                print(f"engine only {dt}{' + torch.compile' if c else ''}: {rate:.0f} ex/s")

        def config(out: Path, dtype: str, **options) -> ExtractConfig:
            return ExtractConfig(bundle, spec, out, layers=layers, device="cuda", dtype=dtype,
                                 batch_size=args.batch_size, **options)

        res = {}
        for dt in ("fp32", "bf16"):
            for c in compiles:
                name = f"{dt}{'_compile' if c else ''}"
                if not c:  # cuDNN autotuning and CUDA start-up, not timed
                    extract(config(work / f"warm_{name}", dt, workers=0, limit=args.batch_size),
                            progress=False)
                s = extract(config(work / f"store_{name}", dt, workers=args.workers, compile=c),
                            progress=False)
                e = s.meta["extraction"]
                res[name] = s
                print(f"extract {dt}{' + torch.compile' if c else ''}: {s.n} ex in "
                      f"{e['seconds']:.1f} s = {e['examples_per_s']:.0f} ex/s, data loading "
                      f"{100 * e['data_loading_share']:.0f}% of wall")
        for other in [k for k in res if k != "fp32"]:
            a, b = res["fp32"].layer(layers[0]), res[other].layer(layers[0])
            cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)
            print(f"{other} vs fp32 {layers[0]} cosine: mean {cos.mean():.5f} min {cos.min():.5f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
