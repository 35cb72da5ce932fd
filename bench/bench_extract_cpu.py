"""CPU benchmark: ``probing.extract`` (PyTorch fp32 / bf16) vs onnxruntime, end to end.

Both sides read the same gzipped TFRecord shards through the same loader
(:class:`probing.loader.ExampleBatches`: same batches, same worker processes), so the
comparison is of the whole pipeline, not of a model call on a pre-made tensor. Reported:
examples/s for each, the share of wall time spent waiting for data, and the cosine
similarity of bf16 vs fp32 max-pooled mixed5 rows (target >= 0.999). The last line is the
ratio line (targets: fp32 >= 1.0x onnxruntime, bf16 >= 2x onnxruntime fp32).

The ONNX model: a bundle converted from TensorFlow ships ``model.onnx`` (the tf2onnx graph,
softmax output only); otherwise the native model is exported with
``torch.onnx.export(dynamo=False)`` returning softmax + max-pooled mixed5 / mixed10, i.e.
the same outputs extraction stores. The output says which one ran.

Run (2 threads, synthetic examples written to a temp dir)::

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_extract_cpu.py --n 128 --batch-size 32
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def synth_examples(d: Path, n: int, shards: int = 2, seed: int = 0) -> str:
    """``n`` pileup-like examples (reference band + variable read rows) in gz shards."""
    from probing.channels import WGS_CHANNELS, WGS_SHAPE
    from probing.examples import encode_example, write_example_info
    from probing.tfrecord import TFRecordWriter, shard_name

    rng = np.random.default_rng(seed)
    h, w, c = WGS_SHAPE
    base = str(d / "bench.tfrecord")
    per = (n + shards - 1) // shards
    for s in range(shards):
        path = shard_name(base, s, shards, ".gz")
        with TFRecordWriter(path) as wr:
            for i in range(s * per, min(n, (s + 1) * per)):
                img = np.zeros((h, w, c), dtype=np.uint8)
                rows = int(rng.integers(20, h))
                # per-read constant channels like real pileups (compress like real data)
                img[:rows] = rng.integers(1, 255, size=(rows, 1, c), dtype=np.uint8)
                img[:rows, : int(rng.integers(50, w))] = 0
                wr.write(encode_example(img, chrom="chr20", start=10_000 + 13 * i,
                                        end=10_001 + 13 * i, ref="A", alts=("G",),
                                        alt_allele_indices=(0,)))
        write_example_info(path, WGS_SHAPE, WGS_CHANNELS, "1.6.0")
    return f"{base}@{shards}.gz"


def onnx_model(bundle: Path, work: Path, layers: list[str]) -> tuple[bytes, str]:
    """The bundle's model.onnx, else an export of the native model with pooled layers."""
    if (bundle / "model.onnx").is_file():
        return (bundle / "model.onnx").read_bytes(), "bundle model.onnx (converted from TF; softmax only)"
    import torch

    import dvtorch
    from dvtorch.hooks import capture

    model = dvtorch.load(bundle, device="cpu")

    class WithLayers(torch.nn.Module):
        def __init__(self, m: torch.nn.Module):
            super().__init__()
            self.m = m

        def forward(self, x: torch.Tensor):
            with capture(self.m, layers, pool="max") as acts:
                p = self.m(x)
                return (p, *[acts[n] for n in layers])

    path = work / "native.onnx"
    shape = tuple(model.bundle_meta["input_shape"])
    torch.onnx.export(WithLayers(model).eval(), (torch.zeros((2, *shape)),), str(path),
                      input_names=["x"], output_names=["probs", *layers],
                      dynamic_axes={"x": {0: "n"}}, opset_version=17, dynamo=False)
    return path.read_bytes(), "torch.onnx.export(dynamo=False) of the native model (softmax + max-pooled layers)"


