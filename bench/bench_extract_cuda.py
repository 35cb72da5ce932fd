"""CUDA benchmark: end-to-end ``probing.extract`` from gzipped TFRecord shards on a GPU.

Measures, on the same synthetic (or given) examples:

1. model-only forward throughput on a device-resident batch (NHWC input -> channels_last
   NCHW view, weights in channels_last), fp32 / bf16 as extraction casts the model, optionally
   ``torch.compile``
   -- the ceiling the pipeline should approach;
2. ``extract`` end to end (gz shards -> worker decode + pileup attributes -> pinned H2D ->
   forward with capture hooks -> STORE commits) for fp32 and bf16, with its data-loading
   share. The gap between (1) and (2) is what the pipeline costs.

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


def model_only(bundle: Path, batch: int, dtype: str, compile_: bool, iters: int = 20) -> float:
    import torch

    import dvtorch

    # As extraction runs it: the model in the target dtype, raw uint8 pixels scaled inside
    # (float input would add the model's range check, two syncs and graph breaks under
    # torch.compile), IEEE fp32 convolutions and cuDNN autotuning.
    from probing.extract import _cudnn_flags

    model = dvtorch.load(bundle, device="cuda", dtype=dtype).to(memory_format=torch.channels_last)
    shape = tuple(model.bundle_meta["input_shape"])
    x = torch.randint(0, 256, (batch, *shape), dtype=torch.uint8, device="cuda")
    fwd = torch.compile(model) if compile_ else model
    with torch.inference_mode(), _cudnn_flags(torch.device("cuda"), dtype):
        for _ in range(3):
            fwd(x)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            fwd(x)
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
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (model only)")
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("bench_extract_cuda: no CUDA device visible to torch "
              f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
              "run bench/bench_extract_cpu.py on CPU-only machines", file=sys.stderr)
        raise SystemExit(2)

    import dvtorch
    from bench.bench_extract_cpu import synth_examples
    from probing.extract import extract

    work = Path(tempfile.mkdtemp(prefix="bench_extract_cuda_"))
    try:
        bundle = args.bundle
        if bundle is None:
            bundle = work / "bundle"
            dvtorch.reference_bundle(bundle, seed=0)
        spec = args.examples or synth_examples(work / "examples", args.n, shards=8)
        print(f"{torch.cuda.get_device_name()} torch {torch.__version__} batch {args.batch_size} "
              f"workers {args.workers} examples {spec}")
        for dt in ("fp32", "bf16"):
            print(f"model only {dt}: {model_only(bundle, args.batch_size, dt, False):.0f} ex/s")
            if args.compile:
                print(f"model only {dt} + torch.compile: "
                      f"{model_only(bundle, args.batch_size, dt, True):.0f} ex/s")
        layers = args.layers.split(",")
        res = {}
        for dt in ("fp32", "bf16"):
            extract(bundle, spec, work / f"warm_{dt}", layers=layers, device="cuda", dtype=dt,
                    batch_size=args.batch_size, workers=0, limit=args.batch_size,
                    progress=False)
            s = extract(bundle, spec, work / f"store_{dt}", layers=layers, device="cuda",
                        dtype=dt, batch_size=args.batch_size, workers=args.workers,
                        progress=False)
            e = s.meta["extraction"]
            res[dt] = s
            print(f"extract {dt}: {s.n} ex in {e['seconds']:.1f} s = {e['examples_per_s']:.0f} "
                  f"ex/s, data loading {100 * e['data_loading_share']:.0f}% of wall")
        a, b = res["fp32"].layer(layers[0]), res["bf16"].layer(layers[0])
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)
        print(f"bf16 vs fp32 {layers[0]} cosine: mean {cos.mean():.5f} min {cos.min():.5f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
