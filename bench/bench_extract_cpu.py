"""CPU benchmark: ``probing.extract`` (the CPU engine, fp32 / bf16) vs onnxruntime, end to end.

Both sides read the same gzipped TFRecord shards through the same loader
(:class:`probing.loader.ExampleBatches`: same batches, same worker processes), so the
comparison is of the whole pipeline, not of a model call on a pre-made tensor. The
pipelines (extract in fp32 and bf16, then onnxruntime) run interleaved for ``--rounds``
rounds so that a noisy moment on a shared machine hits all of them alike; the medians are
reported: examples/s for each, the share of wall time the main thread spends getting the
next batch (loading and decoding: a stall for onnxruntime, which waits for it; with 2+
threads the CPU engine computes whole batches on worker threads meanwhile, when memory
allows), and the cosine similarity of the bf16 rows' max-pooled first layer to the fp32
rows (target >= 0.999). The engine's own description (threads, whole batches in flight,
fused conv) is printed from store.json. The last lines are the ratio lines (targets: fp32
>= 1.0x onnxruntime, bf16 >= 2x onnxruntime fp32), for the whole run and for the run after
its first 10 batches (what a whole-genome run sees once start-up costs are paid; the
engine's oneDNN primitive creation is also paid by an untimed warm-up run).

onnxruntime gets DeepVariant's ``(x - 128) / 128`` from ``dvtorch.preprocess`` (one allocation);
the PyTorch model takes the uint8 batch and scales it itself. The ONNX model: a bundle
converted from TensorFlow ships ``model.onnx`` (the tf2onnx graph, softmax output only);
otherwise the native model is exported with ``torch.onnx.export(dynamo=False)`` returning
softmax + max-pooled mixed5 / mixed10, i.e. the same outputs extraction stores. The output
says which one ran.

Synthetic examples (without ``--examples``) are pileup-like: a reference band, 100-150 bp
reads at random offsets carrying the reference bases with 1% mismatches, binned per-base
qualities, and per-read MAPQ / strand / allele support / insert size, so that they gzip
about like make_examples output rather than 100x.

Run (2 threads)::

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_extract_cpu.py --n 1536 --batch-size 32 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _pileup(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """One pileup-like uint8 image in DeepVariant's 7-channel WGS layout."""
    from probing.channels import BASE_COLOR, REF_ROWS

    h, w, c = shape
    colors = np.array(list(BASE_COLOR.values()), dtype=np.uint8)
    ref = colors[rng.integers(0, 4, w)]
    img = np.zeros((h, w, c), dtype=np.uint8)
    img[:REF_ROWS, :, 0] = ref
    img[:REF_ROWS, :, 1:] = 254
    rows = int(rng.integers(20, h - REF_ROWS))
    start = rng.integers(-120, w - 30, rows)
    cover = (np.arange(w) >= start[:, None]) & (np.arange(w) < (start + rng.integers(100, 151, rows))[:, None])
    base = np.broadcast_to(ref, (rows, w)).copy()
    mismatch = rng.random((rows, w)) < 0.01
    base[mismatch] = colors[rng.integers(0, 4, int(mismatch.sum()))]
    per_base_q = rng.choice(np.array([37, 37, 37, 37, 37, 37, 37, 23, 12]), (rows, w))
    per_read = lambda values: np.broadcast_to(rng.choice(np.array(values), rows)[:, None], (rows, w))  # noqa: E731
    block = np.stack([
        base,
        (254 * per_base_q // 40).astype(np.uint8),
        per_read([254] * 9 + [84]),                  # MAPQ 60, sometimes 20
        per_read([70, 240]),                         # strand
        per_read([254, 152, 152]),                   # supports alt / not
        np.where(base != ref, 254, 50).astype(np.uint8),  # differs from ref
        rng.integers(60, 254, rows).astype(np.uint8)[:, None].repeat(w, 1),  # insert size
    ], axis=-1)[..., :c]
    img[REF_ROWS:REF_ROWS + rows] = block * cover[..., None]
    return img


def synth_examples(d: Path, n: int, shards: int = 2, seed: int = 0) -> str:
    """``n`` pileup-like examples (see module doc) in ``shards`` gzipped TFRecord shards."""
    from probing.channels import WGS_CHANNELS, WGS_SHAPE
    from probing.examples import encode_example, write_example_info
    from probing.tfrecord import TFRecordWriter, shard_name

    rng = np.random.default_rng(seed)
    base = str(d / "bench.tfrecord")
    per = (n + shards - 1) // shards
    for s in range(shards):
        path = shard_name(base, s, shards, ".gz")
        with TFRecordWriter(path) as wr:
            for i in range(s * per, min(n, (s + 1) * per)):
                wr.write(encode_example(_pileup(rng, WGS_SHAPE), chrom="chr20",
                                        start=10_000 + 13 * i, end=10_001 + 13 * i, ref="A",
                                        alts=("G",), alt_allele_indices=(0,)))
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

    from dvtorch.bundle import preprocess
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
    marks: list[tuple[int, float]] = []
    while True:
        tw = time.perf_counter()
        b = next(it, None)
        wait += time.perf_counter() - tw
        if b is None:
            break
        b.raise_error()  # --examples given a damaged file: stop like extraction does
        sess.run(None, {name: preprocess(b.images).numpy()})
        n += b.n
        marks.append((n, time.perf_counter()))
    dt = time.perf_counter() - t0
    return {"n": n, "seconds": dt, "ex_s": n / dt, "data_share": wait / dt,
            "steady_ex_s": steady_rate(marks)}


STEADY_AFTER = 10  # batches: start-up (trace, specialisation, checks, caches) is over by then


def steady_rate(marks: list[tuple[int, float]]) -> float:
    """Examples/s from the end of batch STEADY_AFTER to the end of the run: what a
    whole-genome run (millions of examples) sees once start-up costs are paid."""
    if len(marks) <= STEADY_AFTER + 1:
        return float("nan")
    (n1, t1), (n2, t2) = marks[STEADY_AFTER], marks[-1]
    return (n2 - n1) / (t2 - t1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1536,
                    help="synthetic examples (ignored with --examples); enough that the loader "
                         "process start-up is not part of the figure")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=None,
                    help="loader processes for both sides (default: extract's default_workers)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bundle", type=Path, help="BUNDLE (default: untrained reference bundle)")
    ap.add_argument("--examples", help="examples spec (default: synthetic, written to a temp dir)")
    ap.add_argument("--layers", default="mixed5,mixed10")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds (median)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    import torch

    import dvtorch
    from dvtorch.engine.cpu_features import describe
    from probing.extract import ExtractConfig, default_workers, extract

    torch.set_num_threads(args.threads)
    if args.workers is None:
        args.workers = default_workers(torch.device("cpu"))
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
        print(describe())
        print(f"torch {torch.__version__}, threads {args.threads}, workers {args.workers}, "
              f"batch {args.batch_size}, examples {spec}")

        from probing.tfrecord import expand_spec

        files = [Path(f) for f in expand_spec(spec)]
        packed = sum(f.stat().st_size for f in files)
        print(f"examples: {packed / 1e6:.1f} MB gzipped, "
              f"{packed / args.n / 1e3 if not args.examples else float('nan'):.1f} kB/example")
        # the loader alone, in this process: framing + CRC32C + gunzip + tf.Example parse +
        # pileup attributes, i.e. the CPU cost data loading adds per example
        from probing.loader import ExampleBatches

        t0 = time.perf_counter()
        n_loaded = sum(b.n for b in ExampleBatches([str(f) for f in files],
                                                   batch_size=args.batch_size, shape=shape,
                                                   channels=channels))
        t_load = time.perf_counter() - t0
        print(f"loader alone (one process): {n_loaded / t_load:.0f} ex/s = "
              f"{1e3 * t_load / n_loaded:.2f} ms of CPU per example")
        contenders = ("fp32", "bf16")
        label = {dt: f"pytorch {dt}" for dt in contenders}

        def config(out: Path, dtype: str, **options) -> ExtractConfig:
            return ExtractConfig(bundle, spec, out, layers=layers, device="cpu", dtype=dtype,
                                 batch_size=args.batch_size, **options)

        for dt in contenders:
            # warm-up (oneDNN primitive creation) on one batch, not timed
            extract(config(work / f"warm_{dt}", dt, workers=0, limit=args.batch_size),
                    progress=False)
        onnx_bytes, what = onnx_model(bundle, work, layers)
        print(f"onnx: {what}")

        runs: dict[str, list[dict]] = {label[c]: [] for c in contenders}
        runs["onnxruntime fp32"] = []
        stores = {}
        for r in range(args.rounds):
            for dt in contenders:
                marks: list[tuple[int, float]] = []
                s = extract(config(work / f"store_{dt}_{r}", dt, workers=args.workers),
                            progress=False,
                            on_batch=lambda n, m=marks: m.append((n, time.perf_counter())))
                ex = s.meta["extraction"]
                if r == 0:
                    print(f"{label[dt]}: engine {ex['engine']}, threads {ex['threads']}, "
                          f"whole batches in flight {ex['whole_batches_in_flight']}, "
                          f"fused conv {ex['fused_conv']}")
                runs[label[dt]].append({"n": s.n, "ex_s": ex["examples_per_s"],
                                        "data_share": ex["data_loading_share"],
                                        "steady_ex_s": steady_rate(marks)})
                stores[dt] = s
            runs["onnxruntime fp32"].append(
                run_ort(onnx_bytes, spec, shape, channels, batch_size=args.batch_size,
                        workers=args.workers, threads=args.threads))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]['ex_s']:.1f}" for k, v in runs.items()),
                  flush=True)
        med, steady = {}, {}
        for k, v in runs.items():
            med[k] = statistics.median(x["ex_s"] for x in v)
            steady[k] = statistics.median(x["steady_ex_s"] for x in v)
            share = statistics.median(x["data_share"] for x in v)
            print(f"{k}: {v[0]['n']} ex, median {med[k]:.1f} ex/s over {len(v)} rounds "
                  f"(min {min(x['ex_s'] for x in v):.1f}, max {max(x['ex_s'] for x in v):.1f}), "
                  f"after batch {STEADY_AFTER} {steady[k]:.1f} ex/s, "
                  f"main thread loading data {100 * share:.0f}% of wall")
        ref = stores[contenders[0]].layer(layers[0])
        for c in contenders[1:]:
            b = stores[c].layer(layers[0])
            cos = (ref * b).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(b, axis=1)
                                      + 1e-30)
            print(f"{label[c]} vs {label[contenders[0]]} {layers[0]} (max-pooled) cosine: "
                  f"mean {cos.mean():.5f}, min {cos.min():.5f} (target >= 0.999)")
        for what, rates in ((f"after batch {STEADY_AFTER}", steady), ("whole run", med)):
            print(f"RATIO vs onnxruntime fp32 ({what}): " + ", ".join(
                f"{label[c]} {rates[label[c]] / rates['onnxruntime fp32']:.2f}x "
                f"(target >= {'1.0' if c == 'fp32' else '2.0'})" for c in contenders))
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