def run_ort(onnx_bytes: bytes, spec: str, shape, channels, *, batch_size: int, workers: int,
            threads: int) -> dict:
    import onnxruntime as ort

    from probing.loader import ExampleBatches, make_loader
    from probing.tfrecord import expand_spec

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(onnx_bytes, so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    files = [str(f) for f in expand_spec(spec)]
    # warm-up (not timed), like extract's first batch is a warm-up below
    sess.run(None, {name: np.zeros((batch_size, *shape), dtype=np.float32)})
    ds = ExampleBatches(files, batch_size=batch_size, shape=shape, channels=channels)
    t0 = time.perf_counter()
    wait = 0.0
    n = 0
    it = iter(make_loader(ds, workers=workers, pin_memory=False))
    while True:
        tw = time.perf_counter()
        b = next(it, None)
        wait += time.perf_counter() - tw
        if b is None:
            break
        # DeepVariant's (x - 128) / 128, done the cheap way (one allocation, in place;
        # exact, like dvtorch.preprocess): x / 128 - 1
        x = b.images.numpy().astype(np.float32)
        x *= 1.0 / 128.0
        x -= 1.0
        sess.run(None, {name: x})
        n += b.n
    dt = time.perf_counter() - t0
    return {"n": n, "seconds": dt, "ex_s": n / dt, "data_share": wait / dt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=128, help="synthetic examples (ignored with --examples)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bundle", type=Path, help="BUNDLE (default: untrained reference bundle)")
    ap.add_argument("--examples", help="examples spec (default: synthetic, written to a temp dir)")
    ap.add_argument("--layers", default="mixed5,mixed10")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    import torch

    import dvtorch
    from probing.extract import extract

    torch.set_num_threads(args.threads)
    layers = args.layers.split(",")
    work = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    try:
        bundle = args.bundle
        if bundle is None:
            bundle = work / "bundle"
            dvtorch.reference_bundle(bundle, seed=0)
        spec = args.examples or synth_examples(work / "examples", args.n)
        meta = dvtorch.load(bundle, device="cpu").bundle_meta
        shape, channels = tuple(meta["input_shape"]), meta.get("channels")
        print(f"torch {torch.__version__}, threads {args.threads}, workers {args.workers}, "
              f"batch {args.batch_size}, examples {spec}")

        res = {}
        for dt in ("fp32", "bf16"):
            # warm-up run (oneDNN primitive creation) on one batch, then the timed run
            extract(bundle, spec, work / f"warm_{dt}", layers=layers, device="cpu", dtype=dt,
                    batch_size=args.batch_size, workers=0, limit=args.batch_size,
                    progress=False)
            s = extract(bundle, spec, work / f"store_{dt}", layers=layers, device="cpu",
                        dtype=dt, batch_size=args.batch_size, workers=args.workers,
                        progress=False)
            e = s.meta["extraction"]
            res[dt] = {"n": s.n, "ex_s": e["examples_per_s"], "data_share": e["data_loading_share"],
                       "store": s}
            print(f"pytorch {dt}: {s.n} ex in {e['seconds']:.1f} s = {e['examples_per_s']:.1f} ex/s, "
                  f"data loading {100 * e['data_loading_share']:.0f}% of wall")
        onnx_bytes, what = onnx_model(bundle, work, layers)
        print(f"onnx: {what}")
        o = run_ort(onnx_bytes, spec, shape, channels, batch_size=args.batch_size,
                    workers=args.workers, threads=args.threads)
        print(f"onnxruntime fp32: {o['n']} ex in {o['seconds']:.1f} s = {o['ex_s']:.1f} ex/s, "
              f"data loading {100 * o['data_share']:.0f}% of wall")
        a = res["fp32"]["store"].layer(layers[0])
        b = res["bf16"]["store"].layer(layers[0])
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)
        print(f"bf16 vs fp32 {layers[0]} (max-pooled) cosine: mean {cos.mean():.5f}, "
              f"min {cos.min():.5f} (target >= 0.999)")
        r32 = res["fp32"]["ex_s"] / o["ex_s"]
        r16 = res["bf16"]["ex_s"] / o["ex_s"]
        print(f"RATIO vs onnxruntime fp32: pytorch fp32 {r32:.2f}x (target >= 1.0), "
              f"pytorch bf16 {r16:.2f}x (target >= 2.0)")
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
